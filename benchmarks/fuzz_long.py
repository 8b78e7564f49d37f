"""Long fuzz runs: the CI property tests with thousands of cases per database.

`--suite upload` (the default) runs `tests/reliability/test_fuzz_upload.py` (hostile
packages through the real HTTP route; every answer must be a 4xx with a clear message and
leave the catalog unchanged). `--suite routes` runs `tests/reliability/test_fuzz_routes.py`
(hostile path, query and JSON body values on every route of the app, as every identity;
never a 5xx, errors in the error shape, no change from a refused request). `--suite release`
runs `tests/phatgoose/test_release_security.py` (`load_release` against a hostile server on
loopback: hostile manifest values and replies; the load works or is a `ReleaseError`,
nothing is written outside the cache, nothing goes to another origin). Each runs with
`PHATGOOSE_FUZZ_EXAMPLES` cases, on SQLite and, when a server URL is given, on PostgreSQL.
Prints the wall time, the number of cases and the answers by attack (or route); writes them
as JSON.

    python benchmarks/fuzz_long.py --examples 10000 --out /tmp/fuzz_long.json \
        [--suite routes|release] \
        [--postgres-url postgresql+psycopg://postgres@127.0.0.1:5432/test [--only-postgres]]

Figures from a run go into docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# suite -> (test file, pytest -k selection, the environment variable naming its report)
SUITES = {
    "upload": ("tests/reliability/test_fuzz_upload.py", None, "PHATGOOSE_FUZZ_REPORT"),
    "routes": ("tests/reliability/test_fuzz_routes.py", "hostile", "PHATGOOSE_ROUTE_FUZZ_REPORT"),
    "release": (
        "tests/phatgoose/test_release_security.py",
        "whatever",
        "PHATGOOSE_RELEASE_FUZZ_REPORT",
    ),
}


def run(
    examples: int,
    postgres_url: str | None,
    out: Path,
    only_postgres: bool = False,
    suite: str = "upload",
) -> dict[str, object]:
    test, selection, report_variable = SUITES[suite]
    report = out.with_suffix(".tally.json")  # progress every 500 cases, while it runs
    report.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PHATGOOSE_FUZZ_EXAMPLES": str(examples),
        report_variable: str(report),
    }
    env.pop("PHATGOOSE_TEST_POSTGRES_URL", None)
    if postgres_url:
        env["PHATGOOSE_TEST_POSTGRES_URL"] = postgres_url
    started = time.monotonic()
    selections = [k for k in (selection, "postgres" if only_postgres else None) if k]
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", test, "-q", "-p", "no:cacheprovider", "-x"]
        + (["-k", " and ".join(selections)] if selections else []),
        cwd=ROOT,
        env=env,
    )
    seconds = time.monotonic() - started
    runs = json.loads(report.read_text()) if report.exists() else []
    by_status: Counter[str] = Counter()
    labels: set[str] = set()
    for entry in runs:
        for label, statuses in entry["by_label"].items():
            labels.add(label)
            by_status.update(statuses)
    result: dict[str, object] = {
        "suite": suite,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "examples_per_database": examples,
        "databases": [e["database"] for e in runs],
        "cases": sum(int(e["cases"]) for e in runs),
        "cases_per_database": {e["database"]: e["cases"] for e in runs},
        "statuses": dict(sorted(by_status.items())),
        "attacks": len(labels),
        # The routes suite counts these itself; the upload suite stops at the first one.
        "server_errors": sum(int(e.get("server_errors", 0)) for e in runs),
        "catalog_changes_on_refusal": sum(
            int(e.get("catalog_changes_on_refusal", 0)) for e in runs
        ),
        "by_attack": runs,
        "seconds": round(seconds, 1),
        "pytest_exit_code": completed.returncode,
    }
    out.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=10_000, help="cases per database")
    parser.add_argument("--postgres-url", default=None, help="also run on this server")
    parser.add_argument("--only-postgres", action="store_true", help="skip the SQLite run")
    parser.add_argument("--out", type=Path, default=Path("fuzz_long.json"))
    parser.add_argument("--suite", choices=sorted(SUITES), default="upload")
    args = parser.parse_args()
    result = run(args.examples, args.postgres_url, args.out, args.only_postgres, args.suite)
    summary = {k: v for k, v in result.items() if k != "by_attack"}
    print(json.dumps(summary, indent=1))
    sys.exit(int(result["pytest_exit_code"]))  # type: ignore[call-overload]


if __name__ == "__main__":
    main()

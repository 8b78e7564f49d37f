"""Property: whatever an untrusted contributor uploads, the answer is a 4xx with a clear
message (never a 5xx), and the catalog (rows, blobs, temp files) does not change.

Cases come from `tests.reliability.fuzzing.upload_cases`, through the real HTTP route.
`PHATGOOSE_FUZZ_EXAMPLES` sets the number of cases per database (CI: a few hundred);
`benchmarks/fuzz_long.py` runs 10,000+ and `PHATGOOSE_FUZZ_REPORT` collects the tally.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, reject, settings

from coordinator.auth.models import Role
from coordinator.base_models.service import register_base_model
from coordinator.core.config import Settings
from protocol import PACKAGE_FILES, BaseModelSpec
from protocol.validation import PackageRejected, validate_package
from tests.coordinator.helpers import TinyBase, bearer_headers, package_parts
from tests.reliability.catalog import catalog_state
from tests.reliability.fuzzing import FUZZ_LIMITS, UploadCase, read_package, upload_cases

EXAMPLES = int(os.environ.get("PHATGOOSE_FUZZ_EXAMPLES", "0")) or None
REPORT = os.environ.get("PHATGOOSE_FUZZ_REPORT")


@pytest.fixture
def fuzz_app(
    make_app: Callable[[Settings], FastAPI],
    settings: Settings,
    tiny_base: TinyBase,
    database_url: str,
) -> FastAPI:
    application = make_app(settings.model_copy(update={"admission": FUZZ_LIMITS}))
    with application.state.sessionmaker() as session:
        register_base_model(session, tiny_base.spec)
    return application


def would_be_accepted(files: dict[str, bytes] | None, spec: BaseModelSpec) -> bool:
    """The mutation left a valid package (e.g. a byte flip in padding): not an attack."""
    if files is None or not set(files) <= set(PACKAGE_FILES):
        return False
    with tempfile.TemporaryDirectory() as folder:
        paths = {}
        for name, data in files.items():
            paths[name] = Path(folder) / name
            paths[name].write_bytes(data)
        try:
            validate_package(paths, spec, FUZZ_LIMITS, namespace="alice")
        except PackageRejected:
            return False
    return True


def write_tally(counts: Counter[tuple[str, int]], database_url: str, done: bool) -> None:
    """Add (or update) this database's entry in the `PHATGOOSE_FUZZ_REPORT` file."""
    if not REPORT:
        return
    path = Path(REPORT)
    entries = json.loads(path.read_text()) if path.exists() else []
    database = database_url.split(":", 1)[0]
    entries = [e for e in entries if e["database"] != database]
    by_label: dict[str, dict[str, int]] = {}
    for (label, status), n in sorted(counts.items()):
        by_label.setdefault(label, {})[str(status)] = n
    entries.append(
        {"database": database, "cases": sum(counts.values()), "done": done, "by_label": by_label}
    )
    path.write_text(json.dumps(entries, indent=1))


@pytest.fixture
def tally(database_url: str) -> Iterator[Counter[tuple[str, int]]]:
    counts: Counter[tuple[str, int]] = Counter()
    yield counts
    write_tally(counts, database_url, done=True)


def _examples(database_url: str) -> int:
    if EXAMPLES:
        return EXAMPLES
    return 250 if database_url.startswith("sqlite") else 120


def test_hostile_uploads_are_4xx_and_change_nothing(
    fuzz_app: FastAPI,
    package: Callable[..., Path],
    tiny_base: TinyBase,
    database_url: str,
    tally: Counter[tuple[str, int]],
) -> None:
    alice = bearer_headers(fuzz_app, "alice", Role.CONTRIBUTOR)
    client = TestClient(fuzz_app, raise_server_exceptions=False)
    # The catalog is not empty: a valid version is already there (so that a mutation that
    # lands back on it is a 409, and a broken one must leave it alone).
    published = client.post("/api/v1/experts", headers=alice, files=package_parts(package()))
    assert published.status_code == 201, published.text
    valid = read_package(package(seed=1))
    before = catalog_state(fuzz_app)
    assert before.versions == 1 and before.uploads_in_progress == 0

    @settings(
        max_examples=_examples(database_url),
        deadline=None,
        database=None,
        phases=[Phase.generate],  # a failure is reported with its case; no shrinking needed
        suppress_health_check=list(HealthCheck),
    )
    @given(case=upload_cases(valid))
    def check(case: UploadCase) -> None:
        if would_be_accepted(case.files, tiny_base.spec):
            reject()
        response = client.post(
            "/api/v1/experts", headers={**alice, **case.headers}, content=case.body
        )
        tally[(case.label, response.status_code)] += 1
        if sum(tally.values()) % 500 == 0:  # progress, for long runs
            write_tally(tally, database_url, done=False)
        where = f"{case.label}: {response.status_code} {response.text[:300]}"
        assert 400 <= response.status_code < 500, where
        detail = response.json()["detail"]
        assert isinstance(detail, dict), where
        assert isinstance(detail.get("message"), str) and detail["message"].strip(), where
        assert detail.get("error") and detail.get("check"), where
        assert catalog_state(fuzz_app) == before, where

    check()
    assert client.get("/api/v1/experts").json()["total"] == 1
    client.close()

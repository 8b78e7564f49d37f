"""Load test of the coordinator: concurrent uploads and catalog reads from another process.

Starts a coordinator process (`python -m uvicorn --factory coordinator.core.app:create_app`,
or forked from a warm parent with `--fork`) on a loopback port, over PostgreSQL (a temporary
database on the server given) or SQLite. Then, from this process, `--uploaders` threads
publish distinct valid packages and `--readers` threads list the catalog, read versions and
download files, for `--seconds`. The server's RSS is sampled every 0.2 s throughout.
Finally, one package of `--big-mb` MB is uploaded, to show that uploads stream: the RSS
grows by much less than the package.

    python benchmarks/load_test.py --seconds 60 \
        --postgres-url postgresql+psycopg://postgres@127.0.0.1:5432/test --out load.json

Prints and writes throughput, p50/p95/p99 latencies per operation, errors (anything that is
not the expected status, or a transport error) and the RSS figures. Figures from a run go
into docs/reliability.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from coordinator.auth.models import Role  # noqa: E402
from coordinator.auth.service import create_token  # noqa: E402
from coordinator.core.app import open_database  # noqa: E402
from coordinator.core.config import Settings  # noqa: E402
from protocol import BaseModelSpec, LinearModuleSpec  # noqa: E402
from tests.reliability.fuzzing import BOUNDARY, multipart  # noqa: E402
from tests.reliability.workload import Launcher, Packages, free_port, wait_healthy  # noqa: E402


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of `pid`: `VmRSS` in all, or `RssAnon` (heap, not file pages: the
    validator reads safetensors through mmap, whose pages count in VmRSS but are the page
    cache's, shared and reclaimable)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[int, int]] = []  # (VmRSS, RssAnon)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.samples.append((rss_bytes(self.pid), rss_bytes(self.pid, "RssAnon")))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self) -> int:
        return max((r for r, _ in self.samples), default=0)

    def peak_anon(self) -> int:
        return max((a for _, a in self.samples), default=0)


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, op: str, seconds: float, error: str | None = None) -> None:
        with self.lock:
            self.latencies[op].append(seconds)
            if error is not None:
                self.errors.append(f"{op}: {error}")


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    array = np.array(values) * 1000
    return {
        "count": len(values),
        "p50_ms": round(float(np.percentile(array, 50)), 1),
        "p95_ms": round(float(np.percentile(array, 95)), 1),
        "p99_ms": round(float(np.percentile(array, 99)), 1),
        "max_ms": round(float(array.max()), 1),
    }


def _multipart_stream(files: dict[str, Path]) -> Iterator[bytes]:
    """The multipart body, read from disk in 1 MiB chunks (the client holds no package)."""
    for name, path in files.items():
        yield (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        with path.open("rb") as reader:
            while chunk := reader.read(1 << 20):
                yield chunk
        yield b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


def uploader(
    base_url: str,
    headers: dict[str, str],
    packages: Packages,
    lock: threading.Lock,
    stats: Stats,
    stop: threading.Event,
    published: list[str],
) -> None:
    with httpx.Client(base_url=base_url, timeout=60) as client:
        while not stop.is_set():
            with lock:
                files = packages.next()
            body = multipart([(b"files", n.encode(), d) for n, d in files.items()])
            started = time.monotonic()
            try:
                response = client.post(
                    "/api/v1/experts",
                    headers={
                        **headers,
                        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                    },
                    content=body,
                )
            except httpx.HTTPError as error:
                stats.record("upload", time.monotonic() - started, repr(error))
                continue
            ok = response.status_code == 201
            stats.record("upload", time.monotonic() - started, None if ok else response.text[:200])
            if ok:
                with lock:
                    published.append(response.headers["location"])


def reader(
    base_url: str, stats: Stats, stop: threading.Event, published: list[str], seed: int
) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=base_url, timeout=60) as client:
        while not stop.is_set():
            choice = rng.random()
            if choice < 0.4 or not published:
                op, url = "list", f"/api/v1/experts?limit=50&offset={rng.randrange(0, 50)}"
            elif choice < 0.7:
                op, url = "version", rng.choice(published)
            else:
                op, url = "download", rng.choice(published) + "/files/router.safetensors"
            started = time.monotonic()
            try:
                response = client.get(url)
            except httpx.HTTPError as error:
                stats.record(op, time.monotonic() - started, repr(error))
                continue
            ok = response.status_code == 200
            stats.record(op, time.monotonic() - started, None if ok else response.text[:200])


def write_big_package(directory: Path, template: Path, megabytes: int) -> BaseModelSpec:
    """A valid package of about `megabytes` MB over a made-up wide base model (rank 64,
    8192 x 8192 linear modules, about 4 MiB of LoRA weights each)."""
    n = 8192
    rank = 64
    modules = max(1, megabytes // 4)
    spec = BaseModelSpec(
        name="wide",
        fingerprint="sha256:" + hashlib.sha256(b"wide").hexdigest(),
        architecture="llama",
        linear_modules=[
            LinearModuleSpec(path=f"model.layers.{i}.proj", in_features=n, out_features=n)
            for i in range(modules)
        ],
    )
    rng = np.random.default_rng(0)
    adapter, router = {}, {}
    for module in spec.linear_modules:
        prefix = f"base_model.model.{module.path}"
        adapter[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, n), np.float32) / 100
        adapter[f"{prefix}.lora_B.weight"] = rng.standard_normal((n, rank), np.float32) / 100
        router[f"{module.path}.gate"] = rng.standard_normal(n, np.float32) / 10
    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter, str(directory / "adapter_model.safetensors"))
    save_file(router, str(directory / "router.safetensors"))
    config = json.loads((template / "adapter_config.json").read_text())
    config.update(r=rank, lora_alpha=rank, target_modules=["proj"])
    (directory / "adapter_config.json").write_text(json.dumps(config))
    manifest = json.loads((template / "expert.json").read_text())
    manifest.update(name="alice/big", base_model={"name": "wide", "fingerprint": spec.fingerprint})
    manifest["lora"].update(r=rank, lora_alpha=rank, target_modules=["proj"], modules=modules)
    (directory / "expert.json").write_text(json.dumps(manifest))
    return spec


@contextlib.contextmanager
def database(postgres_url: str | None, data_dir: Path) -> Iterator[str]:
    if postgres_url is None:
        yield f"sqlite:///{data_dir / 'coordinator.sqlite'}"
        return
    from tests.coordinator.conftest import temporary_postgres_database

    with temporary_postgres_database(postgres_url) as url:
        yield url


def run(
    seconds: float,
    uploaders: int,
    readers: int,
    postgres_url: str | None,
    big_mb: int,
    fork: bool,
) -> dict[str, object]:
    from coordinator.base_models.service import register_base_model
    from tests.coordinator.helpers import make_tiny_base

    work = Path(tempfile.mkdtemp(prefix="phatgoose-load-"))
    try:
        with database(postgres_url, work) as url:
            settings = Settings(data_dir=work / "data", database_url=url, log_level="WARNING")
            engine, sessions = open_database(settings)
            tiny = make_tiny_base()
            with sessions() as session:
                register_base_model(session, tiny.spec)
                alice = create_token(session, name="alice", role=Role.CONTRIBUTOR)
                carol = create_token(session, name="carol", role=Role.MAINTAINER)
            engine.dispose()
            template = tiny.write_package(work / "template", "alice/load")
            headers = {"Authorization": f"Bearer {alice.secret_token}"}
            maintainer = {"Authorization": f"Bearer {carol.secret_token}"}

            env = {
                **os.environ,
                "PHATGOOSE_DATA_DIR": str(settings.data_dir),
                "PHATGOOSE_DATABASE_URL": url,
                "PHATGOOSE_LOG_LEVEL": "WARNING",
            }
            launcher = Launcher(
                {"data_dir": str(settings.data_dir), "database_url": url, "log_level": "WARNING"},
                env,
                fork=fork,
            )
            port = free_port()
            base_url = f"http://127.0.0.1:{port}"
            started = time.monotonic()
            pid = launcher.start_forked(port) if fork else launcher.start_plain(port)
            startup = wait_healthy(base_url, pid, timeout=600)
            try:
                result = _measure(
                    base_url,
                    pid,
                    headers,
                    maintainer,
                    template,
                    work,
                    seconds,
                    uploaders,
                    readers,
                    big_mb,
                )
            finally:
                launcher.kill(pid)
                launcher.close()
            result["startup_s"] = round(startup, 2)
            result["server"] = "forked from a warm parent" if fork else "python -m uvicorn"
            result["database"] = "postgresql" if postgres_url else "sqlite"
            result["wall_s"] = round(time.monotonic() - started, 1)
            return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(
    base_url: str,
    pid: int,
    headers: dict[str, str],
    maintainer: dict[str, str],
    template: Path,
    work: Path,
    seconds: float,
    uploaders: int,
    readers: int,
    big_mb: int,
) -> dict[str, object]:
    stats = Stats()
    stop = threading.Event()
    published: list[str] = []
    packages = Packages(template)
    lock = threading.Lock()
    baseline, baseline_anon = rss_bytes(pid), rss_bytes(pid, "RssAnon")
    threads = [
        threading.Thread(
            target=uploader, args=(base_url, headers, packages, lock, stats, stop, published)
        )
        for _ in range(uploaders)
    ] + [
        threading.Thread(target=reader, args=(base_url, stats, stop, published, i))
        for i in range(readers)
    ]
    with RssSampler(pid) as load_rss:
        began = time.monotonic()
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        stop.set()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - began
    ops = {op: percentiles(values) for op, values in sorted(stats.latencies.items())}
    total = sum(len(v) for v in stats.latencies.values())
    result: dict[str, object] = {
        "seconds": round(elapsed, 1),
        "uploaders": uploaders,
        "readers": readers,
        "requests": total,
        "throughput_rps": round(total / elapsed, 1),
        "uploads_per_s": round(len(stats.latencies["upload"]) / elapsed, 1),
        "errors": len(stats.errors),
        "error_samples": stats.errors[:5],
        "operations": ops,
        "rss_start_mb": round(baseline / 2**20, 1),
        "rss_peak_under_load_mb": round(load_rss.peak() / 2**20, 1),
        "rss_end_of_load_mb": round(rss_bytes(pid) / 2**20, 1),
        "rss_anon_start_mb": round(baseline_anon / 2**20, 1),
        "rss_anon_peak_under_load_mb": round(load_rss.peak_anon() / 2**20, 1),
    }
    if big_mb:
        big = work / "big"
        spec = write_big_package(big, template, big_mb)
        with httpx.Client(base_url=base_url, timeout=600) as client:
            response = client.post(
                "/api/v1/base-models", json=spec.model_dump(mode="json"), headers=maintainer
            )
            assert response.status_code == 201, response.text
            files = {p.name: p for p in sorted(big.iterdir())}
            size = sum(p.stat().st_size for p in files.values())
            before, before_anon = rss_bytes(pid), rss_bytes(pid, "RssAnon")
            with RssSampler(pid, interval=0.05) as big_rss:
                started = time.monotonic()
                response = client.post(
                    "/api/v1/experts",
                    headers={
                        **headers,
                        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                    },
                    content=_multipart_stream(files),
                )
                upload_s = time.monotonic() - started
        result["big_upload"] = {
            "status": response.status_code,
            "package_mb": round(size / 2**20, 1),
            "seconds": round(upload_s, 1),
            "rss_before_mb": round(before / 2**20, 1),
            "rss_peak_mb": round(big_rss.peak() / 2**20, 1),
            "rss_growth_mb": round((big_rss.peak() - before) / 2**20, 1),
            "rss_anon_before_mb": round(before_anon / 2**20, 1),
            "rss_anon_peak_mb": round(big_rss.peak_anon() / 2**20, 1),
            "rss_anon_growth_mb": round((big_rss.peak_anon() - before_anon) / 2**20, 1),
        }
        if response.status_code != 201:
            result["errors"] = int(result["errors"]) + 1  # type: ignore[call-overload]
            result["big_upload"]["body"] = response.text[:300]  # type: ignore[index]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--uploaders", type=int, default=4)
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--postgres-url", default=None, help="default: SQLite")
    parser.add_argument("--big-mb", type=int, default=256, help="0: skip the big upload")
    parser.add_argument("--fork", action="store_true", help="fork the server from a warm parent")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = run(
        args.seconds, args.uploaders, args.readers, args.postgres_url, args.big_mb, args.fork
    )
    result["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["machine"] = (
        f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
    )
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    sys.exit(1 if result["errors"] else 0)


if __name__ == "__main__":
    main()

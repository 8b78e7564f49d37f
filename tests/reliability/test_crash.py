"""Crash safety: SIGKILL the coordinator at random moments while uploads stream in.

Each cycle starts a coordinator process on a free loopback port, streams several uploads
at once (some throttled, so the kill lands mid-body; some fast, so it lands in validation,
blob writes or the commit; every other one a delta upload, which asks which segments are
missing and sends only those), kills the process with SIGKILL after a random delay and
starts it again. After every restart:
- every upload that was acknowledged (201) is in the catalog, and its stored bytes have the
  sha256 the reply gave (downloaded over HTTP for new ones; read from the blob store for all);
- nothing half-written is visible: every version has all its file rows, every file row its
  blobs, every blob's bytes hash to its name; the start-up report is healthy;
- no orphan: every blob in the store is one the catalog needs (the start-up garbage
  collection removed what uploads killed before their commit had stored);
- no temporary file is left after the start-up clean-up (upload folders, blob temp files,
  unfinished multipart uploads in object storage).

Each database runs twice: with blobs in the local folder, and in S3-compatible object
storage (`PHATGOOSE_BLOB_URL` naming a bucket on a moto S3 server that runs in this test
process, so the kills never touch it). Blobs are read back through the store either way.
`PHATGOOSE_CRASH_CYCLES` sets the kills per database with local blobs: 50 by default, so CI
kills the coordinator 50 times on SQLite and 50 times on PostgreSQL;
`PHATGOOSE_CRASH_S3_CYCLES` (default 15) those with object storage. Processes come from a
fork server (tests/reliability/forkserver.py) that imports the coordinator once; one cycle
per database starts a plain `python -m uvicorn --factory` process when
`PHATGOOSE_CRASH_PLAIN=1` (start-up then imports everything, torch included: slow).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.auth.models import Role
from coordinator.base_models.service import register_base_model
from coordinator.core.config import Settings
from coordinator.core.db import make_engine
from coordinator.experts.files import needed_blobs
from coordinator.experts.models import ExpertVersion
from coordinator.storage import BlobStore, open_blob_store
from tests.coordinator.helpers import TinyBase, bearer_headers
from tests.coordinator.s3_server import (  # noqa: F401  (fixtures)
    bucket_fixture,
    moto_server_fixture,
    s3_env_fixture,
    s3_fixture,
)
from tests.reliability.catalog import unfinished_writes
from tests.reliability.fuzzing import BOUNDARY, multipart
from tests.reliability.workload import Launcher, Packages, delta_body, free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
CYCLES = int(os.environ.get("PHATGOOSE_CRASH_CYCLES", "50"))
S3_CYCLES = int(os.environ.get("PHATGOOSE_CRASH_S3_CYCLES", "15"))
# Also start one plain `python -m uvicorn` process (slow where torch is imported at start-up).
PLAIN = os.environ.get("PHATGOOSE_CRASH_PLAIN", "") == "1"
UPLOADS_PER_CYCLE = 4
PACKAGE_NAMES = sorted(
    ["adapter_config.json", "adapter_model.safetensors", "expert.json", "router.safetensors"]
)


@dataclass
class Acked:
    ref: str
    url: str
    files: dict[str, str]  # file name -> sha256 from the 201 reply
    delta: bool = False


@dataclass
class Tally:
    acked: list[Acked] = field(default_factory=list)
    refused: int = 0  # connection reset / killed mid-request
    kills: int = 0
    startup_seconds: list[float] = field(default_factory=list)
    cycle_seconds: list[float] = field(default_factory=list)


def _throttled(body: bytes, chunk: int, pause: float) -> Iterator[bytes]:
    view = io.BytesIO(body)
    while data := view.read(chunk):
        yield data
        if pause:
            time.sleep(pause)


def _upload(
    base_url: str,
    headers: dict[str, str],
    files: dict[str, bytes],
    pause: float,
    tally: Tally,
    lock: threading.Lock,
    finished: threading.Semaphore,
    delta: Path | None,
) -> None:
    try:
        _send(base_url, headers, files, pause, tally, lock, delta)
    finally:
        finished.release()


def _send(
    base_url: str,
    headers: dict[str, str],
    files: dict[str, bytes],
    pause: float,
    tally: Tally,
    lock: threading.Lock,
    delta: Path | None = None,
) -> None:
    """A whole upload, or with `delta` (a scratch folder) a delta upload: only the segments
    the coordinator lacks, asked for first."""
    try:
        if delta is None:
            body = multipart([(b"files", name.encode(), data) for name, data in files.items()])
        else:
            body = multipart(delta_body(base_url, headers, files, delta))
        response = httpx.post(
            f"{base_url}/api/v1/experts",
            headers={**headers, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
            content=_throttled(body, 4096, pause),
            timeout=30,
        )
    except (httpx.TransportError, httpx.HTTPStatusError):  # killed before or while asking
        with lock:
            tally.refused += 1
        return
    with lock:
        if response.status_code == 201:
            reply = response.json()
            tally.acked.append(
                Acked(
                    ref=reply["ref"],
                    url=response.headers["location"],
                    files={f["filename"]: f["sha256"] for f in reply["files"]},
                    delta=delta is not None,
                )
            )
        else:  # an answer that is not 201 must be a clean refusal, never a 5xx
            assert response.status_code < 500, response.text


def check_catalog(session: Session, blobs: BlobStore, tmp_dir: Path, acked: list[Acked]) -> int:
    """Nothing half-written is visible; every acknowledged upload is there. Returns the
    number of versions in the catalog."""
    versions = session.scalars(select(ExpertVersion)).all()
    by_ref = {v.ref: v for v in versions}
    for version in versions:
        names = sorted(f.filename for f in version.files)
        assert names == sorted(
            [
                "adapter_config.json",
                "adapter_model.safetensors",
                "expert.json",
                "router.safetensors",
            ]
        ), (version.ref, names)
    for ack in acked:
        assert ack.ref in by_ref, f"acknowledged {ack.ref} is missing after the crash"
        stored = {f.filename: f.sha256 for f in by_ref[ack.ref].files}
        assert stored == ack.files, ack.ref
    # Every blob's bytes, read back through the store, hash to its name: no partial blob
    # under a final name.
    needed = needed_blobs(session)
    in_store = set()
    for name in blobs.iter_blobs():
        with blobs.open(name) as reader:
            digest = hashlib.sha256(reader.read()).hexdigest()
        assert digest == name, f"partial or corrupt blob {name} in {blobs.location}"
        in_store.add(digest)
    assert needed <= in_store, f"rows without blobs: {sorted(needed - in_store)[:3]}"
    # No orphan: what uploads killed before their commit stored was collected at start-up.
    assert in_store <= needed, f"blobs no row needs: {sorted(in_store - needed)[:3]}"
    # The start-up clean-up left nothing behind: no temp file, no unfinished upload.
    assert unfinished_writes(blobs) == []
    assert list(tmp_dir.iterdir()) == []
    return len(versions)


def download_and_check(base_url: str, acks: list[Acked]) -> None:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for ack in acks:
            for filename, sha256 in ack.files.items():
                response = client.get(f"{ack.url}/files/{filename}")
                assert response.status_code == 200, (ack.ref, filename, response.text)
                assert hashlib.sha256(response.content).hexdigest() == sha256, (ack.ref, filename)


@pytest.fixture(params=["local", "s3"])
def blob_url(request: pytest.FixtureRequest) -> str | None:
    """Blobs in the data directory, or in a new bucket of the moto S3 server (which runs
    in this process: the coordinator killed is another)."""
    if request.param == "local":
        return None
    return f"s3://{request.getfixturevalue('bucket')}/crash"


@pytest.fixture
def crash_setup(
    make_app: Callable[[Settings], FastAPI],
    settings: Settings,
    tiny_base: TinyBase,
    blob_url: str | None,
) -> tuple[Settings, dict[str, str], dict[str, str]]:
    """A migrated data directory with the tiny base, a contributor and a maintainer."""
    settings = settings.model_copy(update={"blob_url": blob_url})
    application = make_app(settings.model_copy(update={"stale_temp_seconds": 0}))
    with application.state.sessionmaker() as session:
        register_base_model(session, tiny_base.spec)
    alice = bearer_headers(application, "alice", Role.CONTRIBUTOR)
    carol = bearer_headers(application, "carol", Role.MAINTAINER)
    application.state.engine.dispose()
    return settings, alice, carol


@pytest.mark.slow
def test_sigkill_during_uploads_loses_no_acknowledged_upload(
    crash_setup: tuple[Settings, dict[str, str], dict[str, str]],
    package: Callable[..., Path],
    database_url: str,
    tmp_path: Path,
) -> None:
    settings, alice, carol = crash_setup
    scratch = tmp_path / "delta"
    server_settings: dict[str, object] = {
        "data_dir": str(settings.data_dir),
        "database_url": settings.resolved_database_url,
        "stale_temp_seconds": 0,  # one process owns the data dir: every temp file is stale
        "log_level": "WARNING",
    }
    env = {
        **os.environ,  # with the AWS_* variables of the moto server, for object storage
        "PHATGOOSE_DATA_DIR": str(settings.data_dir),
        "PHATGOOSE_DATABASE_URL": settings.resolved_database_url,
        "PHATGOOSE_STALE_TEMP_SECONDS": "0",
        "PHATGOOSE_LOG_LEVEL": "WARNING",
    }
    if settings.blob_url:
        server_settings["blob_url"] = env["PHATGOOSE_BLOB_URL"] = settings.blob_url
    cycles = S3_CYCLES if settings.blob_url else CYCLES
    blobs = open_blob_store(settings)  # read back through the store the coordinator uses
    packages = Packages(package("alice/crash"))
    rng = random.Random(1234)
    tally = Tally()
    engine = make_engine(settings.resolved_database_url)
    launcher = Launcher(server_settings, env)
    checked = 0
    try:
        for cycle in range(cycles + 1):
            started = time.monotonic()
            port = free_port()
            base_url = f"http://127.0.0.1:{port}"
            plain = PLAIN and cycle == 1
            pid = launcher.start_plain(port) if plain else launcher.start_forked(port)
            tally.startup_seconds.append(wait_healthy(base_url, pid, timeout=300))
            if plain:
                plain_startup: float = tally.startup_seconds.pop()

            # After the restart: the clean-up ran, the catalog is whole.
            with Session(engine) as session:
                check_catalog(session, blobs, settings.upload_tmp_dir, tally.acked)
            report = httpx.get(f"{base_url}/api/v1/admin/startup-report", headers=carol).json()
            assert report["healthy"] and report["missing_blobs"] == [], report
            download_and_check(base_url, tally.acked[checked:])
            checked = len(tally.acked)
            if cycle == cycles:
                download_and_check(base_url, tally.acked)  # everything, once more
                launcher.kill(pid)
                break

            lock, finished = threading.Lock(), threading.Semaphore(0)
            threads = [
                threading.Thread(
                    target=_upload,
                    args=(
                        base_url,
                        alice,
                        packages.next(),
                        rng.choice([0.0, 0.0, 0.01, 0.03]),
                        tally,
                        lock,
                        finished,
                        # Every other upload is a delta (only the segments not stored).
                        scratch / f"{cycle}-{i}" if i % 2 else None,
                    ),
                )
                for i in range(UPLOADS_PER_CYCLE)
            ]
            for thread in threads:
                thread.start()
            # Kill once a random number of the uploads have finished (0 .. all but one),
            # plus a random jitter: the others are streaming, validating or committing. The
            # first cycle lets all of them finish, so that delta uploads (slower: they ask
            # first) are acknowledged and checked after every later kill, however loaded
            # the machine is.
            waits = rng.randrange(UPLOADS_PER_CYCLE)
            for _ in range(UPLOADS_PER_CYCLE if cycle == 0 else waits):
                assert finished.acquire(timeout=120)
            time.sleep(rng.uniform(0.0, 0.15))
            launcher.kill(pid)
            tally.kills += 1
            for thread in threads:
                thread.join(timeout=60)
                assert not thread.is_alive()
            tally.cycle_seconds.append(time.monotonic() - started)
    finally:
        launcher.close()
        engine.dispose()

    with Session(engine) as session:
        total = session.scalar(select(func.count()).select_from(ExpertVersion)) or 0
    engine.dispose()
    summary = {
        "database": database_url.split(":", 1)[0],
        "blobs": "s3" if settings.blob_url else "local",
        "kills": tally.kills,
        "uploads": tally.kills * UPLOADS_PER_CYCLE,
        "acknowledged": len(tally.acked),
        "acknowledged_delta": sum(ack.delta for ack in tally.acked),
        "cut_off": tally.refused,
        "versions_in_catalog": total,
        "startup_median_s": round(statistics.median(tally.startup_seconds), 3),
        "plain_uvicorn_startup_s": round(plain_startup, 3) if PLAIN else None,
        "cycle_median_s": round(statistics.median(tally.cycle_seconds), 3),
    }
    if not PLAIN:
        del summary["plain_uvicorn_startup_s"]
    print("crash summary:", json.dumps(summary))
    assert tally.kills == cycles >= 1
    # Some uploads are cut off and some get through: the kills really land mid-upload.
    # (A handful of cycles, as PHATGOOSE_CRASH_CYCLES=2 for a quick look, may kill every
    # one of them before its first upload finished.)
    assert (tally.acked and tally.refused) or cycles < 10
    assert any(ack.delta for ack in tally.acked)  # deltas got through too
    assert total >= len(tally.acked)

"""Outgrowing one machine, end to end: two coordinator replicas (separate processes, each
with its own data directory) over one PostgreSQL database and one S3 bucket, and an
evaluation worker that has only a URL, a worker token and its own cache directory.

- concurrent uploads of one expert through both replicas get distinct, gapless versions;
- a package uploaded through one replica downloads byte-identical from the other;
- a release created and queued on replica 1 is evaluated by a worker process polling
  replica 2 over HTTP (no database, no bucket credentials, no data directory of the
  coordinator's), and both replicas show its results.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy.orm import Session

from coordinator.auth.models import Role
from coordinator.auth.service import create_token
from coordinator.base_models.service import register_base_model
from coordinator.core.db import make_engine
from tests.coordinator.conftest import NO_POSTGRES, POSTGRES_URL, temporary_postgres_database
from tests.coordinator.helpers import make_tiny_base, package_parts, stored_bytes
from tests.coordinator.release_helpers import save_base, write_task
from tests.coordinator.s3_server import (  # noqa: F401  (fixtures)
    aws_environment,
    bucket_fixture,
    moto_server_fixture,
    s3_env_fixture,
    s3_fixture,
)
from tests.reliability.workload import Launcher, free_port, wait_healthy

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("parity", "sums")
EXAMPLES = 6
VERSIONS_PER_EXPERT = 4


@pytest.fixture
def database() -> object:
    if not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    with temporary_postgres_database(POSTGRES_URL) as url:
        yield url


def _replica(tmp_path: Path, name: str, database: str, blob_url: str, environ: dict) -> tuple:
    settings = {
        "data_dir": str(tmp_path / name),
        "database_url": database,
        "blob_url": blob_url,
        "log_level": "WARNING",
    }
    launcher = Launcher(settings, environ)
    port = free_port()
    pid = launcher.start_forked(port)
    base_url = f"http://127.0.0.1:{port}"
    wait_healthy(base_url, pid)
    return launcher, pid, base_url


def _token(session: Session, name: str, role: Role) -> str:
    return create_token(session, name=name, role=role, prefix="phg").secret_token


def test_two_replicas_and_a_remote_worker_share_one_catalog(tmp_path, database, bucket, s3_env):
    tiny_base = make_tiny_base()
    environ = {**os.environ, **s3_env}
    blob_url = f"s3://{bucket}/community"
    first = _replica(tmp_path, "replica-1", database, blob_url, environ)  # migrates
    second = _replica(tmp_path, "replica-2", database, blob_url, environ)
    replicas = [first[2], second[2]]
    try:
        engine = make_engine(database)
        with Session(engine) as session:
            register_base_model(session, tiny_base.spec)
            alice = {"Authorization": f"Bearer {_token(session, 'alice', Role.CONTRIBUTOR)}"}
            carol = {"Authorization": f"Bearer {_token(session, 'carol', Role.MAINTAINER)}"}
            worker_token = _token(session, "gpu-site", Role.WORKER)
        engine.dispose()

        # Concurrent uploads of two experts, alternating replicas.
        packages = []
        for index in range(2 * VERSIONS_PER_EXPERT):
            name = "alice/a" if index % 2 == 0 else "alice/b"
            packages.append(tiny_base.write_package(tmp_path / f"p{index}", name, seed=index))

        def upload(index: int) -> httpx.Response:
            return httpx.post(
                f"{replicas[index % 2]}/api/v1/experts",
                headers=alice,
                files=package_parts(packages[index]),
                timeout=60,
            )

        with ThreadPoolExecutor(max_workers=len(packages)) as pool:
            replies = list(pool.map(upload, range(len(packages))))
        assert [r.status_code for r in replies] == [201] * len(packages), [
            r.text for r in replies if r.status_code != 201
        ]
        for name in ("alice/a", "alice/b"):
            numbers = sorted(
                r.json()["version"] for r in replies if r.json()["ref"].startswith(name + "@")
            )
            assert numbers == list(range(1, VERSIONS_PER_EXPERT + 1)), (name, numbers)

        # Uploaded through replica 1 (an even index), downloaded from replica 2.
        reply = replies[0].json()
        expected = stored_bytes(packages[0], tiny_base.spec)
        for filename, content in expected.items():
            got = httpx.get(
                f"{replicas[1]}/api/v1/experts/alice/a/{reply['version']}/files/{filename}",
                timeout=30,
            )
            assert got.status_code == 200, got.text
            assert hashlib.sha256(got.content).digest() == hashlib.sha256(content).digest()

        # A release and its evaluation, both on replica 1.
        release = httpx.post(
            f"{replicas[0]}/api/v1/releases",
            headers=carol,
            json={"method": "phatgoose", "experts": ["alice/a", "alice/b"], "top_k": 2},
            timeout=60,
        )
        assert release.status_code == 201, release.text
        number = release.json()["number"]
        queued = httpx.post(
            f"{replicas[0]}/api/v1/evaluations",
            headers=carol,
            json={"release": number, "tasks": list(TASKS), "examples_per_task": EXAMPLES},
            timeout=30,
        )
        assert queued.status_code == 201, queued.text
        job_id = queued.json()["id"]

        # The worker: its own folder, the URL of replica 2, a token file; nothing else.
        home = tmp_path / "worker"
        home.mkdir()
        base_dir = save_base(tiny_base, home / "base")
        for seed, task in enumerate(TASKS):
            write_task(home / "tasks", task, examples=10, seed=seed)
        (home / "token").write_text(worker_token)
        (home / "token").chmod(0o600)
        worker_env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("PHATGOOSE_", "AWS_"))
        }
        worker_env["PYTHONPATH"] = str(ROOT)
        worker_env["PHATGOOSE_CACHE"] = str(home / "phatgoose-cache")
        finished = subprocess.run(
            [
                sys.executable,
                "-c",
                "from app.cli import app; app()",
                "coordinator",
                "worker",
                "--once",
                "--url",
                replicas[1],
                "--token-file",
                str(home / "token"),
                "--cache-dir",
                str(home / "cache"),
                "--tasks-dir",
                str(home / "tasks"),
                "--base-model",
                f"tiny={base_dir}",
                "--poll-seconds",
                "0.1",
            ],
            cwd=home,
            env=worker_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert finished.returncode == 0, finished.stderr[-4000:]
        assert "1 job(s) ended" in finished.stderr
        cached = [p for p in (home / "cache" / "blobs").rglob("*") if p.is_file()]
        assert cached, "the worker downloaded nothing into its cache"
        for path in cached:  # each named by the sha256 of its bytes
            assert path.parent.name + path.name == hashlib.sha256(path.read_bytes()).hexdigest()

        # Both replicas show the same finished job.
        seen = []
        for base_url in replicas:
            job = httpx.get(f"{base_url}/api/v1/evaluations/{job_id}", timeout=30).json()
            assert job["state"] == "done", job
            assert job["worker_id"].startswith("gpu-site/"), job["worker_id"]
            seen.append({r["task"]: (r["accuracy"], r["n"]) for r in job["results"]})
        assert seen[0] == seen[1]
        assert sorted(seen[0]) == sorted(TASKS)
        assert all(n == EXAMPLES for _, n in seen[0].values())
    finally:
        for launcher, pid, _ in (first, second):
            launcher.kill(pid)
            launcher.close()

"""Remote evaluation workers (issue 20): the worker role, the job API, and a worker that
needs only the coordinator's URL and a worker token (`coordinator.worker_http`).

Every test here runs against a private coordinator (`public_read` off): a remote worker
reads manifests and downloads package files with its worker token.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from coordinator.auth.models import Role, Token
from coordinator.auth.service import create_token
from coordinator.base_models.service import register_base_model
from coordinator.cli import app as cli
from coordinator.core.db import utcnow
from coordinator.evaluations import service as evaluations
from coordinator.evaluations.schemas import MAX_LEASE_SECONDS
from coordinator.releases.models import Release
from coordinator.releases.service import manifest_digest
from coordinator.worker import (
    CoordinatorUnavailable,
    DatabaseBackend,
    Worker,
    WorkerOptions,
    WorkerStopped,
)
from coordinator.worker_http import (
    BlobCache,
    HttpBackend,
    RetryPolicy,
    UnusableRelease,
    WorkerSetupError,
    _inside,
    check_remote_options,
    connect,
)
from protocol import API_PREFIX
from tests.coordinator.helpers import bearer_headers, live_server
from tests.coordinator.release_helpers import WORKER_TASKS, create_release, publish

API = API_PREFIX
TASKS = WORKER_TASKS  # the tasks of the `tasks_dir` fixture
EXAMPLES = 6
NO_WAIT = RetryPolicy(attempts=3, backoff_seconds=0.0)


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture
def app(make_app, settings, tiny_base):
    """A private coordinator with the tiny llama registered as its base model."""
    application = make_app(settings.model_copy(update={"public_read": False}))
    with application.state.sessionmaker() as session:
        register_base_model(session, tiny_base.spec)
    return application


@pytest.fixture
def experts(client, alice, bob, tiny_base, tmp_path) -> None:
    publish(client, alice, tiny_base, tmp_path / "a", "alice/a", seed=0)
    publish(client, bob, tiny_base, tmp_path / "b", "bob/b", seed=1)


@pytest.fixture
def worker_token(app) -> str:
    """The secret of a worker token labelled 'gpu'."""
    return _secret(bearer_headers(app, "gpu", Role.WORKER))


@pytest.fixture
def worker(worker_token) -> dict[str, str]:
    return {"Authorization": f"Bearer {worker_token}"}


@pytest.fixture
def live(app):
    with live_server(app) as url:
        yield url


def _secret(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


def _options(base_dir, tasks_dir, **kwargs) -> WorkerOptions:
    return WorkerOptions(
        base_models={"tiny": str(base_dir)}, tasks_dir=tasks_dir, poll_seconds=0.05, **kwargs
    )


class Recording(httpx.HTTPTransport):
    """Forwards every request to the network and notes it; flips one byte of every
    download of the file named `tamper` (a proxy, or a coordinator, gone bad)."""

    def __init__(self, tamper: str | None = None) -> None:
        super().__init__()
        self.requests: list[str] = []
        self.tamper = tamper
        self.lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.requests.append(f"{request.method} {request.url.path}")
        response = super().handle_request(request)
        if self.tamper and request.url.path.endswith(f"/files/{self.tamper}"):
            body = bytearray(response.read())
            body[len(body) // 2] ^= 0x01
            return httpx.Response(
                response.status_code, headers=response.headers, content=bytes(body)
            )
        return response

    def downloads(self) -> list[str]:
        return [r for r in self.requests if "/files/" in r]


def _remote(live, token, cache_dir, transport=None, **kwargs) -> HttpBackend:
    return HttpBackend(
        connect(live, token, transport=transport), cache_dir, retry=NO_WAIT, **kwargs
    )


def _queue(client, maintainer, release=1, tasks=TASKS, **extra) -> int:
    body = {"release": release, "tasks": list(tasks), "examples_per_task": EXAMPLES, **extra}
    response = client.post(f"{API}/evaluations", headers=maintainer, json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _job(client, maintainer, job_id) -> dict:
    return client.get(f"{API}/evaluations/{job_id}", headers=maintainer).json()


def _cached_blobs(cache_dir: Path) -> dict[str, bytes]:
    """sha256 -> bytes of every file in the cache's blob folder."""
    return {
        path.parent.name + path.name: path.read_bytes()
        for path in (cache_dir / "blobs").glob("*/*")
        if path.is_file()
    }


def _manifest_files(client, maintainer, release=1) -> dict[str, str]:
    """sha256 -> filename of every file the release lists."""
    manifest = client.get(f"{API}/releases/{release}/manifest", headers=maintainer).json()
    return {f["sha256"]: f["filename"] for e in manifest["experts"] for f in e["files"]}


# --- a remote worker evaluates a release end to end ------------------------------------


def test_a_remote_worker_stores_exactly_what_the_local_worker_stores(
    app, client, maintainer, experts, live, worker_token, base_dir, tasks_dir, tmp_path
):
    create_release(client, maintainer, method="phatgoose", experts=["alice/a", "bob/b"])
    remote_job = _queue(client, maintainer)
    backend = _remote(live, worker_token, tmp_path / "cache")
    remote = Worker(backend, _options(base_dir, tasks_dir, worker_id="remote-1"))
    assert remote.run(once=True) == 1
    local_job = _queue(client, maintainer)
    assert Worker(
        DatabaseBackend(app.state.sessionmaker, app.state.blobs), _options(base_dir, tasks_dir)
    ).run(once=True)

    by_remote, by_local = _job(client, maintainer, remote_job), _job(client, maintainer, local_job)
    assert (by_remote["state"], by_remote["attempts"], by_remote["error"]) == ("done", 1, None)
    assert by_remote["worker_id"] == "gpu/remote-1"  # under its token's name
    kept = ("task", "accuracy", "stderr", "n", "evaluator_version", "precision", "routing_stats")
    assert [{k: r[k] for k in kept} for r in by_remote["results"]] == [
        {k: r[k] for k in kept} for r in by_local["results"]
    ]
    assert all(r["routing_stats"]["experts"] == ["alice/a", "bob/b"] for r in by_remote["results"])
    for task in TASKS:
        outcomes = [
            client.get(f"{API}/evaluations/{job}/outcomes/{task}", headers=maintainer).json()
            for job in (remote_job, local_job)
        ]
        assert outcomes[0]["predictions"] == outcomes[1]["predictions"]
        assert (outcomes[0]["correct"], outcomes[0]["choices"]) == (
            outcomes[1]["correct"],
            outcomes[1]["choices"],
        )


def test_the_cache_holds_verified_files_and_a_second_job_downloads_nothing(
    client, maintainer, experts, live, worker_token, base_dir, tasks_dir, tmp_path
):
    create_release(client, maintainer, method="phatgoose", experts=["alice/a", "bob/b"])
    jobs = [_queue(client, maintainer, tasks=["parity"]) for _ in range(2)]
    transport = Recording()
    backend = _remote(live, worker_token, tmp_path / "cache", transport)
    assert Worker(backend, _options(base_dir, tasks_dir)).run(once=True) == 2

    assert [_job(client, maintainer, j)["state"] for j in jobs] == ["done", "done"]
    files = _manifest_files(client, maintainer)
    # Each distinct file once, in the first job: the second job used the cache.
    assert sorted(transport.downloads()) == sorted(
        {f"GET {API}/experts/{ref}/files/{name}" for ref, name in _file_refs(client, maintainer)}
    )
    assert len(transport.downloads()) == len(files)
    cached = _cached_blobs(tmp_path / "cache")
    assert set(cached) == set(files)
    assert all(hashlib.sha256(data).hexdigest() == sha for sha, data in cached.items())
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    assert list((tmp_path / "cache" / "releases").iterdir()) == []  # job directories removed


def _file_refs(client, maintainer) -> list[tuple[str, str]]:
    """(namespace/name/version, filename) of the first listing of each distinct file."""
    manifest = client.get(f"{API}/releases/1/manifest", headers=maintainer).json()
    seen: dict[str, tuple[str, str]] = {}
    for entry in manifest["experts"]:
        ref = f"{entry['namespace']}/{entry['name']}/{entry['version']}"
        for file in entry["files"]:
            seen.setdefault(file["sha256"], (ref, file["filename"]))
    return list(seen.values())


def test_a_damaged_cached_file_is_fetched_again(
    client, maintainer, experts, live, worker_token, base_dir, tasks_dir, tmp_path
):
    create_release(client, maintainer, method="phatgoose", experts=["alice/a", "bob/b"])
    _queue(client, maintainer, tasks=["parity"])
    cache = tmp_path / "cache"
    assert Worker(_remote(live, worker_token, cache), _options(base_dir, tasks_dir)).run(once=True)
    sha, name = next(
        (sha, name)
        for sha, name in _manifest_files(client, maintainer).items()
        if "adapter" in name
    )
    damaged = cache / "blobs" / sha[:2] / sha[2:]
    damaged.write_bytes(b"not the adapter")
    job = _queue(client, maintainer, tasks=["parity"])
    transport = Recording()
    worker = Worker(_remote(live, worker_token, cache, transport), _options(base_dir, tasks_dir))
    assert worker.run(once=True) == 1
    assert _job(client, maintainer, job)["state"] == "done"
    assert [r.rsplit("/", 1)[-1] for r in transport.downloads()] == [name]
    assert hashlib.sha256(damaged.read_bytes()).hexdigest() == sha


def test_a_tampered_download_fails_with_the_file_named_and_is_never_cached(
    client, maintainer, experts, live, worker_token, base_dir, tasks_dir, tmp_path
):
    create_release(client, maintainer, method="phatgoose", experts=["alice/a", "bob/b"])
    job = _queue(client, maintainer, tasks=["parity"])
    transport = Recording(tamper="adapter_model.safetensors")
    backend = _remote(live, worker_token, tmp_path / "cache", transport)
    options = _options(base_dir, tasks_dir, max_attempts=1)
    assert Worker(backend, options).run(once=True) == 1

    body = _job(client, maintainer, job)
    assert (body["state"], body["results"]) == ("failed", [])
    assert body["error"].startswith(
        "CorruptDownload: alice/a@1 adapter_model.safetensors: the downloaded bytes have sha256"
    )
    adapters = {s for s, n in _manifest_files(client, maintainer).items() if "adapter_model" in n}
    assert adapters and not adapters & set(_cached_blobs(tmp_path / "cache"))
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


# --- hostile manifests -----------------------------------------------------------------


def _tamper_manifest(app, change) -> None:
    """Rewrite release 1's stored manifest, with a matching artifact digest (a hostile or
    broken coordinator): only the worker's own checks stand in the way."""
    with app.state.sessionmaker() as session:
        release = session.scalar(select(Release).where(Release.number == 1))
        manifest = json.loads(json.dumps(release.manifest))
        change(manifest)
        release.manifest = manifest
        release.artifact_digest = manifest_digest(manifest)
        session.commit()


def _set_path(path):
    def change(manifest):
        manifest["experts"][0]["path"] = path

    return change


def _set_filename(name):
    def change(manifest):
        manifest["experts"][0]["files"][0]["filename"] = name

    return change


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        (_set_path("experts/../../escape"), "path 'experts/../../escape' must be"),
        (_set_path("/tmp/escape"), "path '<path>' must be"),  # the public text is redacted
        (_set_path("experts/alice/a/1/../../../.."), "must be 'experts/alice/a/1'"),
        (_set_filename("../../escape.json"), "filename '../../escape.json' is not a package file"),
        (_set_filename("/tmp/escape.json"), "is not a package file"),
    ],
)
def test_a_manifest_naming_a_path_outside_the_release_is_refused_before_any_write(
    app,
    client,
    maintainer,
    experts,
    live,
    worker_token,
    base_dir,
    tasks_dir,
    tmp_path,
    change,
    refusal,
):
    create_release(client, maintainer, method="phatgoose", experts=["alice/a", "bob/b"])
    job = _queue(client, maintainer, tasks=["parity"])
    _tamper_manifest(app, change)
    transport = Recording()
    cache = tmp_path / "work" / "cache"
    backend = _remote(live, worker_token, cache, transport)
    assert Worker(backend, _options(base_dir, tasks_dir, max_attempts=1)).run(once=True) == 1

    body = _job(client, maintainer, job)
    assert body["state"] == "failed"
    assert body["error"].startswith("UnusableRelease: release 1: its manifest is refused")
    assert refusal in body["error"]
    assert transport.downloads() == []
    assert [p for p in (tmp_path / "work").rglob("*") if p.is_file()] == []
    assert not list(tmp_path.rglob("escape*"))


def test_a_manifest_that_is_not_the_release_s_artifact_is_refused(
    app, client, maintainer, experts, live, worker_token, base_dir, tasks_dir, tmp_path
):
    create_release(client, maintainer, method="phatgoose", experts=["alice/a", "bob/b"])
    job = _queue(client, maintainer, tasks=["parity"])
    with app.state.sessionmaker() as session:
        release = session.scalar(select(Release).where(Release.number == 1))
        release.manifest = {**release.manifest, "notes": "changed after the release was frozen"}
        session.commit()
    transport = Recording()
    backend = _remote(live, worker_token, tmp_path / "cache", transport)
    Worker(backend, _options(base_dir, tasks_dir, max_attempts=1)).run(once=True)
    body = _job(client, maintainer, job)
    assert body["state"] == "failed"
    assert body["error"].startswith("UnusableRelease: release 1: its manifest hashes to sha256:")
    assert transport.downloads() == []


@pytest.mark.parametrize(
    "path", ["../x", "/abs/x", "a/../../x", "a//b", "a\\b", ".", "a/./b", "a\x00b"]
)
def test_a_path_that_is_not_plain_names_is_refused_even_past_the_schema(tmp_path, path):
    with pytest.raises(UnusableRelease, match="would leave the release directory"):
        _inside(tmp_path, path, "alice/a@1")


def test_a_symbolic_link_out_of_the_release_directory_is_refused(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "experts").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(UnusableRelease, match="leads outside the release directory"):
        _inside(tmp_path / "root", "experts/x", "alice/a@1")
    assert _inside(tmp_path / "root", "a/b", "alice/a@1") == tmp_path / "root" / "a" / "b"


def test_a_killed_worker_s_leftovers_are_removed_when_a_cache_opens(tmp_path):
    cache = BlobCache(tmp_path / "cache")
    old_dir = cache.releases / "release-1-abc"
    (old_dir / "experts").mkdir(parents=True)
    old_tmp = cache.tmp / ".0123-partial"
    old_tmp.write_bytes(b"half a file")
    fresh = cache.releases / "release-2-def"
    fresh.mkdir()
    cached = cache.blobs / "ab" / ("c" * 62)
    cached.parent.mkdir()
    cached.write_bytes(b"verified")
    an_hour_ago = time.time() - 3601
    for path in (old_dir, old_tmp, cached):
        os.utime(path, (an_hour_ago, an_hour_ago))
    BlobCache(tmp_path / "cache")
    assert not old_dir.exists() and not old_tmp.exists()
    assert fresh.is_dir()  # maybe another worker's, loading now
    assert cached.read_bytes() == b"verified"  # the cache itself is kept


# --- leases over HTTP ------------------------------------------------------------------


@pytest.mark.slow
def test_two_remote_workers_never_run_the_same_job(
    client, maintainer, experts, live, worker_token, base_dir, tasks_dir, tmp_path
):
    create_release(client, maintainer, method="phatgoose", experts=["alice/a", "bob/b"])
    job_ids = [_queue(client, maintainer, tasks=["parity"]) for _ in range(4)]
    ended: dict[str, int] = {}

    def run(name: str) -> None:
        backend = _remote(live, worker_token, tmp_path / "cache")  # one cache, shared
        options = _options(base_dir, tasks_dir, worker_id=name, task_delay_seconds=0.2)
        ended[name] = Worker(backend, options).run(once=True)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("w1", "w2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    jobs = [_job(client, maintainer, i) for i in job_ids]
    assert [(j["state"], j["attempts"], len(j["results"])) for j in jobs] == [("done", 1, 1)] * 4
    assert ended["w1"] + ended["w2"] == 4
    assert {j["worker_id"] for j in jobs} <= {"gpu/w1", "gpu/w2"}


def test_a_remote_worker_that_lost_its_lease_stores_nothing_and_stops_the_job(
    app, client, maintainer, experts, live, worker, worker_token, base_dir, tasks_dir, tmp_path
):
    create_release(client, maintainer, method="phatgoose", experts=["alice/a", "bob/b"])
    job_id = _queue(client, maintainer)
    slow = Worker(
        _remote(live, worker_token, tmp_path / "cache"),
        _options(base_dir, tasks_dir, worker_id="slow"),
    )
    job = slow.claim()
    with app.state.sessionmaker() as session:  # its lease expires; another takes the job
        later = utcnow() + timedelta(hours=1)
        evaluations.claim_job(session, "thief", lease_seconds=60, now=later)
    assert slow.run_job(job) is False

    body = _job(client, maintainer, job_id)
    assert (body["state"], body["worker_id"], body["attempts"]) == ("running", "thief", 2)
    assert body["results"] == []
    late = client.post(
        f"{API}/evaluations/{job_id}/results", headers=worker, json=_result("parity", "slow")
    )
    assert late.status_code == 409
    assert (late.json()["detail"]["error"], late.json()["detail"]["check"]) == (
        "lease_lost",
        "lease",
    )


@pytest.mark.parametrize("override", [False, True])
def test_a_job_of_a_release_withdrawn_after_queuing_fails_at_once_unless_allowed(
    client, maintainer, live, worker_token, base_dir, tasks_dir, tmp_path, override
):
    create_release(client, maintainer, method="base", base_model="tiny")
    job = _queue(client, maintainer, tasks=["parity"], allow_withdrawn=override)
    withdrawn = client.post(
        f"{API}/releases/1/withdraw", headers=maintainer, json={"reason": "poisoned"}
    )
    assert withdrawn.status_code == 200, withdrawn.text
    transport = Recording()
    backend = _remote(live, worker_token, tmp_path / "cache", transport)
    assert Worker(backend, _options(base_dir, tasks_dir)).run(once=True) == 1

    body = _job(client, maintainer, job)
    if override:
        assert (body["state"], [r["task"] for r in body["results"]]) == ("done", ["parity"])
    else:
        assert (body["state"], body["attempts"], body["results"]) == ("failed", 1, [])
        assert body["error"].startswith("CuratedOut: release 1 is withdrawn (poisoned)")
        assert transport.requests == [  # no file fetched: the lease said it at once
            f"POST {API}/channels/advance",  # each poll advances the release channels
            f"POST {API}/evaluations/lease",
            f"POST {API}/evaluations/{job}/fail",
            f"POST {API}/channels/advance",
            f"POST {API}/evaluations/lease",  # nothing left: the run ends
        ]


# --- the job API -----------------------------------------------------------------------


def _lease(client, headers, worker_id="w1", **extra):
    body = {"worker_id": worker_id, "lease_seconds": 60, "max_attempts": 3, **extra}
    return client.post(f"{API}/evaluations/lease", headers=headers, json=body)


def _result(task, worker_id="w1", **extra) -> dict:
    body = {
        "worker_id": worker_id,
        "task": task,
        "accuracy": 0.5,
        "stderr": 0.2,
        "n": 4,
        "evaluator_version": "test+0",
        "seconds": 0.5,
        "routing_stats": None,
        "precision": "float32",
        "outcomes": {"predictions": [0, 1, 1, 0], "correct": [True, False, True, False]},
    }
    return {**body, **extra}


@pytest.fixture
def base_release(client, maintainer):
    create_release(client, maintainer, method="base", base_model="tiny")


def test_the_lease_reply_carries_spec_done_tasks_manifest_and_its_digest(
    app, client, maintainer, worker, base_release
):
    assert _lease(client, worker).status_code == 204  # nothing queued
    job_id = _queue(client, maintainer, tasks=["parity", "sums"], seed=7)
    with app.state.sessionmaker() as session:  # an earlier attempt scored parity
        evaluations.claim_job(session, "earlier", lease_seconds=60)
        score = evaluations.TaskScore("parity", 0.5, 0.2, 4, "old", 1.0, None)
        evaluations.record_result(session, job_id, "earlier", score)
        evaluations.fail_attempt(session, job_id, "earlier", "interrupted")

    response = _lease(client, worker)
    assert response.status_code == 200, response.text
    lease = response.json()
    manifest = client.get(f"{API}/releases/1/manifest", headers=worker).json()
    assert (lease["id"], lease["release"], lease["attempts"]) == (job_id, 1, 2)
    assert (lease["worker_id"], lease["done_tasks"], lease["curation_error"]) == (
        "gpu/w1",
        ["parity"],
        None,
    )
    assert lease["spec"]["tasks"] == ["parity", "sums"] and lease["spec"]["seed"] == 7
    assert lease["manifest"] == manifest
    assert lease["artifact_digest"] == manifest_digest(manifest)
    assert _lease(client, worker, worker_id="w2").status_code == 204  # leased to w1


def test_heartbeat_keeps_the_lease_until_another_worker_takes_it_over(
    app, client, maintainer, worker, base_release
):
    job_id = _queue(client, maintainer)
    assert _lease(client, worker).status_code == 200
    beat = {"worker_id": "w1", "lease_seconds": 60}
    response = client.post(f"{API}/evaluations/{job_id}/heartbeat", headers=worker, json=beat)
    assert (response.status_code, response.json()) == (200, {"alive": True})
    with app.state.sessionmaker() as session:
        evaluations.claim_job(session, "thief", lease_seconds=60, now=utcnow() + timedelta(hours=1))
    response = client.post(f"{API}/evaluations/{job_id}/heartbeat", headers=worker, json=beat)
    assert response.status_code == 409
    assert response.json()["detail"]["error"] == "lease_lost"


def test_a_lease_is_bound_to_the_token_that_took_it(app, client, maintainer, worker, base_release):
    """Job rows show worker ids in public: knowing one must not let another token act."""
    job_id = _queue(client, maintainer)
    assert _lease(client, worker).status_code == 200
    other = bearer_headers(app, "gpu-2", Role.WORKER)
    beat = {"worker_id": "w1", "lease_seconds": 60}
    response = client.post(f"{API}/evaluations/{job_id}/heartbeat", headers=other, json=beat)
    assert response.status_code == 409
    done = client.post(
        f"{API}/evaluations/{job_id}/complete", headers=other, json={"worker_id": "w1"}
    )
    assert done.status_code == 409
    assert _job(client, maintainer, job_id)["state"] == "running"


def test_results_complete_and_fail_go_through_the_lease_rules(
    client, maintainer, worker, base_release
):
    job_id = _queue(client, maintainer)
    _lease(client, worker)
    stored = client.post(
        f"{API}/evaluations/{job_id}/results", headers=worker, json=_result("parity")
    )
    assert (stored.status_code, stored.json()["task"]) == (201, "parity")
    again = client.post(
        f"{API}/evaluations/{job_id}/results", headers=worker, json=_result("parity")
    )
    assert (again.status_code, again.json()["detail"]["error"]) == (409, "result_exists")
    done = client.post(
        f"{API}/evaluations/{job_id}/complete", headers=worker, json={"worker_id": "w1"}
    )
    assert (done.status_code, done.json()["state"]) == (200, "done")
    assert [r["task"] for r in done.json()["results"]] == ["parity"]
    # The same worker completing again (its first answer lost): still done, no error.
    retried = client.post(
        f"{API}/evaluations/{job_id}/complete", headers=worker, json={"worker_id": "w1"}
    )
    assert (retried.status_code, retried.json()["state"]) == (200, "done")
    late = client.post(
        f"{API}/evaluations/{job_id}/fail", headers=worker, json={"worker_id": "w1", "error": "x"}
    )
    assert (late.status_code, late.json()["detail"]["error"]) == (409, "lease_lost")


@pytest.mark.parametrize(("final", "state"), [(False, "queued"), (True, "failed")])
def test_a_failed_attempt_is_requeued_unless_final(
    client, maintainer, worker, base_release, final, state
):
    job_id = _queue(client, maintainer)
    _lease(client, worker)
    error = "InvalidTaskName: not a task name: '/home/w/x'"
    body = {"worker_id": "w1", "error": error, "final": final}
    response = client.post(f"{API}/evaluations/{job_id}/fail", headers=worker, json=body)
    assert response.status_code == 200, response.text
    assert (response.json()["state"], response.json()["attempts"]) == (state, 1)
    assert response.json()["error"] == "InvalidTaskName: not a task name: '<path>'"


def _stats(experts: int, layers: int) -> dict:
    return {
        "format": 1,
        "method": "phatgoose",
        "top_k": 2,
        "experts": [f"namespace-{e:03d}/expert-with-a-long-name-{e:03d}" for e in range(experts)],
        "layers": [f"model.layers.{layer}" for layer in range(layers)],
        "frequencies": [[round(1 / experts, 6)] * layers for _ in range(experts)],
        "selections": [123_456] * layers,
        "overall": [round(1 / experts, 6)] * experts,
    }


def test_a_realistic_result_fits_the_request_body_limit_and_is_stored_as_sent(
    app, client, maintainer, worker, base_release
):
    """300 outcomes and routing statistics of 166 experts x 30 layers: about 65 KB, well
    under the default 1 MiB body limit, so the results route needs no exemption from it."""
    job_id = _queue(client, maintainer)
    _lease(client, worker)
    n = 300
    outcomes = {
        "predictions": [i % 4 for i in range(n)],
        "correct": [i % 4 == 0 for i in range(n)],
        "choices": [4] * n,
    }
    body = _result("parity", n=n, accuracy=0.25, outcomes=outcomes, routing_stats=_stats(166, 30))
    assert len(json.dumps(body)) < app.state.settings.max_request_body_bytes / 8
    response = client.post(f"{API}/evaluations/{job_id}/results", headers=worker, json=body)
    assert response.status_code == 201, response.text
    with app.state.sessionmaker() as session:
        (stored,) = evaluations.job_results(session, job_id)
        assert stored.routing_stats == body["routing_stats"]
        assert stored.outcomes == {"format": 1, **outcomes}


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"accuracy": 1.5}, "accuracy"),
        ({"n": 0}, "'n'"),
        ({"stderr": -0.1}, "stderr"),
        ({"evaluator_version": "v 1"}, "evaluator_version"),
        ({"precision": "float64"}, "precision"),
        ({"worker_id": "w/1"}, "worker_id"),
        ({"worker_id": "x" * 101}, "worker_id"),
        ({"outcomes": {"predictions": [0, 1], "correct": [True, False]}}, "outcomes.predictions"),
        ({"outcomes": {"predictions": [0, 1, 1, 0], "correct": [1, 0, 1, 0]}}, "correct"),
        ({"routing_stats": {**_stats(3, 2), "overall": [0.5, 0.5]}}, "overall must hold"),
        ({"routing_stats": {**_stats(3, 2), "frequencies": [[2.0, 0], [0, 0], [0, 0]]}}, "freq"),
        ({"task": "../parity"}, "not a task name"),
        ({"task": "hyperbaton"}, "evaluation 1 has no task 'hyperbaton'"),
    ],
)
def test_a_result_that_does_not_hold_together_is_refused_with_422(
    client, maintainer, worker, base_release, change, where
):
    job_id = _queue(client, maintainer)
    _lease(client, worker)
    body = {**_result("parity"), **change}
    response = client.post(f"{API}/evaluations/{job_id}/results", headers=worker, json=body)
    assert response.status_code == 422, response.text
    assert where in json.dumps(response.json()["detail"])
    assert _job(client, maintainer, job_id)["results"] == []


@pytest.mark.parametrize(
    "body",
    [
        {"worker_id": "w1", "lease_seconds": 1, "max_attempts": 3},
        {"worker_id": "w1", "lease_seconds": MAX_LEASE_SECONDS + 1, "max_attempts": 3},
        {"worker_id": "w1", "lease_seconds": 60, "max_attempts": 0},
        {"worker_id": "a b", "lease_seconds": 60, "max_attempts": 3},
        {"worker_id": "w1", "lease_seconds": 60},
    ],
)
def test_a_lease_request_out_of_bounds_is_refused(client, worker, body):
    response = client.post(f"{API}/evaluations/lease", headers=worker, json=body)
    assert response.status_code == 422, response.text


def test_every_worker_route_is_documented(client, maintainer):
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "lease",
        "{job_id}/heartbeat",
        "{job_id}/results",
        "{job_id}/complete",
        "{job_id}/fail",
    ):
        route = paths[f"{API}/evaluations/{path}"]["post"]
        assert route["summary"]
        assert "409" in route["responses"] or path == "lease"
    assert "204" in paths[f"{API}/evaluations/lease"]["post"]["responses"]


# --- roles -----------------------------------------------------------------------------


def test_a_worker_token_can_do_nothing_but_read_download_and_run_jobs(
    app, client, maintainer, alice, experts, tiny_base, tmp_path
):
    # A worker labelled like a contributor: the label owns nothing.
    worker = bearer_headers(app, "alice", Role.WORKER)
    create_release(client, maintainer, method="phatgoose", experts=["alice/a", "bob/b"])
    tiny_base.write_package(tmp_path / "c", "alice/c")
    files = [("files", (p.name, p.read_bytes())) for p in sorted((tmp_path / "c").iterdir())]
    writes = [
        ("POST", f"{API}/experts", {"files": files}),
        ("POST", f"{API}/releases", {"json": {"method": "phatgoose", "experts": ["alice/a"]}}),
        (
            "POST",
            f"{API}/evaluations",
            {"json": {"release": 1, "tasks": ["t"], "examples_per_task": 2}},
        ),
        ("POST", f"{API}/experts/alice/a/1/yank", {"json": {"reason": "mine?"}}),
        ("POST", f"{API}/experts/alice/a/1/unyank", {}),
        ("POST", f"{API}/releases/1/withdraw", {"json": {"reason": "x"}}),
        ("POST", f"{API}/base-models", {"json": tiny_base.spec.model_dump(mode="json")}),
        ("POST", f"{API}/experts/alice/a/block", {"json": {"reason": "x"}}),
        ("GET", f"{API}/admin/startup-report", {}),
    ]
    for method, path, kwargs in writes:
        response = client.request(method, path, headers=worker, **kwargs)
        assert response.status_code == 403, (path, response.text)
        assert "'alice' is a worker" in response.json()["detail"]["message"], path
    assert (
        client.get(f"{API}/experts/alice/a/1", headers=maintainer).json()["yank"]["yanked"] is False
    )

    me = client.get(f"{API}/auth/me", headers=worker).json()
    assert (me["name"], me["role"]) == ("alice", "worker")
    reads = [
        f"{API}/releases/1/manifest",
        f"{API}/experts/alice/a/1/files/adapter_model.safetensors",
        f"{API}/evaluations",
        "/leaderboard",
    ]
    for path in reads:  # public_read is off: the worker token reads
        assert client.get(path).status_code == 401
        assert client.get(path, headers=worker).status_code == 200, path


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "lease", {"worker_id": "w1", "lease_seconds": 60, "max_attempts": 3}),
        ("POST", "1/heartbeat", {"worker_id": "w1", "lease_seconds": 60}),
        ("POST", "1/results", _result("parity")),
        ("POST", "1/complete", {"worker_id": "w1"}),
        ("POST", "1/fail", {"worker_id": "w1", "error": "x"}),
    ],
)
def test_worker_routes_refuse_contributors_with_403_and_no_token_with_401(
    client, alice, maintainer, base_release, method, path, body
):
    _queue(client, maintainer)
    url = f"{API}/evaluations/{path}"
    refused = client.request(method, url, headers=alice, json=body)
    assert refused.status_code == 403
    assert refused.json()["detail"]["message"] == (
        "this needs a worker or maintainer token; 'alice' is a contributor"
    )
    assert client.request(method, url, json=body).status_code == 401
    assert _job(client, maintainer, 1)["state"] == "queued"


def test_a_maintainer_token_runs_jobs_too(client, maintainer, base_release):
    _queue(client, maintainer)
    assert _lease(client, maintainer).json()["worker_id"] == "carol/w1"


def test_a_worker_token_owns_no_namespace(app):
    with app.state.sessionmaker() as session:
        worker = create_token(session, name="gpu", role=Role.WORKER).token
        # The label leaves the namespace free for a contributor, without --same-owner.
        contributor = create_token(session, name="gpu", role=Role.CONTRIBUTOR).token
    assert not worker.can_manage("gpu") and contributor.can_manage("gpu")


def test_create_token_makes_a_worker_token(settings):
    args = ["--data-dir", str(settings.data_dir), "--database-url", settings.database_url]
    result = CliRunner().invoke(cli, ["create-token", "--name", "gpu-1", "--role", "worker", *args])
    assert result.exit_code == 0, result.output
    assert "gpu-1 (worker" in result.output
    help_text = _plain(CliRunner().invoke(cli, ["create-token", "--help"]).output)
    assert "worker: lease and report evaluation jobs" in help_text
    assert "A worker token's NAME is only a label" in help_text


# --- the HTTP client: retries, refusals, set-up ----------------------------------------


def _mock_backend(tmp_path, answers, waits=None) -> tuple[HttpBackend, list[str]]:
    """A backend on a transport answering from `answers` (exceptions or responses)."""
    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    client = connect(
        "http://127.0.0.1:1",
        "phg_0123456789abcdef_secret-secret-secret",
        transport=httpx.MockTransport(handle),
    )
    recorder = waits.append if waits is not None else (lambda _s: None)
    retry = RetryPolicy(attempts=3, backoff_seconds=1.0)
    return HttpBackend(client, tmp_path / "cache", retry=retry, sleep=recorder), seen


def test_transient_failures_are_retried_with_backoff_and_retry_after(tmp_path):
    waits: list[float] = []
    answers = [
        httpx.ConnectError("refused"),
        httpx.Response(429, headers={"Retry-After": "7"}, json={"detail": {"message": "slow"}}),
        httpx.Response(204),
    ]
    backend, seen = _mock_backend(tmp_path, answers, waits)
    assert backend.claim("w1", lease_seconds=60, max_attempts=3) is None
    assert waits == [1.0, 7.0]
    assert seen == [f"{API}/evaluations/lease"] * 3


def test_a_coordinator_down_for_every_try_is_unavailable(tmp_path):
    answers = [httpx.Response(503, text="down")] * 3
    backend, _ = _mock_backend(tmp_path, answers)
    with pytest.raises(CoordinatorUnavailable, match=r"HTTP 503: down \(after 3 tries\)"):
        backend.claim("w1", lease_seconds=60, max_attempts=3)


@pytest.mark.parametrize(
    ("status", "message"), [(401, "refused the worker token"), (403, "refused this token")]
)
def test_a_refused_token_stops_the_worker_at_once(tmp_path, status, message):
    answers = [httpx.Response(status, json={"detail": {"message": "no"}})]
    backend, seen = _mock_backend(tmp_path, answers)
    with pytest.raises(WorkerStopped, match=message):
        Worker(backend, WorkerOptions(poll_seconds=0.01)).run()
    assert len(seen) == 1


def test_a_lost_lease_on_a_result_is_lease_lost(tmp_path):
    lost = httpx.Response(409, json={"detail": {"error": "lease_lost", "message": "gone"}})
    backend, _ = _mock_backend(tmp_path, [lost])
    score = evaluations.TaskScore("parity", 0.5, 0.2, 4, "v", 1.0, None)
    with pytest.raises(evaluations.LeaseLost, match="gone"):
        backend.record_result(1, "w1", score)


def test_the_token_check_names_what_is_wrong(tmp_path):
    contributor = httpx.Response(200, json={"name": "alice", "role": "contributor"})
    backend, _ = _mock_backend(tmp_path, [contributor])
    with pytest.raises(WorkerStopped, match="'alice' is a contributor token; a worker needs"):
        backend.check_token()


@pytest.mark.parametrize(
    ("url", "token", "message"),
    [
        ("ftp://coordinator.example", "phg_x_y", "expected the coordinator's base URL"),
        ("https://user:pw@coordinator.example", "phg_x_y", "no user or password"),
        ("https://coordinator.example?x=1", "phg_x_y", "expected the coordinator's base URL"),
        ("https://coordinator.example", "  ", "empty"),
    ],
)
def test_connect_refuses_what_cannot_work(url, token, message):
    with pytest.raises(WorkerSetupError, match=message):
        connect(url, token)


def test_remote_options_follow_the_job_api_bounds():
    check_remote_options(WorkerOptions(worker_id="worker-1-abc", lease_seconds=120))
    with pytest.raises(WorkerSetupError, match="worker id 'a/b'"):
        check_remote_options(WorkerOptions(worker_id="a/b"))
    with pytest.raises(WorkerSetupError, match="lease of 1 s"):
        check_remote_options(WorkerOptions(lease_seconds=1))


# --- the command line ------------------------------------------------------------------


def test_cli_remote_worker_reads_its_token_from_a_file(
    client, maintainer, live, worker_token, base_dir, tasks_dir, tmp_path
):
    create_release(client, maintainer, method="base", base_model="tiny")
    job = _queue(client, maintainer, tasks=["parity"])
    token_file = tmp_path / "token"
    token_file.write_text(worker_token + "\n")
    token_file.chmod(0o600)
    args = ["worker", "--once", "--url", live, "--token-file", str(token_file)]
    args += ["--cache-dir", str(tmp_path / "cache"), "--worker-id", "cli-1"]
    args += ["--tasks-dir", str(tasks_dir), "--base-model", f"tiny={base_dir}"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "1 job(s) ended" in result.output
    assert worker_token not in result.output
    body = _job(client, maintainer, job)
    assert (body["state"], body["worker_id"]) == ("done", "gpu/cli-1")


def test_cli_remote_worker_with_a_revoked_token_stops_with_the_reason(app, live, tmp_path):
    with app.state.sessionmaker() as session:
        issued = create_token(session, name="gpu", role=Role.WORKER)
        session.scalar(select(Token).where(Token.id == issued.token.id)).revoked_at = utcnow()
        session.commit()
    args = ["worker", "--once", "--url", live, "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(cli, args, env={"PHATGOOSE_WORKER_TOKEN": issued.secret_token})
    assert result.exit_code == 1
    assert "worker stopped" in result.output and "refused the worker token" in result.output
    assert issued.secret_token not in result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--url", "https://c.example", "--data-dir", "x"], "has no database"),
        (["--token-file", "t"], "are for a remote worker"),
        (["--url", "https://c.example"], "needs its token"),
    ],
)
def test_cli_worker_refuses_mixed_modes_and_a_missing_token(extra, message, monkeypatch):
    monkeypatch.delenv("PHATGOOSE_WORKER_TOKEN", raising=False)
    result = CliRunner().invoke(cli, ["worker", "--once", *extra])
    assert result.exit_code == 2
    assert message in _plain(result.output)


def test_cli_worker_help_explains_both_modes():
    text = _plain(CliRunner().invoke(cli, ["worker", "--help"]).output)
    for part in ("--url", "--token-file", "PHATGOOSE_WORKER_TOKEN", "--cache-dir", "Local"):
        assert part in text


def _plain(output: str) -> str:
    """Typer's help and errors without their boxes, one space between words."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())

"""Credit for contributors (issue 19, section 4): each expert's leave-one-out contribution to
a release. A leave-one-out job is an evaluation of the release without one expert; it
stores what the library computes over the other experts, never counts as the release's
scores, and its paired difference with the full evaluation is exactly what the comparison
of the two jobs gives."""

from __future__ import annotations

import re
import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient

from coordinator.auth.models import Role
from coordinator.base_models.service import register_base_model
from coordinator.core.config import Settings
from coordinator.leaderboard import comparisons
from coordinator.worker import DatabaseBackend, Worker, WorkerOptions, routing_summary
from coordinator.worker_http import HttpBackend, RetryPolicy, connect
from phatgoose.bigbench import load_bigbench_task
from phatgoose.evaluation import evaluate_task
from phatgoose.expert import Expert
from phatgoose.models import load_base_model
from phatgoose.paired import paired_difference, paired_mean_difference
from phatgoose.routing import build_routed_model, capture_routing
from tests.coordinator.helpers import bearer_headers, live_server
from tests.coordinator.release_helpers import WORKER_TASKS, create_release, publish

TASKS = WORKER_TASKS  # the tasks of the `tasks_dir` fixture
GROUPS = {"held_in": ["parity"], "held_out": ["sums"]}
EXAMPLES = 6
REFS = ["alice/a@1", "bob/b@1", "bob/c@1"]
API = "/api/v1"


@pytest.fixture
def experts(client, alice, bob, tiny_base, tmp_path) -> dict[str, Expert]:
    """Three experts of two contributors, by ref."""
    found = {}
    for ref, headers, seed in zip(REFS, (alice, bob, bob), range(3), strict=True):
        name = ref.split("@")[0]
        publish(client, headers, tiny_base, tmp_path / name, name, seed=seed)
        expert = Expert.load(tmp_path / name)
        expert.manifest = expert.manifest.model_copy(update={"name": name})
        found[ref] = expert
    return found


@pytest.fixture
def release(client, maintainer, experts) -> int:
    body = create_release(client, maintainer, method="phatgoose", experts=[*experts])
    assert body["top_k"] == 2
    return body["number"]


def _own_coordinator(make_app, settings, tiny_base, tmp_path, **update):
    """A coordinator with its own settings, the three experts and release 1 over them."""
    app = make_app(settings.model_copy(update=update))
    with app.state.sessionmaker() as session:
        register_base_model(session, tiny_base.spec)
    client = TestClient(app)
    maintainer = bearer_headers(app, "ops", Role.MAINTAINER)
    contributors = {who: bearer_headers(app, who, Role.CONTRIBUTOR) for who in ("alice", "bob")}
    for seed, ref in enumerate(REFS):
        name = ref.split("@")[0]
        publish(
            client, contributors[name.split("/")[0]], tiny_base, tmp_path / name, name, seed=seed
        )
    create_release(client, maintainer, method="phatgoose", experts=REFS)
    return app, client, maintainer


def _options(base_dir, tasks_dir, **kwargs) -> WorkerOptions:
    return WorkerOptions(
        base_models={"tiny": str(base_dir)}, tasks_dir=tasks_dir, poll_seconds=0.05, **kwargs
    )


def _run_all(app, base_dir, tasks_dir, **kwargs) -> int:
    worker = Worker(
        DatabaseBackend(app.state.sessionmaker, app.state.blobs),
        _options(base_dir, tasks_dir, **kwargs),
    )
    return worker.run(once=True)


def _spec(tasks=TASKS, **extra) -> dict:
    groups = {group: [t for t in names if t in tasks] for group, names in GROUPS.items()}
    return {"tasks": list(tasks), "examples_per_task": EXAMPLES, "task_groups": groups, **extra}


def _queue(client, maintainer, release, **extra):
    response = client.post(
        f"{API}/evaluations", headers=maintainer, json={"release": release, **_spec(), **extra}
    )
    return response


def _credit(client, maintainer, release, **spec):
    return client.post(f"{API}/releases/{release}/credit", headers=maintainer, json=_spec(**spec))


def _direct(base_dir, tasks_dir, experts, task):
    """The library's own evaluation of the release's method over `experts`."""
    model, tokenizer = load_base_model(str(base_dir))
    build_routed_model(model, experts, method="phatgoose", top_k=2)
    split = load_bigbench_task(task, n_eval=EXAMPLES, seed=0, tasks_dir=tasks_dir)
    with capture_routing(model) as stats:
        result = evaluate_task(model, tokenizer, split.evaluation, task=task, progress=False)
    return result, routing_summary(stats, "phatgoose")


def _outcomes(client, job_id, task) -> tuple[bool, ...]:
    return tuple(client.get(f"{API}/evaluations/{job_id}/outcomes/{task}").json()["correct"])


# --- the worker --------------------------------------------------------------------------


def test_a_leave_one_out_job_stores_what_the_library_computes_without_that_expert(
    app, client, maintainer, experts, release, base_dir, tasks_dir
):
    response = _queue(client, maintainer, release, leave_out="bob/b@1")
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    assert response.json()["spec"]["leave_out"] == "bob/b@1"
    assert _run_all(app, base_dir, tasks_dir) == 1

    body = client.get(f"{API}/evaluations/{job_id}").json()
    assert (body["state"], body["error"]) == ("done", None)
    others = [experts["alice/a@1"], experts["bob/c@1"]]
    for stored, task in zip(body["results"], TASKS, strict=True):
        direct, routing = _direct(base_dir, tasks_dir, others, task)
        assert (stored["task"], stored["accuracy"], stored["stderr"], stored["n"]) == (
            task,
            direct.accuracy,
            direct.stderr,
            EXAMPLES,
        )
        assert stored["routing_stats"] == routing
        assert stored["routing_stats"]["experts"] == ["alice/a", "bob/c"]
        outcomes = client.get(f"{API}/evaluations/{job_id}/outcomes/{task}").json()
        assert outcomes["predictions"] == list(direct.predictions)
        assert outcomes["correct"] == list(direct.correct)


def test_a_remote_worker_runs_a_leave_one_out_job_as_the_local_one_does(
    make_app, settings, tiny_base, base_dir, tasks_dir, tmp_path
):
    app, client, maintainer = _own_coordinator(
        make_app, settings, tiny_base, tmp_path, public_read=False
    )
    remote_job = _queue(client, maintainer, 1, leave_out="alice/a@1").json()["id"]
    worker_token = bearer_headers(app, "gpu", Role.WORKER)["Authorization"].split()[1]
    with live_server(app) as url:
        backend = HttpBackend(
            connect(url, worker_token), tmp_path / "cache", retry=RetryPolicy(3, 0.0)
        )
        assert Worker(backend, _options(base_dir, tasks_dir, worker_id="r1")).run(once=True) == 1
    local_job = _queue(client, maintainer, 1, leave_out="alice/a@1").json()["id"]
    assert _run_all(app, base_dir, tasks_dir) == 1

    jobs = [
        client.get(f"{API}/evaluations/{j}", headers=maintainer).json()
        for j in (remote_job, local_job)
    ]
    assert [job["state"] for job in jobs] == ["done", "done"]
    kept = ("task", "accuracy", "stderr", "n", "routing_stats")
    remote, local = ([{k: r[k] for k in kept} for r in job["results"]] for job in jobs)
    assert remote == local
    assert all(r["routing_stats"]["experts"] == ["bob/b", "bob/c"] for r in remote)


# --- the credit ----------------------------------------------------------------------------


def test_credit_is_the_paired_difference_full_minus_without_each_expert(
    app, client, maintainer, experts, release, base_dir, tasks_dir
):
    comparisons.STATISTICS.clear()
    queued = _credit(client, maintainer, release)
    assert queued.status_code == 201, queued.text
    ids = queued.json()
    assert set(ids["leave_out_jobs"]) == set(REFS)
    assert _run_all(app, base_dir, tasks_dir) == 4

    credit = client.get(f"{API}/releases/{release}/credit").json()
    full = ids["full_job"]
    assert (credit["full_job"], credit["full_state"]) == (full, "done")
    assert credit["spec"] == {"tasks": sorted(TASKS), "examples_per_task": EXAMPLES, "seed": 0}
    full_results = client.get(f"{API}/evaluations/{full}").json()["results"]
    settings: dict[str, Any] = {"resamples": comparisons.RESAMPLES, "confidence": 0.95, "seed": 0}
    for entry in credit["experts"]:
        ref, job = entry["ref"], ids["leave_out_jobs"][entry["ref"]]
        assert (entry["state"], entry["job_id"]) == ("done", job)
        assert entry["namespace"] == ref.split("/")[0]
        name = ref.split("@")[0]
        shares = [
            r["routing_stats"]["overall"][r["routing_stats"]["experts"].index(name)]
            for r in full_results
        ]
        assert entry["routing_share"] == pytest.approx(sum(shares) / len(shares))
        pairs = {
            task: (_outcomes(client, full, task), _outcomes(client, job, task)) for task in TASKS
        }
        for delta in entry["tasks"]:
            direct = paired_difference(*pairs[delta["task"]], **settings)
            assert delta["difference"] == direct.to_dict()
            assert delta["difference"]["delta"] == pytest.approx(delta["a"] - delta["b"])
        held_in = paired_mean_difference({"parity": pairs["parity"]}, **settings)
        held_out = paired_mean_difference({"sums": pairs["sums"]}, **settings)
        everything = paired_mean_difference(pairs, **settings)
        assert entry["means"]["held_in"]["difference"] == held_in.to_dict()
        assert entry["means"]["held_out"]["difference"] == held_out.to_dict()
        assert entry["means"]["all"]["difference"] == everything.to_dict()
        # Full minus without: positive when the release does better with the expert.
        accuracy = {r["task"]: r["accuracy"] for r in full_results}
        without = {
            r["task"]: r["accuracy"]
            for r in client.get(f"{API}/evaluations/{job}").json()["results"]
        }
        assert everything.delta == pytest.approx(
            sum(accuracy.values()) / 2 - sum(without.values()) / 2
        )
        # The very numbers of the comparison of the two jobs.
        compared = client.get(
            "/leaderboard/compare",
            params={"a": release, "b": release, "a_job": full, "b_job": job},
        ).json()
        assert compared["means"] == entry["means"] and compared["tasks"] == entry["tasks"]


def test_credit_says_the_state_of_jobs_not_yet_finished(
    app, client, maintainer, experts, release, base_dir, tasks_dir
):
    nothing = client.get(f"{API}/releases/{release}/credit").json()
    assert (nothing["full_job"], nothing["full_state"]) == (None, "missing")
    assert [e["state"] for e in nothing["experts"]] == ["missing"] * 3
    queued = _credit(client, maintainer, release).json()
    credit = client.get(f"{API}/releases/{release}/credit").json()
    assert credit["full_state"] == "queued"
    assert [(e["state"], e["job_id"], e["means"]) for e in credit["experts"]] == [
        ("queued", queued["leave_out_jobs"][ref], {}) for ref in REFS
    ]
    other = client.get(f"{API}/releases/{release}/credit", params={"seed": 7}).json()
    assert other["full_job"] is None and "filters" in other["reason"]


def test_posting_credit_twice_queues_nothing_new(
    app, client, maintainer, experts, release, base_dir, tasks_dir
):
    first = _credit(client, maintainer, release)
    assert first.status_code == 201
    assert len(first.json()["queued"]) == 4  # the full evaluation and 3 leave-one-out ones
    again = _credit(client, maintainer, release)
    assert again.status_code == 200
    assert again.json()["queued"] == []
    assert {k: again.json()[k] for k in ("full_job", "leave_out_jobs")} == {
        k: first.json()[k] for k in ("full_job", "leave_out_jobs")
    }
    total = client.get(f"{API}/evaluations").headers["X-Total-Count"]
    assert total == "4"
    # Another spec is another experiment.
    other = _credit(client, maintainer, release, seed=1)
    assert other.status_code == 201 and len(other.json()["queued"]) == 4


def test_a_failed_leave_one_out_job_is_queued_again(app, client, maintainer, experts, release):
    first = _credit(client, maintainer, release).json()
    with app.state.sessionmaker() as session:
        from coordinator.evaluations.models import EvaluationJob

        session.get(EvaluationJob, first["leave_out_jobs"]["bob/b@1"]).state = "failed"
        session.commit()
    again = _credit(client, maintainer, release).json()
    assert len(again["queued"]) == 1
    assert again["leave_out_jobs"]["bob/b@1"] == again["queued"][0]


def test_two_workers_run_each_credit_job_once(
    app, client, maintainer, experts, release, base_dir, tasks_dir
):
    ids = _credit(client, maintainer, release, tasks=["parity"]).json()["queued"]
    ended: dict[str, int] = {}

    def run(name: str) -> None:
        ended[name] = _run_all(app, base_dir, tasks_dir, worker_id=name, task_delay_seconds=0.1)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("w1", "w2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    jobs = [client.get(f"{API}/evaluations/{i}").json() for i in ids]
    assert [(j["state"], j["attempts"], len(j["results"])) for j in jobs] == [("done", 1, 1)] * 4
    assert ended["w1"] + ended["w2"] == 4


@pytest.mark.parametrize(("max_experts", "queued"), [(3, 3), (2, 0), (0, 0)])
def test_auto_credit_queues_leave_one_out_jobs_for_small_releases_only(
    make_app, settings, tiny_base, tmp_path, max_experts, queued
):
    _, client, maintainer = _own_coordinator(
        make_app, settings, tiny_base, tmp_path, auto_credit_max_experts=max_experts
    )
    response = _queue(client, maintainer, 1)
    assert response.status_code == 201
    jobs = client.get(f"{API}/evaluations").json()
    assert len(jobs) == 1 + queued
    assert sorted(j["spec"].get("leave_out") or "" for j in jobs[1:]) == (REFS if queued else [])
    header = response.headers.get("X-Credit-Jobs")
    assert header == (",".join(str(j["id"]) for j in jobs[1:]) if queued else None)
    # Queued with the evaluation: posting the credit on its spec queues nothing more.
    if queued:
        assert _credit(client, maintainer, 1).status_code == 200


def test_auto_credit_is_on_for_up_to_8_experts_by_default(monkeypatch):
    monkeypatch.delenv("PHATGOOSE_AUTO_CREDIT_MAX_EXPERTS")
    assert Settings().auto_credit_max_experts == 8
    monkeypatch.setenv("PHATGOOSE_AUTO_CREDIT_MAX_EXPERTS", "0")
    assert Settings().auto_credit_max_experts == 0


# --- what never counts -------------------------------------------------------------------


def test_leave_one_out_jobs_change_neither_the_leaderboard_nor_the_release_s_scores(
    app, client, maintainer, experts, release, base_dir, tasks_dir
):
    assert _queue(client, maintainer, release).status_code == 201
    assert _run_all(app, base_dir, tasks_dir) == 1
    before = (
        client.get("/leaderboard").json(),
        client.get(f"{API}/releases/{release}").json()["scores"],
    )
    assert before[1]["tasks"]  # scored
    assert _credit(client, maintainer, release).status_code == 201
    assert _run_all(app, base_dir, tasks_dir) == 3  # only the leave-one-out jobs were queued
    after = (
        client.get("/leaderboard").json(),
        client.get(f"{API}/releases/{release}").json()["scores"],
    )
    assert after[0] == before[0]
    assert {t: s["job_id"] for t, s in after[1]["tasks"].items()} == {
        t: s["job_id"] for t, s in before[1]["tasks"].items()
    }
    assert after[1]["tasks"] == before[1]["tasks"]
    # The compare page's default pair ignores them too (the release against itself is the
    # same evaluation on both sides).
    compared = client.get("/leaderboard/compare", params={"a": release, "b": release}).json()
    assert (
        compared["a"]["job_id"] == compared["b"]["job_id"] == before[1]["tasks"]["parity"]["job_id"]
    )


# --- refusals ----------------------------------------------------------------------------


def test_a_leave_out_the_release_cannot_have_is_refused_with_the_reason(
    client, maintainer, experts, release, tiny_base
):
    unknown = _queue(client, maintainer, release, leave_out="alice/zzz@1")
    assert unknown.status_code == 422
    assert unknown.json()["detail"]["check"] == "leave_out"
    assert "not an expert of release" in unknown.json()["detail"]["message"]

    base = create_release(client, maintainer, method="base", base_model="tiny")["number"]
    for response in (
        _queue(client, maintainer, base, leave_out="alice/a@1"),
        _credit(client, maintainer, base),
    ):
        assert response.status_code == 422
        assert "does not route or merge over its experts" in response.json()["detail"]["message"]

    one = create_release(client, maintainer, method="phatgoose", experts=["alice/a@1"])["number"]
    for response in (
        _queue(client, maintainer, one, leave_out="alice/a@1"),
        _credit(client, maintainer, one),
    ):
        assert response.status_code == 422
        assert "has 1 expert(s)" in response.json()["detail"]["message"]
    assert client.get(f"{API}/evaluations").headers["X-Total-Count"] == "0"


def test_credit_is_queued_by_maintainers_only(client, alice, experts, release):
    assert _credit(client, alice, release).status_code == 403


def test_the_cli_queues_credit_as_the_api_does(settings, app, client, maintainer, experts, release):
    from typer.testing import CliRunner

    from coordinator.cli import app as cli

    arguments = ["credit", str(release), "--tasks", "parity", "--tasks", "sums"]
    arguments += ["--examples-per-task", str(EXAMPLES), "--database-url", settings.database_url]
    arguments += ["--data-dir", str(settings.data_dir)]
    first = CliRunner().invoke(cli, arguments)
    assert first.exit_code == 0, first.output
    assert "queued now: 1, 2, 3, 4" in first.output
    again = CliRunner().invoke(cli, arguments)
    assert again.exit_code == 0 and "queued now: none" in again.output
    jobs = client.get(f"{API}/evaluations").json()
    assert [j["spec"].get("leave_out") for j in jobs] == [None, *REFS]
    assert {j["spec"]["requested_by"] for j in jobs} == {"operator"}


# --- pages -------------------------------------------------------------------------------


def test_the_release_page_and_the_expert_page_show_the_credit(
    app, client, maintainer, experts, release, base_dir, tasks_dir
):
    pending = client.get(f"/ui/releases/{release}").text
    assert 'id="release-credit"' not in pending and "No leave-one-out" in pending
    _credit(client, maintainer, release)
    _run_all(app, base_dir, tasks_dir)
    credit = client.get(f"{API}/releases/{release}/credit").json()

    html = client.get(f"/ui/releases/{release}").text
    table = html[html.index('id="release-credit"') :]
    table = table[: table.index("</table>")]
    rows = re.findall(r"<tr class=\"credit-row\".*?</tr>", table, re.S)
    assert len(rows) == 3
    for row, entry in zip(rows, credit["experts"], strict=True):
        assert entry["ref"] in row
        assert f"{100 * entry['routing_share']:.1f}%" in row
        held_out = entry["means"]["held_out"]["difference"]
        assert f"{held_out['delta']:+.3f}" in row
        assert f"[{held_out['low']:+.3f}, {held_out['high']:+.3f}]" in row
        cell = re.search(r'<td class="num credit-held-out">(.*?)</td>', row, re.S)
        assert cell is not None
        # Marked as the leaderboard marks a difference whose interval excludes 0.
        assert ("delta significant" in cell.group(1)) == held_out["significant"]

    page = client.get("/ui/experts/bob/b").text
    entry = next(e for e in credit["experts"] if e["ref"] == "bob/b@1")
    d = entry["means"]["held_out"]["difference"]
    line = (
        f"in release #{release}: {100 * d['delta']:+.1f} held-out "
        f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
    )
    assert line in re.sub(r"<[^>]+>", "", page)


# --- the library -------------------------------------------------------------------------


def test_load_release_leaves_out_an_expert_and_caps_k_at_the_experts_left(
    app, client, maintainer, experts, base_dir, tmp_path
):
    from coordinator.releases.service import export_release, get_release
    from phatgoose.release import ReleaseError, load_release
    from phatgoose.routing import routing_state

    create_release(client, maintainer, method="phatgoose", experts=REFS, top_k=3)
    with app.state.sessionmaker() as session:
        export_release(session, app.state.blobs, get_release(session, 1), tmp_path / "release")
    model, _ = load_release(
        tmp_path / "release", base_model=load_base_model(str(base_dir)), exclude=["bob/b@1"]
    )
    state = routing_state(model)
    assert state is not None
    assert (state.expert_names, state.top_k) == (["alice/a", "bob/c"], 2)
    for exclude, message in ((["zed/z@1"], "not among its experts"), (REFS, "leaves no expert")):
        with pytest.raises(ReleaseError, match=message):
            load_release(
                tmp_path / "release", base_model=load_base_model(str(base_dir)), exclude=exclude
            )

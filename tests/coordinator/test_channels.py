"""Release channels (issue 19, section 3): a named, moving pointer to a release that follows
the catalog. A catalog change (an expert admitted, a new version, a yank) makes exactly one
release and queues its evaluation on the channel's spec, however many workers advance at
once; maintainers pin, roll back and pause."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner

from coordinator.auth.models import Role
from coordinator.channels import service
from coordinator.channels.models import ChannelEntry
from coordinator.cli import app as cli
from coordinator.evaluations.models import EvaluationJob
from coordinator.releases.models import Release
from coordinator.worker import DatabaseBackend, Worker, WorkerOptions
from coordinator.worker_http import HttpBackend, RetryPolicy, connect
from tests.coordinator.helpers import bearer_headers, live_server
from tests.coordinator.release_helpers import publish

API = "/api/v1"
NAME = "community/latest"
CHANNEL = f"{API}/channels/{NAME}"
SPEC = {"tasks": ["parity"], "examples_per_task": 4}
ACTOR = f"channel:{NAME}"


def _create(client, headers, **body: Any) -> dict[str, Any]:
    response = client.post(
        f"{API}/channels", headers=headers, json={"name": NAME, "method": "phatgoose", **body}
    )
    assert response.status_code == 201, response.text
    return response.json()


def _advance(client, headers) -> dict[str, Any]:
    response = client.post(f"{API}/channels/advance", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def _publish(client, headers, tiny_base, tmp_path, name: str, seed: int) -> None:
    publish(client, headers, tiny_base, tmp_path / f"{name}-{seed}", name, seed=seed)


def _refs(client, number: int) -> list[str]:
    return [e["ref"] for e in client.get(f"{API}/releases/{number}").json()["experts"]]


def _history(client) -> list[tuple[int, int, str, str]]:
    """(sequence, release, action, reason) of every move, oldest first."""
    entries = client.get(f"{CHANNEL}/history").json()
    return [(e["sequence"], e["release"], e["action"], e["reason"]) for e in reversed(entries)]


def _resolve(app, name: str = "latest") -> tuple[list[str], list[str]]:
    """The refs the channel's recipe selects now, and the listed experts it leaves out."""
    with app.state.sessionmaker() as session:
        resolved = service.resolve_recipe(session, service.get_channel(session, "community", name))
        return resolved.refs, resolved.left_out


def _count(app, model) -> int:
    with app.state.sessionmaker() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def _yank(client, headers, ref: str) -> None:
    response = client.post(f"{API}/experts/{ref}/yank", headers=headers, json={"reason": "bad"})
    assert response.status_code == 200, response.text


@pytest.fixture
def two_experts(client, alice, bob, tiny_base, tmp_path) -> None:
    """alice/a@1 and bob/b@1."""
    _publish(client, alice, tiny_base, tmp_path, "alice/a", 0)
    _publish(client, bob, tiny_base, tmp_path, "bob/b", 1)


# --- resolving the recipe ------------------------------------------------------------------


def test_a_listed_recipe_takes_each_expert_at_its_newest_version_that_is_not_yanked(
    app, client, alice, bob, maintainer, tiny_base, tmp_path
):
    for name, seed in (("alice/a", 0), ("alice/a", 1), ("bob/b", 2), ("bob/c", 3)):
        _publish(
            client, alice if name.startswith("alice") else bob, tiny_base, tmp_path, name, seed
        )
    _yank(client, alice, "alice/a/2")
    block = client.post(f"{API}/experts/bob/c/block", headers=maintainer, json={"reason": "spam"})
    assert block.status_code == 200
    _create(client, maintainer, experts=["bob/b", "alice/a", "bob/c", "carol/none"])

    refs, left_out = _resolve(app)
    assert refs == ["bob/b@1", "alice/a@1"]  # the list's order
    assert left_out == ["bob/c: blocked (spam)", "carol/none: no such expert"]


def test_a_filtered_recipe_takes_every_admitted_expert_the_filter_lets_through(
    app, client, alice, bob, maintainer, tiny_base, tmp_path
):
    dave = bearer_headers(app, "dave", Role.CONTRIBUTOR)
    for headers, name, seed in (
        (alice, "alice/bbh-a", 0),
        (alice, "alice/other", 1),
        (bob, "bob/bbh-b", 2),
        (bob, "bob/bbh-c", 3),
        (dave, "dave/bbh-d", 4),
    ):
        _publish(client, headers, tiny_base, tmp_path, name, seed)
    _publish(client, bob, tiny_base, tmp_path, "bob/bbh-c", 5)  # bob/bbh-c@2
    _yank(client, bob, "bob/bbh-b/1")
    blocked = client.post(f"{API}/namespaces/dave/block", headers=maintainer, json={"reason": "x"})
    assert blocked.status_code == 200
    response = client.post(
        f"{API}/channels",
        headers=maintainer,
        json={"name": "community/bbh", "method": "phatgoose", "name_glob": "*/bbh-*"},
    )
    assert response.status_code == 201, response.text
    _create(client, maintainer, namespaces=["alice"])

    # Sorted by name; the yanked, the blocked namespace and the other names left out.
    assert _resolve(app, "bbh") == (["alice/bbh-a@1", "bob/bbh-c@2"], [])
    assert _resolve(app) == (["alice/bbh-a@1", "alice/other@1"], [])


def test_a_filtered_recipe_takes_only_experts_that_ship_what_the_method_needs(
    app, client, alice, bob, maintainer, tiny_base, tmp_path
):
    publish(client, alice, tiny_base, tmp_path / "a", "alice/a", seed=0)
    publish(client, bob, tiny_base, tmp_path / "b", "bob/b", seed=1, with_average_activation=True)
    _create(client, maintainer, method="average_activation")
    assert _resolve(app) == (["bob/b@1"], [])


# --- advancing -----------------------------------------------------------------------------


def test_a_channel_advances_once_per_catalog_change_and_queues_each_evaluation(
    client, alice, bob, maintainer, tiny_base, tmp_path, two_experts
):
    assert _create(client, maintainer, spec=SPEC)["release"] is None
    steps = []

    def advance() -> list[dict[str, Any]]:
        moved = _advance(client, maintainer)["advanced"]
        steps.append([(m["release"], m["reason"]) for m in moved])
        return moved

    advance()
    advance()  # nothing changed
    _publish(client, bob, tiny_base, tmp_path, "bob/c", 2)
    advance()
    _publish(client, alice, tiny_base, tmp_path, "alice/a", 3)
    advance()
    _yank(client, alice, "alice/a/2")
    advance()
    _yank(client, bob, "bob/c/1")
    advance()

    assert steps == [
        [(1, "first release: 2 expert(s)")],
        [],
        [(2, "expert admitted bob/c@1")],
        [(3, "new version alice/a@2 (was @1)")],
        [(4, "yanked alice/a@2: back to @1")],
        [(5, "yanked bob/c@1")],
    ]
    assert [_refs(client, n) for n in range(1, 6)] == [
        ["alice/a@1", "bob/b@1"],
        ["alice/a@1", "bob/b@1", "bob/c@1"],
        ["alice/a@2", "bob/b@1", "bob/c@1"],
        ["alice/a@1", "bob/b@1", "bob/c@1"],
        ["alice/a@1", "bob/b@1"],
    ]
    releases = client.get(f"{API}/releases").json()
    assert {r["created_by"] for r in releases} == {ACTOR}
    assert releases[2]["notes"] == f"channel {NAME}: new version alice/a@2 (was @1)"
    jobs = client.get(f"{API}/evaluations").json()
    assert [(j["release"], j["state"]) for j in jobs] == [(n, "queued") for n in range(1, 6)]
    assert jobs[0]["spec"] == {**SPEC, "seed": 0, "requested_by": ACTOR}
    history = client.get(f"{CHANNEL}/history").json()
    assert [(e["sequence"], e["release"], e["job_id"]) for e in history] == [
        (n, n, n) for n in range(5, 0, -1)
    ]
    channel = client.get(CHANNEL).json()
    assert (channel["release"], channel["release_url"], channel["sequence"]) == (
        5,
        f"{API}/releases/5",
        5,
    )


def test_a_channel_without_a_spec_queues_no_evaluation(app, client, maintainer, two_experts):
    _create(client, maintainer)
    assert [m["job_id"] for m in _advance(client, maintainer)["advanced"]] == [None]
    assert _count(app, EvaluationJob) == 0


def test_paused_pinned_and_manual_channels_do_not_advance(
    client, bob, maintainer, tiny_base, tmp_path, two_experts
):
    _create(client, maintainer)
    manual = {"name": "community/manual", "method": "phatgoose", "follow": False}
    assert client.post(f"{API}/channels", headers=maintainer, json=manual).status_code == 201
    assert _advance(client, maintainer)["held"] == ["community/manual"]

    paused = client.post(f"{CHANNEL}/pause", headers=maintainer, json={"reason": "incident"})
    assert (paused.json()["paused"], paused.json()["paused_reason"]) == (True, "incident")
    _publish(client, bob, tiny_base, tmp_path, "bob/c", 2)
    assert _advance(client, maintainer)["held"] == ["community/latest", "community/manual"]
    assert client.post(f"{CHANNEL}/pause", headers=maintainer, json={}).status_code == 409
    assert client.post(f"{CHANNEL}/resume", headers=maintainer).json()["paused"] is False
    assert [m["release"] for m in _advance(client, maintainer)["advanced"]] == [2]

    pinned = client.post(f"{CHANNEL}/pin", headers=maintainer, json={"release": 1}).json()
    assert (pinned["release"], pinned["pinned_release"]) == (1, 1)
    _publish(client, bob, tiny_base, tmp_path, "bob/d", 3)
    assert _advance(client, maintainer)["advanced"] == []
    unpinned = client.post(f"{CHANNEL}/unpin", headers=maintainer).json()
    assert (unpinned["release"], unpinned["pinned_release"]) == (1, None)
    assert client.post(f"{CHANNEL}/unpin", headers=maintainer).status_code == 409
    advanced = _advance(client, maintainer)["advanced"]
    assert [(m["release"], m["reason"]) for m in advanced] == [
        (3, "expert admitted bob/c@1; expert admitted bob/d@1")
    ]
    # A manual channel moves by pins only.
    moved = client.post(
        f"{API}/channels/community/manual/pin", headers=maintainer, json={"release": 2}
    )
    assert moved.json()["release"] == 2
    assert [(s, r, a) for s, r, a, _ in _history(client)] == [
        (1, 1, "advance"),
        (2, 2, "advance"),
        (3, 1, "pin"),
        (4, 1, "unpin"),
        (5, 3, "advance"),
    ]


def test_a_rollback_points_at_the_previous_release_and_pins_it(
    client, bob, maintainer, tiny_base, tmp_path, two_experts
):
    _create(client, maintainer)
    _advance(client, maintainer)
    for name, seed in (("bob/c", 2), ("bob/d", 3)):
        _publish(client, bob, tiny_base, tmp_path, name, seed)
        _advance(client, maintainer)
    assert client.get(CHANNEL).json()["release"] == 3

    back = client.post(f"{CHANNEL}/rollback", headers=maintainer, json={"reason": "regressed"})
    assert (back.json()["release"], back.json()["pinned_release"]) == (2, 2)
    assert _advance(client, maintainer)["held"] == [NAME]  # pinned: it stays back
    again = client.post(f"{CHANNEL}/rollback", headers=maintainer, json={})
    assert (again.json()["release"], again.json()["pinned_release"]) == (1, 1)
    last = client.post(f"{CHANNEL}/rollback", headers=maintainer, json={})
    assert (last.status_code, last.json()["detail"]["check"]) == (409, "rollback")

    client.post(f"{CHANNEL}/unpin", headers=maintainer)
    advanced = _advance(client, maintainer)["advanced"]
    assert [m["release"] for m in advanced] == [4]  # what the catalog selects, built anew
    assert _history(client) == [
        (1, 1, "advance", "first release: 2 expert(s)"),
        (2, 2, "advance", "expert admitted bob/c@1"),
        (3, 3, "advance", "expert admitted bob/d@1"),
        (4, 2, "rollback", "regressed"),
        (5, 1, "rollback", "rolled back from release 2"),
        (6, 1, "unpin", "unpinned"),
        (7, 4, "advance", "expert admitted bob/c@1; expert admitted bob/d@1"),
    ]
    after = client.post(f"{CHANNEL}/rollback", headers=maintainer, json={}).json()
    assert after["release"] == 1  # the release before #4


def test_rollback_target_undoes_earlier_rollbacks():
    def entries(*moves: tuple[str, int]) -> list[ChannelEntry]:
        return [ChannelEntry(action=action, release_id=release) for action, release in moves]

    assert service.rollback_target(entries(("advance", 1))) is None
    assert service.rollback_target(entries(("advance", 1), ("advance", 2))) == 1
    history = entries(("advance", 1), ("advance", 2), ("advance", 3), ("rollback", 2))
    assert service.rollback_target(history) == 1
    history += entries(("unpin", 2), ("pin", 5))
    assert service.rollback_target(history) == 2
    assert service.rollback_target(history, withdrawn={2}) == 1
    assert service.rollback_target(history, withdrawn={1, 2}) is None


def test_a_changed_recipe_is_built_at_the_next_advance(client, maintainer, two_experts):
    _create(client, maintainer, experts=["alice/a"], spec=SPEC)
    _advance(client, maintainer)
    assert client.get(f"{API}/releases/1").json()["top_k"] == 1  # capped at one expert

    def patch(**body: Any) -> str:
        response = client.patch(CHANNEL, headers=maintainer, json=body)
        assert response.status_code == 200, response.text
        (moved,) = _advance(client, maintainer)["advanced"]
        return moved["reason"]

    assert patch(experts=["alice/a", "bob/b"]) == "expert admitted bob/b@1"
    assert patch(top_k=1) == "recipe changed: k 2 -> 1"
    assert patch(method="merged") == "recipe changed: method phatgoose -> merged, k 1 -> None"
    assert patch(spec=None, namespaces=["alice"]) == "removed bob/b@1"
    release = client.get(f"{API}/releases/5").json()
    assert (release["method"], release["top_k"], _refs(client, 5)) == (
        "merged",
        None,
        ["alice/a@1"],
    )
    channel = client.get(CHANNEL).json()
    assert (channel["experts"], channel["namespaces"], channel["spec"]) == (None, ["alice"], None)
    assert len(client.get(f"{API}/evaluations").json()) == 4  # none for #5: no spec


def test_a_recipe_that_selects_nothing_keeps_the_channel_and_says_why(
    client, alice, maintainer, tiny_base, tmp_path, two_experts
):
    _create(client, maintainer, experts=["alice/a"])
    _advance(client, maintainer)
    _yank(client, alice, "alice/a/1")
    report = _advance(client, maintainer)
    message = (
        f"the recipe of channel {NAME} selects no expert (alice/a: no version on its base "
        "model that is not yanked)"
    )
    assert report["errors"] == {NAME: message}
    channel = client.get(CHANNEL).json()
    assert (channel["release"], channel["advance_error"]) == (1, message)
    _publish(client, alice, tiny_base, tmp_path, "alice/a", 5)
    assert [m["release"] for m in _advance(client, maintainer)["advanced"]] == [2]
    assert client.get(CHANNEL).json()["advance_error"] is None


# --- idempotence ---------------------------------------------------------------------------


def test_an_advance_that_finds_the_channel_moved_builds_nothing(
    app, client, maintainer, two_experts
):
    """Two workers plan the same change; the second to build finds the channel moved: its
    release and evaluation are rolled back with the move it could not record."""
    _create(client, maintainer, spec=SPEC)
    blobs = app.state.blobs
    with app.state.sessionmaker() as first, app.state.sessionmaker() as second:
        plans = []
        for session in (first, second):
            plans.append(
                service.plan_advance(session, service.get_channel(session, "community", "latest"))
            )
            session.commit()
        assert plans[0] == plans[1] and plans[0] is not None and plans[0].sequence == 0
        assert service.apply_advance(first, blobs, plans[0]) is not None
        assert service.apply_advance(second, blobs, plans[1]) is None
    counts = [_count(app, model) for model in (Release, EvaluationJob, ChannelEntry)]
    assert counts == [1, 1, 1]


def test_the_history_key_refuses_a_second_entry_at_the_same_sequence(
    app, client, maintainer, two_experts
):
    _create(client, maintainer)
    _advance(client, maintainer)
    with app.state.sessionmaker() as session:
        channel = service.get_channel(session, "community", "latest")
        entry = ChannelEntry(
            channel_id=channel.id,
            sequence=1,
            release_id=channel.release_id,
            action="advance",
            reason="a second writer",
            created_by="test",
        )
        session.add(entry)
        with pytest.raises(IntegrityError):
            session.commit()


WORKERS = 4


def test_workers_advancing_at_once_build_one_release_per_catalog_change(
    app, client, bob, maintainer, tiny_base, tmp_path, two_experts
):
    _create(client, maintainer, spec=SPEC)

    barrier = threading.Barrier(WORKERS)

    def advance(_: int) -> Any:
        with app.state.sessionmaker() as session:
            barrier.wait()
            return service.advance_channels(session, app.state.blobs, app.state.settings)

    moved = []
    for change in (None, "bob/c", "bob/d"):
        if change is not None:
            _publish(client, bob, tiny_base, tmp_path, change, len(moved) + 2)
        with ThreadPoolExecutor(WORKERS) as pool:  # the barrier resets once all passed
            reports = list(pool.map(advance, range(WORKERS)))
        assert [r.errors for r in reports] == [{}] * WORKERS
        moved.append(sorted(a.release for r in reports for a in r.advanced))
    assert moved == [[1], [2], [3]]
    jobs = client.get(f"{API}/evaluations").json()
    assert [j["release"] for j in jobs] == [1, 2, 3]
    assert [(s, r) for s, r, _, _ in _history(client)] == [(1, 1), (2, 2), (3, 3)]


# --- workers -------------------------------------------------------------------------------


def test_workers_advance_channels_each_poll_locally_and_remotely(
    app, client, bob, maintainer, tiny_base, tmp_path, two_experts
):
    _create(client, maintainer)
    DatabaseBackend(app.state.sessionmaker, app.state.blobs).advance_channels()
    assert client.get(CHANNEL).json()["release"] is None  # no settings: no advancing
    backend = DatabaseBackend(app.state.sessionmaker, app.state.blobs, app.state.settings)
    assert Worker(backend, WorkerOptions(poll_seconds=0.01)).run(once=True) == 0
    assert client.get(CHANNEL).json()["release"] == 1

    _publish(client, bob, tiny_base, tmp_path, "bob/c", 2)
    token = bearer_headers(app, "gpu", Role.WORKER)["Authorization"].split()[1]
    with live_server(app) as url:
        remote = HttpBackend(connect(url, token), tmp_path / "cache", retry=RetryPolicy(1, 0.0))
        assert Worker(remote, WorkerOptions(worker_id="r1", poll_seconds=0.01)).run(once=True) == 0
    assert client.get(CHANNEL).json()["release"] == 2


# --- the API: permissions and refusals -----------------------------------------------------


def test_only_maintainers_change_channels_and_workers_may_advance(
    app, client, alice, maintainer, two_experts
):
    _create(client, maintainer)
    worker = bearer_headers(app, "gpu", Role.WORKER)
    body = {"name": "alice/mine", "method": "phatgoose"}
    changes = [
        ("post", f"{API}/channels", body),
        ("patch", CHANNEL, {"top_k": 1}),
        ("post", f"{CHANNEL}/pin", {"release": 1}),
        ("post", f"{CHANNEL}/unpin", None),
        ("post", f"{CHANNEL}/rollback", {}),
        ("post", f"{CHANNEL}/pause", {}),
        ("post", f"{CHANNEL}/resume", None),
    ]
    for headers in (alice, worker):
        for method, path, json in changes:
            response = client.request(method, path, headers=headers, json=json)
            assert response.status_code == 403, (method, path, response.text)
            assert response.json()["detail"]["error"] == "forbidden"
    assert client.post(f"{API}/channels/advance").status_code == 401
    assert client.post(f"{API}/channels/advance", headers=alice).status_code == 403
    assert (
        client.post(f"{API}/channels/advance", headers=worker).json()["advanced"][0]["release"] == 1
    )
    # Reads are public.
    assert client.get(f"{API}/channels").json()[0]["release"] == 1
    assert client.get(CHANNEL).json()["name"] == NAME
    assert _count(app, Release) == 1


@pytest.mark.parametrize(
    ("body", "status", "check"),
    [
        ({"name": "Community/Latest"}, 422, "request"),
        ({"name": "latest"}, 422, "request"),
        ({"name": "c/" + "x" * 60}, 422, "request"),
        ({"method": "base"}, 422, "method"),
        ({"method": "merged", "top_k": 2}, 422, "top_k"),
        ({"method": "ties", "params": {"density": 7}}, 422, "params"),
        ({"method": "single"}, 422, "experts"),
        ({"base_model": "nope"}, 422, "base_model"),
        ({"experts": ["alice/a"], "namespaces": ["bob"]}, 422, "request"),
        ({"experts": ["alice/a", "alice/a"]}, 422, "experts"),
        ({"spec": {"tasks": ["Bad Task"], "examples_per_task": 2}}, 422, "task_name"),
        ({"name": NAME}, 409, "duplicate"),
    ],
)
def test_the_api_refuses_a_channel_that_cannot_be(client, maintainer, body, status, check):
    _create(client, maintainer)
    response = client.post(
        f"{API}/channels", headers=maintainer, json={"name": "x/y", "method": "phatgoose", **body}
    )
    assert response.status_code == status, response.text
    assert response.json()["detail"]["check"] == check
    assert len(client.get(f"{API}/channels").json()) == 1


def test_pins_take_a_release_of_the_channels_base_that_is_not_withdrawn(
    client, maintainer, two_experts
):
    _create(client, maintainer)
    _advance(client, maintainer)
    assert client.post(f"{CHANNEL}/pin", headers=maintainer, json={"release": 9}).status_code == 404
    client.post(f"{API}/releases/1/withdraw", headers=maintainer, json={"reason": "broken"})
    refused = client.post(f"{CHANNEL}/pin", headers=maintainer, json={"release": 1})
    assert (refused.status_code, refused.json()["detail"]["check"]) == (409, "withdrawn")
    assert client.get(f"{API}/channels/community/none").status_code == 404
    assert client.get(f"{API}/releases/1/channel-diff").json()["previous"] is None


def test_a_withdrawn_current_release_is_not_rebuilt_and_the_channel_says_so(
    client, bob, maintainer, tiny_base, tmp_path, two_experts
):
    _create(client, maintainer)
    _advance(client, maintainer)
    withdrawn = client.post(
        f"{API}/releases/1/withdraw", headers=maintainer, json={"reason": "routes badly"}
    )
    assert withdrawn.status_code == 200, withdrawn.text

    report = _advance(client, maintainer)

    # The catalog still selects its experts: building them again would serve what was
    # withdrawn under another number. The channel stays, says why, and the page shows it.
    assert report["advanced"] == []
    assert (
        "release 1 of channel community/latest is withdrawn (routes badly)"
        in (report["errors"][NAME])
    )
    channel = client.get(CHANNEL).json()
    assert (channel["release"], channel["release_withdrawn"]) == (1, True)
    assert "yank or block the expert at fault" in channel["advance_error"]
    page = client.get(f"/ui/channels/{NAME}").text
    assert 'id="release-withdrawn"' in page and "routes badly" in page
    # A catalog change moves it on, as always.
    _publish(client, bob, tiny_base, tmp_path, "bob/c", 2)
    assert [m["release"] for m in _advance(client, maintainer)["advanced"]] == [2]
    channel = client.get(CHANNEL).json()
    assert (channel["release_withdrawn"], channel["advance_error"]) == (False, None)


def test_a_rollback_passes_over_withdrawn_releases(
    client, bob, maintainer, tiny_base, tmp_path, two_experts
):
    _create(client, maintainer)
    _advance(client, maintainer)
    for name, seed in (("bob/c", 2), ("bob/d", 3)):
        _publish(client, bob, tiny_base, tmp_path, name, seed)
        _advance(client, maintainer)
    client.post(f"{API}/releases/2/withdraw", headers=maintainer, json={"reason": "broken"})

    back = client.post(f"{CHANNEL}/rollback", headers=maintainer, json={})

    assert (back.json()["release"], back.json()["pinned_release"]) == (1, 1)
    client.post(f"{API}/releases/1/withdraw", headers=maintainer, json={"reason": "broken"})
    client.post(f"{CHANNEL}/pin", headers=maintainer, json={"release": 3})
    refused = client.post(f"{CHANNEL}/rollback", headers=maintainer, json={})
    assert (refused.status_code, refused.json()["detail"]["check"]) == (409, "rollback")
    assert "not withdrawn" in refused.json()["detail"]["message"]


# --- the command line ----------------------------------------------------------------------


def test_the_cli_creates_advances_and_moves_channels(
    settings, client, bob, tiny_base, tmp_path, two_experts
):
    args = ["--data-dir", str(settings.data_dir), "--database-url", settings.database_url]
    runner = CliRunner()

    def run(*command: str, code: int = 0) -> str:
        result = runner.invoke(cli, ["channel", *command, *args])
        assert result.exit_code == code, result.output
        return result.output

    created = run(
        "create", NAME, "--method", "phatgoose", "--tasks", "parity", "--examples-per-task", "4"
    )
    assert created.startswith(f"created {NAME}") and "release none" in created
    assert run("advance") == f"{NAME}: release 1, evaluation 1 (first release: 2 expert(s))\n"
    _publish(client, bob, tiny_base, tmp_path, "bob/c", 2)
    assert run("advance").startswith(f"{NAME}: release 2, evaluation 2 (expert admitted bob/c@1)")
    assert run("rollback", NAME) == f"{NAME}: rolled back to release 1, pinned (move 3)\n"
    shown = run("show", NAME)
    assert "pinned to #1" in shown and "release URL: /api/v1/releases/1" in shown
    assert "rollback rolled back from release 2 (operator)" in shown
    assert run("advance") == f"{NAME}: held (paused, pinned or manual)\n"
    assert run("unpin", NAME) == f"{NAME}: unpinned (move 4)\n"
    assert (
        run("pin", NAME, "2", "--reason", "known good") == f"{NAME}: pinned to release 2 (move 5)\n"
    )
    assert run("pause", NAME, "--reason", "incident") == f"{NAME}: paused\n"
    assert run("resume", NAME) == f"{NAME}: resumed\n"
    assert "release #2" in run("list")
    assert "not_found: no release 99" in run("pin", NAME, "99", code=1)
    assert "duplicate" in run("create", NAME, "--method", "phatgoose", code=1)
    assert "not_found: no release channel named a/b" in run("show", "a/b", code=1)
    assert client.get(CHANNEL).json()["pinned_release"] == 2

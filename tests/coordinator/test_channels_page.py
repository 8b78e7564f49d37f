"""The pages of release channels (issue 19, section 3): the channel list, a channel's settings,
history and chart of its releases' means, and, on a release's page, the diff to the previous
release of its channel, computed from a real worker's evaluations of a tiny model."""

from __future__ import annotations

import re
from typing import Any

import pytest

from coordinator.evaluations import service as evaluations
from coordinator.leaderboard import comparisons
from coordinator.worker import DatabaseBackend, Worker, WorkerOptions
from phatgoose.paired import paired_difference, paired_mean_difference
from tests.coordinator.release_helpers import WORKER_TASKS, publish
from tests.coordinator.web_helpers import png_size, table_rows

API = "/api/v1"
NAME = "community/latest"
GROUPS = {"held_in": ["parity"], "held_out": ["sums"]}


def _spec(examples: int) -> dict[str, Any]:
    return {"tasks": list(WORKER_TASKS), "examples_per_task": examples, "task_groups": GROUPS}


def _create(client, headers, **body: Any) -> None:
    response = client.post(
        f"{API}/channels", headers=headers, json={"name": NAME, "method": "phatgoose", **body}
    )
    assert response.status_code == 201, response.text


def _advance(client, headers) -> list[int]:
    response = client.post(f"{API}/channels/advance", headers=headers)
    return [moved["release"] for moved in response.json()["advanced"]]


def _score(app, job_id: int, accuracies: dict[str, float]) -> None:
    """Lease the channel's queued evaluation `job_id` and store `accuracies` as a worker."""
    with app.state.sessionmaker() as session:
        claimed = evaluations.claim_job(session, "page-test", lease_seconds=60)
        assert claimed is not None and claimed.id == job_id
        for task, accuracy in accuracies.items():
            score = evaluations.TaskScore(task, accuracy, 0.1, 20, "0.1.0", 0.1, None)
            evaluations.record_result(session, job_id, "page-test", score)
        evaluations.complete_job(session, job_id, "page-test")


@pytest.fixture
def channel(app, client, alice, bob, maintainer, tiny_base, tmp_path) -> None:
    """community/latest at release #2 (alice/a, bob/b, then bob/c admitted), each scored."""
    publish(client, alice, tiny_base, tmp_path / "a", "alice/a", seed=0)
    publish(client, bob, tiny_base, tmp_path / "b", "bob/b", seed=1)
    _create(client, maintainer, spec=_spec(20), notes="the newest experts of everyone")
    assert _advance(client, maintainer) == [1]
    _score(app, 1, {"parity": 0.5, "sums": 0.25})
    publish(client, bob, tiny_base, tmp_path / "c", "bob/c", seed=2)
    assert _advance(client, maintainer) == [2]
    _score(app, 2, {"parity": 0.75, "sums": 0.5})


def test_the_channel_list_shows_each_channel_its_release_and_state(client, channel):
    page = client.get("/ui/channels")
    assert page.status_code == 200
    assert '<a href="/ui/channels" aria-current="page">Channels</a>' in page.text
    (row,) = table_rows(page.text, "channels")
    assert row[:3] == [NAME, "#2", "phatgoose"]
    assert row[4:7] == ["every admitted", "follows", "2"]


def test_the_channel_page_shows_its_settings_history_and_means(client, maintainer, channel):
    client.post(f"{API}/channels/{NAME}/rollback", headers=maintainer, json={"reason": "worse"})
    page = client.get(f"/ui/channels/{NAME}")
    assert page.status_code == 200
    assert "the newest experts of everyone" in page.text and 'id="pinned"' in page.text
    history = table_rows(page.text, "channel-history")
    assert [row[:6] for row in history] == [
        ["3", "#1", "rollback", "worse", "–", "carol"],
        ["2", "#2", "advance", "expert admitted bob/c@1", "2", f"channel:{NAME}"],
        ["1", "#1", "advance", "first release: 2 expert(s)", "1", f"channel:{NAME}"],
    ]
    # Each release once, in the order the channel first pointed at it: held-in (parity),
    # held-out (sums) and all tasks, each with its standard error.
    assert table_rows(page.text, "channel-means") == [
        ["#1", "0.500 ±0.100", "0.250 ±0.100", "0.375 ±0.071", "1"],
        ["#2", "0.750 ±0.100", "0.500 ±0.100", "0.625 ±0.071", "2"],
    ]
    settings = page.text.split('id="channel-spec">')[1].split("</dd>")[0]
    assert settings.startswith("2 task(s) (parity, sums), 20 examples per task, seed 0")
    plot = client.get(f"/ui/channels/{NAME}/means.png")
    assert plot.headers["content-type"] == "image/png"
    width, height = png_size(plot.content)
    assert width > 400 and height > 200
    assert client.get("/ui/channels/community/none").status_code == 404
    assert client.get("/ui/channels/community/none/means.png").status_code == 404


def test_the_release_page_links_its_channel(client, channel):
    page = client.get("/ui/releases/2").text
    link = page.split('id="channel-link">')[1].split("</p>")[0]
    assert f'<a href="/ui/channels/{NAME}">{NAME}</a>' in link
    assert "expert admitted bob/c@1" in link and '<a href="/ui/releases/1">#1</a>' in link
    assert table_rows(page, "channel-diff-experts") == [["bob/c", "–", "bob/c@1", "added"]]
    # Scores stored without per-example outcomes compare, but without a paired interval.
    parity = table_rows(page, "channel-diff-tasks")[0]
    assert parity[:5] == ["parity", "held-in", "0.500", "0.750", "–"]
    first = client.get("/ui/releases/1").text
    assert "The channel's first release." in first and "channel-diff-tasks" not in first


def _outcomes(client, job_id: int, task: str) -> tuple[bool, ...]:
    return tuple(client.get(f"{API}/evaluations/{job_id}/outcomes/{task}").json()["correct"])


def _shares(results: list[dict[str, Any]]) -> dict[str, float]:
    """Each expert's `overall` routing share, averaged over the tasks."""
    found: dict[str, list[float]] = {}
    for result in results:
        stats = result["routing_stats"]
        for name, share in zip(stats["experts"], stats["overall"], strict=True):
            found.setdefault(name, []).append(share)
    return {name: sum(shares) / len(shares) for name, shares in found.items()}


def test_the_release_page_shows_the_diff_to_the_previous_release_of_its_channel(
    app, client, alice, bob, maintainer, tiny_base, tmp_path, base_dir, tasks_dir
):
    """A real worker advances the channel in its poll and evaluates each release on the
    channel's spec; the page's differences are the paired ones of those two evaluations."""
    comparisons.STATISTICS.clear()
    publish(client, alice, tiny_base, tmp_path / "a", "alice/a", seed=0)
    publish(client, bob, tiny_base, tmp_path / "b", "bob/b", seed=1)
    _create(client, maintainer, spec=_spec(6))
    options = WorkerOptions(
        base_models={"tiny": str(base_dir)}, tasks_dir=tasks_dir, poll_seconds=0.05
    )
    worker = Worker(
        DatabaseBackend(app.state.sessionmaker, app.state.blobs, app.state.settings), options
    )
    assert worker.run(once=True) == 1  # advanced to #1, then evaluated it
    publish(client, bob, tiny_base, tmp_path / "c", "bob/c", seed=2)
    assert worker.run(once=True) == 1  # #2, evaluated
    jobs = client.get(f"{API}/evaluations").json()
    assert [(j["release"], j["state"]) for j in jobs] == [(1, "done"), (2, "done")]

    diff = client.get(f"{API}/releases/2/channel-diff").json()
    assert (diff["channel"], diff["previous"], diff["reason"]) == (
        NAME,
        1,
        "expert admitted bob/c@1",
    )
    assert diff["experts"] == [{"name": "bob/c", "before": None, "after": "bob/c@1"}]
    assert diff["comparison"] == client.get("/leaderboard/compare?a=2&b=1").json()
    settings: dict[str, Any] = {"resamples": comparisons.RESAMPLES, "confidence": 0.95, "seed": 0}
    pairs = {
        task: (_outcomes(client, 2, task), _outcomes(client, 1, task)) for task in WORKER_TASKS
    }
    by_task = {t["task"]: t for t in diff["comparison"]["tasks"]}
    for task, (now, before) in pairs.items():
        assert by_task[task]["difference"] == paired_difference(now, before, **settings).to_dict()
    means = diff["comparison"]["means"]
    assert means["all"]["difference"] == paired_mean_difference(pairs, **settings).to_dict()
    held_out = paired_mean_difference({"sums": pairs["sums"]}, **settings)
    assert means["held_out"]["difference"] == held_out.to_dict()

    after, before = (client.get(f"{API}/evaluations/{j}").json()["results"] for j in (2, 1))
    shares_after, shares_before = _shares(after), _shares(before)
    assert set(shares_after) == {"alice/a", "bob/b", "bob/c"}
    assert diff["routing"] == [
        {"expert": name, "before": shares_before.get(name), "after": shares_after[name]}
        for name in sorted(shares_after)
    ]
    for shift in diff["task_routing"]:
        one_after, one_before = (
            _shares([r for r in results if r["task"] == shift["task"]])
            for results in (after, before)
        )
        names = one_after.keys() | one_before.keys()
        expected = 0.5 * sum(abs(one_after.get(n, 0) - one_before.get(n, 0)) for n in names)
        assert shift["total_variation"] == pytest.approx(expected)
        assert 0 < shift["total_variation"] <= 1  # bob/c takes a share that was the others'

    page = client.get("/ui/releases/2").text
    rows = {row[0]: row for row in table_rows(page, "channel-diff-tasks")}
    for task, row in rows.items():
        delta = by_task[task]["difference"]
        assert row[2:4] == [f"{by_task[task]['b']:.3f}", f"{by_task[task]['a']:.3f}"]
        assert f"{delta['delta']:+.3f} [{delta['low']:+.3f}, {delta['high']:+.3f}]" in row[4]
        (shift,) = [s for s in diff["task_routing"] if s["task"] == task]
        assert row[5] == f"{shift['total_variation']:.3f}"
    routing = {row[0]: row for row in table_rows(page, "channel-routing")}
    assert routing["bob/c"][1:3] == ["–", f"{100 * shares_after['bob/c']:.1f}%"]
    held_in = means["held_in"]["difference"]
    text = re.sub(r"<[^>]+>", "", page.split('id="channel-diff-means">')[1].split("</p>")[0])
    interval = f"[{held_in['low']:+.3f}, {held_in['high']:+.3f}]"
    (part,) = [p for p in " ".join(text.split()).split(";") if "held-in" in p]
    assert part.endswith(f"{held_in['delta']:+.3f} {interval}")  # after ▲/▼ when marked

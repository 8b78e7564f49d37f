"""The JSON leaderboard and the web page are one ranking: for the same filters, sort and page
they list the same releases in the same order with the same numbers."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.coordinator.web_helpers import (
    TaskOutcome,
    create_release,
    publish_expert,
    record_evaluation,
    table_rows,
)

HELD_IN = ("hyperbaton", "navigate")
HELD_OUT = ("strategyqa", "winowhy")
PAGE = 3

# Release -> (older accuracies, newer accuracies) on HELD_IN + HELD_OUT. The newer
# evaluation reorders the releases, so a stale score would show in the order too.
SCORES: dict[int, tuple[tuple[float, ...], tuple[float, ...]]] = {
    1: ((0.90, 0.90, 0.90, 0.90), (0.40, 0.45, 0.50, 0.35)),
    2: ((0.10, 0.20, 0.30, 0.40), (0.80, 0.40, 0.50, 0.45)),
    3: ((0.50, 0.50, 0.50, 0.50), (0.50, 0.70, 0.55, 0.60)),
    4: ((0.20, 0.30, 0.20, 0.30), (0.60, 0.55, 0.45, 0.50)),
    5: ((0.30, 0.30, 0.30, 0.30), (0.75, 0.65, 0.60, 0.70)),
    6: ((0.95, 0.10, 0.95, 0.10), (0.70, 0.60, 0.65, 0.55)),
    7: ((0.40, 0.40, 0.40, 0.40), (0.65, 0.75, 0.40, 0.45)),
}
UNEVALUATED = 8


@pytest.fixture
def catalog(app, client, alice, maintainer, tiny_base, tmp_path_factory):
    """Eight releases of six methods; all but #8 evaluated twice on two held-in and two
    held-out tasks (the older job on 20 examples, the newer on 40)."""
    for seed, name in enumerate(("alice/hyperbaton", "alice/navigate")):
        publish_expert(client, alice, tiny_base, tmp_path_factory.mktemp("pkg"), name, seed=seed)
    both = ["alice/hyperbaton@1", "alice/navigate@1"]
    for body in (
        {"method": "base", "base_model": "tiny"},
        {"method": "single", "experts": ["alice/hyperbaton@1"]},
        {"method": "single", "experts": ["alice/navigate@1"]},
        {"method": "merged", "experts": both},
        {"method": "phatgoose", "experts": both, "top_k": 2},
        {"method": "phatgoose", "experts": both, "top_k": 1},
        {"method": "arrow", "experts": both, "top_k": 2},
        {"method": "phatgoose", "experts": both, "top_k": 2},
    ):
        create_release(client, maintainer, **body)
    tasks = HELD_IN + HELD_OUT
    for n, scores in ((20, 0), (40, 1)):
        for release, evaluations in SCORES.items():
            record_evaluation(
                app,
                release,
                {t: TaskOutcome(a, n=n) for t, a in zip(tasks, evaluations[scores], strict=True)},
                held_in=HELD_IN,
                held_out=HELD_OUT,
            )


def _api(client: TestClient, **params: Any) -> dict[str, Any]:
    response = client.get("/api/v1/leaderboard", params={"evaluated_only": True, **params})
    assert response.status_code == 200, response.text
    return response.json()


def _page(client: TestClient, **params: Any) -> tuple[list[list[str]], str]:
    response = client.get("/ui/leaderboard", params=params)
    assert response.status_code == 200, response.text
    rows = table_rows(response.text, "leaderboard")
    return [row for row in rows if row[0].startswith("#")], response.text


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _as_page_row(row: dict[str, Any], tasks: list[str], groups: list[str]) -> list[str]:
    """What the page shows of an API row: release, method, base model, experts, mean, group
    means, the difference against the base (none here: no per-example outcomes), then each
    task's accuracy, standard error and n."""
    method = row["method"] + (f" k={row['top_k']}" if row["top_k"] else "")
    mean = f"{row['mean_accuracy']:.3f} ±{row['mean_stderr']:.3f} {len(row['scores'])} tasks"
    cells = [
        f"{c['accuracy']:.3f} ±{c['stderr']:.3f} n={c['n']}" if c else "–"
        for c in (row["scores"].get(task) for task in tasks)
    ]
    return [
        f"#{row['release']}",
        method,
        row["base_model"],
        str(len(row["experts"])),
        mean,
        *(_cell(row["group_means"].get(group)) for group in groups),
        "–",
        *cells,
    ]


def _shown(row: list[str], columns: int) -> list[str]:
    """A page row without its badge, evaluator and date columns."""
    return [row[0].split()[0], *row[1:columns]]


@pytest.mark.parametrize(
    ("page_sort", "api_sort", "order"),
    [
        ("mean", "mean", "desc"),
        ("held-out", "held_out", "desc"),
        ("task:navigate", "task:navigate", "asc"),
        ("release", "release", "asc"),
    ],
)
def test_api_and_page_list_the_same_releases_in_the_same_order_with_the_same_numbers(
    client, catalog, page_sort, api_sort, order
):
    seen: list[str] = []
    for offset in range(0, len(SCORES), PAGE):
        board = _api(client, sort=api_sort, order=order, limit=PAGE, offset=offset)
        rows, html = _page(client, sort=page_sort, order=order, limit=PAGE, offset=offset)
        groups = ["held_in", "held_out"]
        expected = [_as_page_row(row, board["tasks"], groups) for row in board["releases"]]
        columns = 6 + len(groups) + len(board["tasks"])
        assert [_shown(row, columns) for row in rows] == expected
        assert board["total"] == len(SCORES)
        assert f'data-total="{board["total"]}"' in html
        seen += [row[0] for row in expected]
    assert sorted(seen) == sorted(f"#{n}" for n in SCORES)


def test_the_held_out_view_agrees_and_accepts_either_spelling(client, catalog):
    board = _api(client, split="held_out", sort="mean", order="desc", limit=PAGE)
    assert board["tasks"] == list(HELD_OUT) and board["split"] == "held_out"
    assert _api(client, split="held-out", sort="mean", order="desc", limit=PAGE) == board
    rows, _ = _page(client, split="held-out", limit=PAGE)
    expected = [_as_page_row(row, board["tasks"], []) for row in board["releases"]]
    assert [_shown(row, 6 + len(HELD_OUT)) for row in rows] == expected


def test_the_newest_evaluation_counts_on_both(client, catalog):
    (row,) = _api(client, sort="release", limit=1, offset=0)["releases"]
    newer = SCORES[1][1]
    assert [row["scores"][t]["accuracy"] for t in HELD_IN + HELD_OUT] == list(newer)
    assert {cell["n"] for cell in row["scores"].values()} == {40}
    assert row["group_means"] == {
        "held_in": pytest.approx(sum(newer[:2]) / 2),
        "held_out": pytest.approx(sum(newer[2:]) / 2),
    }
    first, _ = _page(client, sort="release", order="asc", limit=1)
    assert first[0][8] == f"{newer[0]:.3f} ±{TaskOutcome(newer[0]).stderr:.3f} n=40"


def test_only_the_api_lists_unevaluated_releases_unless_asked_not_to(client, catalog):
    everything = client.get("/api/v1/leaderboard", params={"sort": "mean", "order": "desc"}).json()
    assert everything["total"] == len(SCORES) + 1
    last = everything["releases"][-1]
    assert (last["release"], last["scores"], last["mean_accuracy"]) == (UNEVALUATED, {}, None)
    assert _api(client)["total"] == len(SCORES)


def test_the_api_refuses_an_unknown_sort_key_and_a_page_too_large(client, catalog):
    assert client.get("/leaderboard", params={"sort": "popularity"}).status_code == 422
    assert client.get("/leaderboard", params={"limit": 201}).status_code == 422

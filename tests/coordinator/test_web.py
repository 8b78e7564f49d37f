"""The pages: leaderboard (filters, sorting, baselines, Oracle), release pages (manifest,
scores, routing heatmaps, KL from the Oracle), the catalog, and plots."""

from __future__ import annotations

import math
import re

import pytest
import torch
from fastapi.testclient import TestClient

from coordinator.web import analysis, queries
from coordinator.worker import routing_summary
from phatgoose.routing.stats import RoutingStats
from tests.coordinator.web_helpers import (
    TaskOutcome,
    create_release,
    png_size,
    publish_expert,
    record_evaluation,
    table_rows,
)

HYPERBATON, NAVIGATE, WINOWHY = "hyperbaton", "navigate", "winowhy"


def _stored(counts: dict[str, list[int]]) -> dict[str, object]:
    """Routing statistics as the worker stores them, from per-module selection counts."""
    stats = RoutingStats(
        expert_names=["alice/hyperbaton", "alice/navigate"],
        top_k=2,
        counts={path: torch.tensor(row) for path, row in counts.items()},
    )
    summary = routing_summary(stats, "phatgoose")
    assert summary is not None
    return summary


# PHATGOOSE on hyperbaton: per module, how often each of (hyperbaton, navigate) was chosen.
# Layer 0: (30 + 20, 10 + 20) / 80, layer 1: (25, 15) / 40 -> p = (0.625, 0.375).
PHATGOOSE_STATS = _stored(
    {
        "model.layers.0.self_attn.q_proj": [30, 10],
        "model.layers.0.mlp.up_proj": [20, 20],
        "model.layers.1.self_attn.q_proj": [25, 15],
    }
)
# On winowhy the navigate expert is never chosen.
ONLY_HYPERBATON_STATS = _stored(
    {"model.layers.0.self_attn.q_proj": [8, 0], "model.layers.1.mlp.up_proj": [8, 0]}
)


@pytest.fixture
def world(app, client, alice, maintainer, tiny_base, tmp_path_factory):
    """Two experts; releases #1 base, #2 single hyperbaton, #3 single navigate, #4 merged,
    #5 phatgoose (k=2); each evaluated on hyperbaton, navigate (held in), winowhy (held out)."""
    for name, description, seed in (
        ("alice/hyperbaton", "Adjective order in English sentences", 0),
        ("alice/navigate", "Follow walking instructions back to the start", 1),
    ):
        publish_expert(
            client,
            alice,
            tiny_base,
            tmp_path_factory.mktemp("pkg"),
            name,
            description=description,
            seed=seed,
        )
    both = ["alice/hyperbaton@1", "alice/navigate@1"]
    assert create_release(client, maintainer, method="base", base_model="tiny") == 1
    assert create_release(client, maintainer, method="single", experts=["alice/hyperbaton@1"]) == 2
    assert create_release(client, maintainer, method="single", experts=["alice/navigate@1"]) == 3
    assert create_release(client, maintainer, method="merged", experts=both) == 4
    assert create_release(client, maintainer, method="phatgoose", experts=both, top_k=2) == 5
    scores = {
        1: (0.40, 0.45, 0.50),
        2: (0.80, 0.40, 0.50),
        3: (0.50, 0.70, 0.55),
        4: (0.60, 0.55, 0.45),
        5: (0.75, 0.65, 0.60),
    }
    for release, (hyperbaton, navigate, winowhy) in scores.items():
        stats = (
            (PHATGOOSE_STATS, PHATGOOSE_STATS, ONLY_HYPERBATON_STATS)
            if release == 5
            else (None, None, None)
        )
        record_evaluation(
            app,
            release,
            {
                HYPERBATON: TaskOutcome(hyperbaton, routing_stats=stats[0]),
                NAVIGATE: TaskOutcome(navigate, routing_stats=stats[1]),
                WINOWHY: TaskOutcome(winowhy, routing_stats=stats[2]),
            },
            held_in=[HYPERBATON, NAVIGATE],
            held_out=[WINOWHY],
        )
    return scores


def _board(client: TestClient, **params: str) -> list[list[str]]:
    response = client.get("/", params=params)
    assert response.status_code == 200, response.text
    return table_rows(response.text, "leaderboard")


def _numbers(rows: list[list[str]]) -> list[str]:
    """Release cells ('#5', ...) of release rows, in order (the Oracle row is 'oracle')."""
    return [row[0].split()[0] for row in rows]


# --- leaderboard ------------------------------------------------------------------------


def test_leaderboard_shows_every_evaluated_release_best_mean_first_after_the_oracle(client, world):
    rows = _board(client)
    assert _numbers(rows) == ["oracle", "#5", "#3", "#2", "#4", "#1"]
    oracle, phatgoose = rows[0], rows[1]
    # Oracle per task: hyperbaton 0.80 (#2), navigate 0.70 (#3), winowhy 0.55 (#3).
    assert oracle[4].startswith(f"{(0.80 + 0.70 + 0.55) / 3:.3f}")
    assert phatgoose[1].startswith("phatgoose k=2")
    assert phatgoose[2] == "tiny"
    assert phatgoose[4].startswith(f"{(0.75 + 0.65 + 0.60) / 3:.3f}")


def test_leaderboard_cells_show_accuracy_stderr_n_evaluator_and_date(client, world):
    row = _board(client)[1]
    hyperbaton = row[8]  # after the mean, the group means and Δ vs base, tasks by name
    stderr = math.sqrt(0.75 * 0.25 / 40)
    assert hyperbaton == f"0.750 ±{stderr:.3f} n=40"
    assert row[-2] == "0.1.0"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row[-1])


def test_leaderboard_shows_held_in_and_held_out_means_beside_the_mean(client, world):
    rows = _board(client)
    phatgoose, oracle = rows[1], rows[0]
    assert phatgoose[5:7] == [f"{(0.75 + 0.65) / 2:.3f}", "0.600"]
    assert oracle[5:7] == [f"{(0.80 + 0.70) / 2:.3f}", "0.550"]
    by_held_out = _board(client, sort="held-out", order="desc")
    assert _numbers(by_held_out)[1:] == ["#5", "#3", "#1", "#2", "#4"]


def test_leaderboard_marks_baselines_and_links_each_release(client, world):
    html = client.get("/ui/leaderboard").text
    assert '<a href="/ui/releases/5">#5</a>' in html
    base_row = next(r for r in _board(client) if r[0].startswith("#1"))
    assert "baseline" in base_row[0]
    merged_row = next(r for r in _board(client) if r[0].startswith("#4"))
    assert "baseline" in merged_row[0]


def test_leaderboard_filters_by_method(client, world):
    assert _numbers(_board(client, method="single")) == ["#3", "#2"]
    assert _numbers(_board(client, method="oracle")) == ["oracle"]


def test_leaderboard_filters_by_base_model(client, world):
    assert len(_board(client, base_model="tiny")) == 6
    html = client.get("/", params={"base_model": "elsewhere"}).text
    assert "No evaluation results match these filters" in html


def test_held_out_view_shows_only_held_out_tasks_and_their_mean(client, world):
    html = client.get("/", params={"split": "held-out"}).text
    rows = table_rows(html, "leaderboard")
    assert _numbers(rows) == ["oracle", "#5", "#3", "#1", "#2", "#4"]
    assert "sort=task%3Awinowhy" in html and "sort=task%3Ahyperbaton" not in html
    phatgoose = rows[1]
    assert phatgoose[4].startswith("0.600") and len(phatgoose) == 5 + 1 + 1 + 2


def test_held_in_view_averages_held_in_tasks(client, world):
    rows = _board(client, split="held-in")
    assert rows[1][0].startswith("#2") or rows[1][0].startswith("#5")
    mean_of = {r[0].split()[0]: r[4].split()[0] for r in rows}
    assert mean_of["#5"] == f"{(0.75 + 0.65) / 2:.3f}"
    assert mean_of["oracle"] == f"{(0.80 + 0.70) / 2:.3f}"


def test_leaderboard_sorts_by_a_task_column_in_sql(client, world):
    rows = _board(client, sort="task:navigate", order="desc")
    assert _numbers(rows)[1:] == ["#3", "#5", "#4", "#1", "#2"]
    rows = _board(client, sort="task:navigate", order="asc")
    assert _numbers(rows)[1:] == ["#2", "#1", "#4", "#5", "#3"]


def test_leaderboard_sorts_by_release_number(client, world):
    assert _numbers(_board(client, sort="release", order="asc"))[1:] == [
        "#1",
        "#2",
        "#3",
        "#4",
        "#5",
    ]


def test_leaderboard_pages_with_limit_and_offset(client, world):
    html = client.get("/", params={"limit": 2, "offset": 2}).text
    assert _numbers(table_rows(html, "leaderboard")) == ["oracle", "#2", "#4"]
    assert 'data-total="5"' in html
    assert "3–4 of" in html


def test_leaderboard_limit_above_the_maximum_is_refused(client, world):
    assert client.get("/", params={"limit": queries.MAX_PAGE_SIZE + 1}).status_code == 422


def test_the_json_leaderboard_is_left_to_its_own_route(client, world):
    response = client.get("/leaderboard")
    assert response.headers["content-type"].startswith("application/json")


def test_oracle_takes_the_best_single_expert_release_per_task(app, world):
    with app.state.sessionmaker() as session:
        (oracle,) = queries.oracle_rows(session)
    assert {task: (s.accuracy, s.source_number) for task, s in oracle.scores.items()} == {
        HYPERBATON: (0.80, 2),
        NAVIGATE: (0.70, 3),
        WINOWHY: (0.55, 3),
    }


def test_empty_leaderboard_says_so(client):
    response = client.get("/")
    assert response.status_code == 200
    assert "No evaluation results yet" in response.text


def test_method_plot_is_a_png(client, world):
    response = client.get("/ui/leaderboard/methods.png", params={"split": "held-out"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    width, height = png_size(response.content)
    assert width >= 600 and height >= 200


def test_method_means_take_each_methods_best_release(app, world):
    with app.state.sessionmaker() as session:
        means = {m.method: m for m in queries.method_means(session)}
    assert set(means) == {"base", "single", "merged", "phatgoose", "oracle"}
    assert means["single"].label == "#3 single"
    assert means["phatgoose"].mean == pytest.approx((0.75 + 0.65 + 0.60) / 3)
    stderrs = [TaskOutcome(a).stderr for a in (0.75, 0.65, 0.60)]
    assert means["phatgoose"].stderr == pytest.approx(math.sqrt(sum(s * s for s in stderrs)) / 3)


# --- release page -----------------------------------------------------------------------


def test_release_page_shows_manifest_with_linked_expert_versions(client, world):
    response = client.get("/ui/releases/5")
    assert response.status_code == 200
    rows = table_rows(response.text, "release-experts")
    assert [r[1] for r in rows] == ["alice/hyperbaton", "alice/navigate"]
    assert "/ui/experts/alice/hyperbaton#v1" in response.text
    assert "phatgoose, k=2" in response.text
    assert "<dt>Router numerics</dt><dd>2 (scale-free router rows)</dd>" in response.text


def test_release_page_lists_scores_per_task(client, world):
    rows = table_rows(client.get("/ui/releases/5").text, "release-scores")
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == [
        (HYPERBATON, "held-in", "0.750", "40"),
        (NAVIGATE, "held-in", "0.650", "40"),
        (WINOWHY, "held-out", "0.600", "40"),
    ]


def test_release_page_shows_kl_from_the_oracle_per_task(client, world):
    html = client.get("/ui/releases/5").text
    values = re.findall(r'class="kl-value">([^<]+)<', html)
    # hyperbaton: oracle = hyperbaton expert, p = 0.625; navigate: oracle = navigate, p = 0.375;
    # winowhy: oracle = navigate (0.55 > 0.50), never chosen there.
    assert values == [f"{-math.log(0.625):.3f}", f"{-math.log(0.375):.3f}", "∞"]
    assert "alice/navigate@1" in html


def test_release_page_embeds_one_heatmap_per_task_with_routing(client, world, app):
    html = client.get("/ui/releases/5").text
    sources = re.findall(r'<img class="heatmap" src="([^"]+)"', html)
    assert len(sources) == 3
    for source in sources:
        response = client.get(source)
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        width, height = png_size(response.content)
        assert 400 <= width <= 1500 and 200 <= height <= 1500
        assert len(response.content) > 5_000


def test_release_without_routing_says_so_and_has_no_heatmap(client, world):
    html = client.get("/ui/releases/4").text
    assert 'class="heatmap"' not in html
    assert "No routing statistics for this task" in html


def test_release_page_says_when_no_oracle_is_available(client, world, app):
    record_evaluation(app, 5, {"strategyqa": TaskOutcome(0.5, routing_stats=PHATGOOSE_STATS)})
    html = client.get("/ui/releases/5").text
    assert "KL not available: no Oracle" in html


def test_heatmap_of_a_result_without_routing_is_404(client, world):
    html = client.get("/ui/releases/4").text
    result_id = re.search(r'id="task-(\d+)"', html)
    assert result_id is not None
    assert client.get(f"/ui/results/{result_id.group(1)}/routing.png").status_code == 404


def test_unknown_release_page_is_404(client):
    response = client.get("/ui/releases/99")
    assert response.status_code == 404
    assert "There is no release #99" in response.text


def test_releases_page_lists_newest_first_and_filters_by_method(client, world):
    rows = table_rows(client.get("/ui/releases").text, "table0")
    assert [r[0] for r in rows] == ["#5", "#4", "#3", "#2", "#1"]
    rows = table_rows(client.get("/ui/releases", params={"method": "single"}).text, "table0")
    assert [r[0] for r in rows] == ["#3", "#2"]


# --- analysis ---------------------------------------------------------------------------


def test_routing_distribution_is_each_experts_share_of_all_selections():
    routing = analysis.per_layer_routing(PHATGOOSE_STATS)
    assert analysis.routing_distribution(routing) == pytest.approx([0.625, 0.375])
    counts = {
        "model.layers.0.q": [30, 10],
        "model.layers.0.up": [20, 20],
        "model.layers.1.q": [5, 15],
    }
    stored = analysis.per_layer_routing(_stored(counts))
    raw = analysis.per_layer_routing({"experts": ["h", "n"], "top_k": 2, "counts": counts})
    # 55 of 100 selections went to the first expert, whether read from `overall`, from the
    # layers weighted by their selections, or from a plain mean of (50/80, 5/20).
    assert analysis.routing_distribution(stored) == pytest.approx([0.55, 0.45])
    weighted = analysis.LayerRouting(stored.experts, stored.layers, stored.frequencies, 2, [80, 20])
    assert analysis.routing_distribution(weighted) == pytest.approx([0.55, 0.45])
    assert analysis.routing_distribution(raw) == pytest.approx([(50 / 80 + 5 / 20) / 2, 0.5625])


def test_routing_distribution_leaves_out_layers_that_selected_nothing():
    routing = analysis.LayerRouting(
        experts=["a", "b"],
        layers=["l.0", "l.1", "l.2"],
        frequencies=[[1.0, 0.0, 0.5], [0.0, 0.0, 0.5]],
        top_k=1,
        selections=[4, 0, 4],
    )
    assert analysis.routing_distribution(routing) == pytest.approx([0.75, 0.25])


def test_kl_from_a_one_hot_oracle_is_minus_log_its_share():
    p = [0.5, 0.3, 0.2]
    direct = sum(q * math.log(q / p[i]) for i, q in enumerate([0.0, 1.0, 0.0]) if q > 0)
    assert analysis.kl_from_oracle(p, 1) == pytest.approx(direct) == pytest.approx(-math.log(0.3))
    assert analysis.kl_from_oracle(p, 2) > analysis.kl_from_oracle(p, 0)
    assert math.isinf(analysis.kl_from_oracle([1.0, 0.0], 1))


def test_per_layer_routing_reads_the_stored_layers_and_raw_counts_alike():
    counts = {
        "model.layers.0.q": [30, 10],
        "model.layers.0.up": [20, 20],
        "model.layers.1.q": [5, 15],
    }
    stored = analysis.per_layer_routing(_stored(counts))
    raw = analysis.per_layer_routing({"experts": ["h", "n"], "top_k": 2, "counts": counts})
    assert stored.layers == raw.layers == ["model.layers.0", "model.layers.1"]
    for routing in (stored, raw):
        assert routing.frequencies[0] == pytest.approx([50 / 80, 5 / 20])
        assert routing.frequencies[1] == pytest.approx([30 / 80, 15 / 20])


def test_unreadable_statistics_are_refused_with_a_reason():
    with pytest.raises(analysis.UnreadableStats, match="counts 1 experts"):
        analysis.per_layer_routing({"experts": ["a", "b"], "counts": {"m.0.q": [1]}})
    with pytest.raises(analysis.UnreadableStats, match="another shape"):
        analysis.per_layer_routing({"experts": ["a"], "layers": ["l.0"], "frequencies": [[1, 0]]})


# --- catalog ----------------------------------------------------------------------------


def test_catalog_lists_experts_with_their_latest_version(client, world):
    rows = table_rows(client.get("/ui/experts").text, "experts")
    assert [r[0] for r in rows] == ["alice/hyperbaton", "alice/navigate"]
    assert rows[0][1] == "Adjective order in English sentences"
    assert rows[0][2] == "tiny" and rows[0][3] == "Apache-2.0"


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"q": "WALKING"}, ["alice/navigate"]),
        ({"q": "hyper"}, ["alice/hyperbaton"]),
        ({"q": "alice/nav"}, ["alice/navigate"]),
        ({"q": "100%"}, []),
        ({"namespace": "alice"}, ["alice/hyperbaton", "alice/navigate"]),
        ({"namespace": "bob"}, []),
        ({"base_model": "tiny", "q": "order"}, ["alice/hyperbaton"]),
        ({"base_model": "other"}, []),
    ],
)
def test_catalog_search(client, world, params, expected):
    html = client.get("/ui/experts", params=params).text
    rows = table_rows(html, "experts") if expected else []
    assert [r[0] for r in rows] == expected
    if not expected:
        assert "No experts." in html


def test_yanked_expert_shows_its_reason(client, world, alice):
    response = client.post(
        "/api/v1/experts/alice/navigate/1/yank", headers=alice, json={"reason": "leaks a name"}
    )
    assert response.status_code == 200
    html = client.get("/ui/experts/alice/navigate").text
    assert "yanked" in html and "leaks a name" in html
    rows = table_rows(client.get("/ui/experts", params={"status": "yanked"}).text, "experts")
    assert [r[0] for r in rows] == ["alice/navigate"]
    rows = table_rows(client.get("/ui/experts", params={"status": "active"}).text, "experts")
    assert [r[0] for r in rows] == ["alice/hyperbaton"]


def test_expert_card_shows_manifest_training_versions_and_releases(client, world):
    html = client.get("/ui/experts/alice/hyperbaton").text
    assert "Adjective order in English sentences" in html
    assert "Contributed by <strong>alice</strong>" in html
    assert "Apache-2.0" in html
    assert "LoRA steps" in html and "gate steps" in html
    assert 'id="v1"' in html
    assert 'href="/ui/releases/2"' in html and 'href="/ui/releases/5"' in html
    assert "/api/v1/experts/alice/hyperbaton/1/files/adapter_model.safetensors" in html


def test_unknown_expert_page_is_404(client):
    response = client.get("/ui/experts/alice/nothing")
    assert response.status_code == 404
    assert "no expert named alice/nothing" in response.text


def test_static_files_are_served_and_nothing_else(client):
    assert client.get("/ui/static/site.css").headers["content-type"].startswith("text/css")
    assert client.get("/ui/static/site.js").status_code == 200
    assert client.get("/ui/static/..%2Fqueries.py").status_code == 404


def test_pages_load_nothing_from_other_hosts(client, world):
    for path in (
        "/",
        "/ui/releases",
        "/ui/releases/5",
        "/ui/experts",
        "/ui/experts/alice/navigate",
    ):
        html = client.get(path).text
        assert not re.search(r'(src|href)="(https?:)?//', html.replace('href="https://arxiv', ""))


def test_pages_follow_the_read_policy(make_app, settings):
    private = make_app(settings.model_copy(update={"public_read": False}))
    with TestClient(private) as client:
        for path in ("/", "/ui/releases", "/ui/experts", "/ui/leaderboard/methods.png"):
            assert client.get(path).status_code == 401, path


def test_a_single_release_over_several_experts_counts_for_the_expert_it_names(
    app, client, maintainer, world
):
    both = ["alice/hyperbaton@1", "alice/navigate@1"]
    number = create_release(
        client, maintainer, method="single", experts=both, expert="alice/navigate"
    )
    record_evaluation(app, number, {HYPERBATON: TaskOutcome(0.9)})
    with app.state.sessionmaker() as session:
        (oracle,) = queries.oracle_rows(session)
    assert (oracle.scores[HYPERBATON].accuracy, oracle.scores[HYPERBATON].source_number) == (
        0.9,
        number,
    )
    html = client.get("/ui/releases/5").text
    assert re.findall(r'class="kl-value">([^<]+)<', html)[0] == f"{-math.log(0.375):.3f}"


def test_contributed_text_is_escaped(client, alice, tiny_base, tmp_path):
    publish_expert(
        client,
        alice,
        tiny_base,
        tmp_path / "package",
        "alice/tricky",
        description="<script>alert(1)</script>",
    )
    for path in ("/ui/experts", "/ui/experts/alice/tricky"):
        html = client.get(path).text
        assert "<script>alert(1)</script>" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


# --- method parameters ---------------------------------------------------------------------


@pytest.fixture
def merges(app, client, maintainer, world):
    """Beside `world`: #6 TIES (density 0.5) over both experts and #7 TIES over hyperbaton
    alone, which outscores every single-expert release on every task."""
    both = ["alice/hyperbaton@1", "alice/navigate@1"]
    params = {"density": 0.5}
    assert create_release(client, maintainer, method="ties", experts=both, params=params) == 6
    alone = ["alice/hyperbaton@1"]
    assert create_release(client, maintainer, method="ties", experts=alone) == 7
    for release, accuracy in ((6, 0.7), (7, 0.95)):
        record_evaluation(
            app,
            release,
            {task: TaskOutcome(accuracy) for task in (HYPERBATON, NAVIGATE, WINOWHY)},
            held_in=[HYPERBATON, NAVIGATE],
            held_out=[WINOWHY],
        )


def test_the_leaderboard_shows_a_releases_params_beside_its_method(client, merges):
    rows = {r[0].split()[0]: r for r in _board(client)}
    assert rows["#6"][1] == "ties density 0.5, scale 1"
    assert rows["#5"][1] == "phatgoose k=2"
    assert rows["#4"][1] == "merged"
    json_rows = {r["release"]: r for r in client.get("/leaderboard").json()["releases"]}
    assert json_rows[6]["method_params"] == {"density": 0.5, "scale": 1.0}
    assert json_rows[5]["method_params"] == {}


def test_merges_with_params_are_baselines_and_token_routers_are_not():
    assert set(queries.BASELINE_METHODS) == {"base", "merged", "ties", "dare"}
    assert queries.release_kind("ties") == queries.release_kind("dare") == "baseline"
    assert queries.release_kind("spectr") == queries.release_kind("retrieval") == "release"


def test_a_ties_release_is_marked_a_baseline_on_the_leaderboard(client, merges):
    ties = next(r for r in _board(client) if r[0].startswith("#6"))
    assert "baseline" in ties[0]


def test_a_one_expert_ties_release_is_not_that_expert_for_the_oracle(app, merges):
    with app.state.sessionmaker() as session:
        (oracle,) = queries.oracle_rows(session)
    assert {s.source_number for s in oracle.scores.values()} == {2, 3}


def test_the_release_page_shows_the_methods_params(client, merges):
    html = client.get("/ui/releases/6").text
    assert '<span class="method">ties, density 0.5, scale 1</span>' in html
    assert '<dd id="method-params">density 0.5, scale 1</dd>' in html
    html = client.get("/ui/releases/5").text
    assert '<dd id="method-params">none</dd>' in html


def test_the_releases_page_shows_each_releases_params(client, merges):
    rows = table_rows(client.get("/ui/releases").text, "table0")
    by_number = {r[0]: r for r in rows}
    assert by_number["#6"][1:3] == ["ties density 0.5, scale 1", "–"]
    assert by_number["#5"][1:3] == ["phatgoose", "2"]


def test_the_expert_card_names_its_releases_with_their_params(client, merges):
    html = client.get("/ui/experts/alice/navigate").text
    assert "#6 ties, density 0.5, scale 1</a>" in html
    assert "#5 phatgoose, k=2</a>" in html

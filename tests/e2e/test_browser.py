"""The pages in a real browser: Debian's chromium, headless, driven by Playwright, against a
coordinator on loopback whose results the real evaluation worker computed on a tiny model.

Install what this needs with `scripts/install-browser`. Without a browser every test here
is skipped, saying why. Screenshots go to `$PHATGOOSE_SCREENSHOT_DIR` (default: the test's
temporary directory).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from coordinator.auth.models import Role
from coordinator.base_models.service import register_base_model
from coordinator.core.app import create_app
from coordinator.core.config import Settings
from coordinator.worker import DatabaseBackend, Worker, WorkerOptions
from phatgoose.expert import Expert
from protocol import lora_key
from tests.coordinator.helpers import bearer_headers, live_server, make_tiny_base, upload
from tests.coordinator.release_helpers import create_release, save_base
from tests.coordinator.web_helpers import publish_expert

CHROMIUM = os.environ.get("PHATGOOSE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HELD_IN, HELD_OUT = ("hyperbaton", "navigate"), ("winowhy",)
TASKS = HELD_IN + HELD_OUT
EXPERTS = {
    "alice/hyperbaton": "Adjective order in English sentences (BIG-bench hyperbaton).",
    "alice/navigate": "Does a list of steps lead back to the start? (BIG-bench navigate)",
    "alice/sports_understanding": "Is a sentence about sports plausible?",
}
# alice/hyperbaton@2: @1 trained further on this layer alone (its lora_B and gates change;
# lora_A and every other layer stay byte-identical).
RETRAINED, RETRAINED_LAYER = "alice/hyperbaton", "model.layers.1"
CREDITED = 6  # the PHATGOOSE release, whose leave-one-out evaluations the worker computes
# A release channel over every admitted expert: the worker builds its first release (#7) from
# the catalog above, then, once bob publishes an expert, its second (#8); each evaluated.
CHANNEL, NEWCOMER = "community/latest", "bob/winowhy"
CHANNEL_FIRST, CHANNEL_SECOND = 7, 8

pytestmark = pytest.mark.slow


def _write_task(tasks_dir: Path, name: str, examples: int, seed: int) -> None:
    """A BIG-bench style multiple-choice task whose answers vary (yes and no)."""
    rows = []
    for i in range(examples):
        a, b = (i * 7 + seed) % 10, (i * 3 + 2 * seed + 1) % 10
        rows.append(
            {
                "input": f"is {a} more than {b}?",
                "target_scores": {"yes": int(a > b), "no": int(a <= b)},
            }
        )
    (tasks_dir / name).mkdir(parents=True, exist_ok=True)
    (tasks_dir / name / "task.json").write_text(json.dumps({"name": name, "examples": rows}))


def _publish_retrained(
    client: TestClient, headers: dict[str, str], first: Path, directory: Path
) -> dict[str, Any]:
    """Version 2 of the expert packaged in `first`: `RETRAINED_LAYER`'s lora_B and gates
    moved, everything else as it was (the diff page shows which tensors are identical)."""
    expert = Expert.load(first)
    generator = torch.Generator().manual_seed(99)
    for path, gate in expert.gates.items():
        if path.startswith(RETRAINED_LAYER + "."):
            expert.gates[path] = gate + torch.randn(gate.shape, generator=generator)
            b = expert.lora_weights[lora_key(path, "B")]
            expert.lora_weights[lora_key(path, "B")] = b + 0.5 * b.std() * torch.randn(
                b.shape, generator=generator
            )
    training = expert.manifest.training.model_copy(update={"steps": 40})
    expert.manifest = expert.manifest.model_copy(update={"training": training})
    expert.save(directory)
    response = upload(client, headers, directory)
    assert response.status_code == 201, response.text
    return response.json()


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        found = shutil.which("chromium")
        hint = f" (a chromium is at {found}: set PHATGOOSE_CHROMIUM)" if found else ""
        return f"no chromium at {CHROMIUM}{hint}; run scripts/install-browser"
    return None


@pytest.fixture(scope="module")
def coordinator_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A live coordinator: three experts (the first in two versions), six releases (base,
    single x3, merged, PHATGOOSE k=2), each evaluated by the real worker on three tiny tasks,
    and the PHATGOOSE release's credit: its three leave-one-out evaluations on the same
    tasks, also run by the worker. Then the channel `CHANNEL` (PHATGOOSE k=2 over every
    admitted expert, evaluated on the same tasks), which the worker advances to its first
    release and, after `NEWCOMER` is published, to its second."""
    reason = _browser_missing()
    if reason:
        pytest.skip(f"browser test skipped: {reason}")
    root = tmp_path_factory.mktemp("browser")
    tiny = make_tiny_base()
    settings = Settings(
        data_dir=root / "data",
        database_url=f"sqlite:///{root / 'coordinator.sqlite'}",
        log_level="WARNING",
    )
    app = create_app(settings)
    with app.state.sessionmaker() as session:
        register_base_model(session, tiny.spec)
    alice = bearer_headers(app, "alice", Role.CONTRIBUTOR)
    carol = bearer_headers(app, "carol", Role.MAINTAINER)
    bob = bearer_headers(app, "bob", Role.CONTRIBUTOR)
    tasks_dir = root / "tasks"
    for seed, task in enumerate(TASKS):
        _write_task(tasks_dir, task, examples=24, seed=seed)
    with TestClient(app) as client:
        for seed, (name, description) in enumerate(EXPERTS.items()):
            publish_expert(
                client, alice, tiny, root / f"pkg{seed}", name, description=description, seed=seed
            )
        assert (
            _publish_retrained(client, alice, root / "pkg0", root / "pkg0-v2")["ref"]
            == f"{RETRAINED}@2"
        )
        refs = [f"{name}@1" for name in EXPERTS]
        spec = {
            "tasks": list(TASKS),
            "examples_per_task": 16,
            "task_groups": {"held_in": list(HELD_IN), "held_out": list(HELD_OUT)},
        }
        for body in (
            {"method": "base", "base_model": "tiny"},
            *({"method": "single", "experts": [ref]} for ref in refs),
            {"method": "merged", "experts": refs},
            {"method": "phatgoose", "experts": refs, "top_k": 2},
        ):
            number = create_release(client, carol, **body)["number"]
            response = client.post(
                "/api/v1/evaluations", headers=carol, json={"release": number, **spec}
            )
            assert response.status_code == 201, response.text
        # The full evaluation is the one just queued: only the leave-one-out ones are new.
        response = client.post(f"/api/v1/releases/{CREDITED}/credit", headers=carol, json=spec)
        assert response.status_code == 201, response.text
        assert len(response.json()["queued"]) == len(EXPERTS)
        response = client.post(
            "/api/v1/channels",
            headers=carol,
            json={"name": CHANNEL, "method": "phatgoose", "top_k": 2, "spec": spec},
        )
        assert response.status_code == 201, response.text
        options = WorkerOptions(
            base_models={"tiny": str(save_base(tiny, root / "base"))},
            tasks_dir=tasks_dir,
            poll_seconds=0.05,
        )
        # With the settings, the worker advances the channel before each claim.
        worker = Worker(DatabaseBackend(app.state.sessionmaker, app.state.blobs, settings), options)
        assert worker.run(once=True) == 6 + len(EXPERTS) + 1  # and the channel's first release
        publish_expert(
            client,
            bob,
            tiny,
            root / "pkg-newcomer",
            NEWCOMER,
            description="Winograd schemas: is the reason right? (BIG-bench winowhy)",
            seed=len(EXPERTS),
        )
        assert worker.run(once=True) == 1  # the channel's second release
    with live_server(app) as url:
        yield url
    app.state.engine.dispose()


@pytest.fixture(scope="module")
def browser_context(
    tmp_path_factory: pytest.TempPathFactory, coordinator_url: str
) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # a new, empty profile
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        context.set_default_timeout(20_000)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser_context: Any) -> Iterator[Any]:
    page = browser_context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    page.close()
    assert not errors, f"JavaScript errors: {errors}"


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = os.environ.get("PHATGOOSE_SCREENSHOT_DIR")
    path = Path(directory) if directory else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _first_column(page: Any) -> list[str]:
    return [
        text.split()[0]
        for text in page.locator("#leaderboard tbody.rows tr td:first-child").all_inner_texts()
    ]


def _image_width(page: Any, selector: str) -> int:
    locator = page.locator(selector)
    locator.scroll_into_view_if_needed()
    locator.evaluate(
        "img => img.complete || new Promise(r => { img.onload = r; img.onerror = r; })"
    )
    return int(locator.evaluate("img => img.naturalWidth"))


def _rows(page: Any, table: str) -> list[list[str]]:
    """The body rows of `table` (a selector), each a list of its cells' visible texts, white
    space collapsed (an interval may wrap onto a line of its own)."""
    return page.locator(f"{table} tbody tr").evaluate_all(
        "rows => rows.map(row => Array.from("
        "row.cells, cell => cell.innerText.replace(/\\s+/g, ' ').trim()))"
    )


def _api(page: Any, url: str) -> Any:
    response = page.request.get(url)
    assert response.ok, f"GET {url}: {response.status} {response.text()}"
    return response.json()


def test_leaderboard_sorts_when_a_header_is_clicked(page, coordinator_url, screenshots):
    page.goto(coordinator_url + "/")
    numbers = [f"#{number}" for number in range(1, CHANNEL_SECOND + 1)]
    assert page.locator("#leaderboard tbody.rows tr").count() == len(numbers)
    assert page.locator("#leaderboard tbody.pinned tr.oracle").count() == 1
    page.screenshot(path=str(screenshots / "leaderboard.png"), full_page=True)

    page.locator('#leaderboard th[data-sort-key="release"] a').click()
    assert _first_column(page) == numbers[::-1]
    page.locator('#leaderboard th[data-sort-key="release"] a').click()
    assert _first_column(page) == numbers
    assert "sort=release" in page.url and "order=asc" in page.url

    header = page.locator('#leaderboard th[data-sort-key="task:navigate"]')
    column = int(header.evaluate("th => th.cellIndex")) + 1
    header.locator("a").click()
    cells = page.locator(f"#leaderboard tbody.rows tr td:nth-child({column})").all()
    values = [float(cell.get_attribute("data-value") or "nan") for cell in cells]
    assert values == sorted(values, reverse=True)


def test_leaderboard_filters_by_method_and_split(page, coordinator_url):
    page.goto(coordinator_url + "/ui/leaderboard")
    with page.expect_navigation():
        page.select_option('select[name="method"]', "single")
    assert "method=single" in page.url
    assert sorted(_first_column(page)) == ["#2", "#3", "#4"]
    assert page.locator("#leaderboard tbody.pinned").count() == 0

    page.goto(coordinator_url + "/ui/leaderboard")
    with page.expect_navigation():
        page.select_option('select[name="split"]', "held-out")
    headers = page.locator("#leaderboard thead tr:first-child th.task").all_inner_texts()
    assert [h.strip() for h in headers] == ["winowhy"]


def test_method_plot_renders(page, coordinator_url):
    page.goto(coordinator_url + "/")
    assert _image_width(page, "#methods-plot") > 0


def test_release_page_renders_heatmaps_and_kl(page, coordinator_url, screenshots):
    page.goto(coordinator_url + "/")
    with page.expect_navigation():
        page.locator('#leaderboard a[href="/ui/releases/6"]').click()
    assert page.url.endswith("/ui/releases/6")
    heatmaps = page.locator("img.heatmap")
    assert heatmaps.count() == len(TASKS)
    for index in range(heatmaps.count()):
        assert _image_width(page, f"article.task:nth-of-type({index + 1}) img.heatmap") > 0
    kls = page.locator(".kl-value").all_inner_texts()
    assert len(kls) == len(TASKS)
    assert all(re.fullmatch(r"\d+\.\d{3}|∞", kl.strip()) for kl in kls)
    page.screenshot(path=str(screenshots / "release.png"), full_page=True)


def test_links_lead_from_a_release_to_its_experts(page, coordinator_url, screenshots):
    page.goto(coordinator_url + "/ui/releases/6")
    with page.expect_navigation():
        page.locator("#release-experts a", has_text="alice/navigate").click()
    assert "/ui/experts/alice/navigate" in page.url
    assert page.locator("article.card#v1").is_visible()
    page.screenshot(path=str(screenshots / "expert.png"), full_page=True)
    with page.expect_navigation():
        page.locator('a[href="/ui/releases/3"]').click()
    assert page.locator("h1").inner_text().startswith("Release #3")


def test_catalog_search(page, coordinator_url, screenshots):
    page.goto(coordinator_url + "/ui/experts")
    assert page.locator("#experts tbody tr").count() == len(EXPERTS) + 1  # and NEWCOMER
    page.fill('input[name="q"]', "navig")
    with page.expect_navigation():
        page.press('input[name="q"]', "Enter")
    rows = page.locator("#experts tbody tr").all_inner_texts()
    assert len(rows) == 1 and "alice/navigate" in rows[0]
    page.screenshot(path=str(screenshots / "experts.png"), full_page=True)


def test_a_later_version_links_to_its_diff_and_its_per_layer_plot(
    page, coordinator_url, screenshots
):
    page.goto(f"{coordinator_url}/ui/experts/{RETRAINED}")
    assert page.locator("article.card#v1 a.diff-link").count() == 0  # nothing before @1
    with page.expect_navigation():
        page.locator("article.card#v2 a.diff-link").click()
    assert page.url.endswith(f"/ui/experts/{RETRAINED}/2/diff")
    assert page.locator("h1").inner_text() == f"{RETRAINED}@2 against {RETRAINED}@1"
    assert _image_width(page, "#diff-plot") > 0
    page.screenshot(path=str(screenshots / "diff.png"), full_page=True)

    diff = _api(page, f"{coordinator_url}/api/v1/experts/{RETRAINED}/2/diff")["diff"]
    rows = _rows(page, "#diff-modules")
    assert [row[0] for row in rows] == [m["path"] for m in diff["modules"]]
    retrained = [row for row in rows if row[0].startswith(RETRAINED_LAYER + ".")]
    kept = [row for row in rows if not row[0].startswith(RETRAINED_LAYER + ".")]
    assert retrained and kept
    for row, module in zip(rows, diff["modules"], strict=True):
        assert row[2] == "4 → 4"
        assert row[5] == f"{module['relative_change']:.4g}"
        assert row[6] == f"{module['gate_cosine']:.4g}"
    # Status, relative change, gate cosine, then lora_A, lora_B, gate: byte-identical or not.
    assert {(row[1], row[5], row[6], *row[7:]) for row in kept} == {
        ("unchanged", "0", "1", "identical", "identical", "identical")
    }
    for row in retrained:
        assert row[1] == "changed" and float(row[5]) > 0 and float(row[6]) < 1
        assert row[7:] == ["identical", "differs", "differs"]
    assert page.locator("#modules-changed").inner_text() == str(len(retrained))
    assert page.locator("#modules-unchanged").inner_text() == str(len(kept))
    layers = {row[0]: row for row in _rows(page, "#diff-layers")}
    assert layers["model.layers.0"][2:] == ["0", "0", "0", "0", "0", "1"]
    assert (
        layers[RETRAINED_LAYER][2] == str(len(retrained)) and float(layers[RETRAINED_LAYER][5]) > 0
    )
    files = {row[0]: row[1] for row in _rows(page, "#diff-files")}
    assert files == {
        "adapter_config.json": "identical",
        "adapter_model.safetensors": "differ",
        "expert.json": "differ",  # the training summary says 40 steps
        "router.safetensors": "differ",
    }


def test_the_diff_page_compares_with_another_expert_on_the_same_base(page, coordinator_url):
    page.goto(f"{coordinator_url}/ui/experts/{RETRAINED}/2/diff")
    page.fill('input[name="against"]', "alice/navigate@1")
    with page.expect_navigation():
        page.press('input[name="against"]', "Enter")
    assert "against=alice%2Fnavigate%401" in page.url
    assert page.locator("h1").inner_text() == f"{RETRAINED}@2 against alice/navigate@1"
    rows = _rows(page, "#diff-modules")
    assert rows and all(row[1] == "changed" and row[7:] == ["differs"] * 3 for row in rows)
    assert page.locator("#modules-changed").inner_text() == str(len(rows))
    assert _image_width(page, "#diff-plot") > 0


_DELTA = re.compile(r"(?:([▲▼]) )?([+-]\d\.\d{3}) \[([+-]\d\.\d{3}), ([+-]\d\.\d{3})\]")


def test_release_page_shows_each_experts_leave_one_out_contribution(
    page, coordinator_url, screenshots
):
    credit = _api(page, f"{coordinator_url}/api/v1/releases/{CREDITED}/credit")
    page.goto(f"{coordinator_url}/ui/releases/{CREDITED}")
    page.locator("#contributions").screenshot(path=str(screenshots / "contributions.png"))

    rows = _rows(page, "#release-credit")
    assert [row[:2] for row in rows] == [[f"{name}@1", "alice"] for name in EXPERTS]
    shares = [float(row[2].removesuffix("%")) for row in rows]
    assert abs(sum(shares) - 100) < 0.2  # each expert's share of the top-k selections
    for row, expert in zip(rows, credit["experts"], strict=True):
        assert expert["state"] == "done"
        assert row[2] == f"{100 * expert['routing_share']:.1f}%"
        for cell, group in zip(row[3:6], ("held_in", "held_out", "all"), strict=True):
            match = _DELTA.fullmatch(cell)
            assert match, f"{expert['ref']} {group}: {cell!r} is not a difference [interval]"
            marker, delta, low, high = match.groups()
            difference = expert["means"][group]["difference"]
            assert (delta, low, high) == tuple(
                f"{difference[key]:+.3f}" for key in ("delta", "low", "high")
            )
            assert float(low) <= float(delta) <= float(high)
            assert (marker is not None) == difference["significant"]
        assert row[6] == "per task"

    with page.expect_navigation():
        page.locator("#release-credit a", has_text="per task").first.click()
    assert f"a={CREDITED}&b={CREDITED}" in page.url
    assert [row[0] for row in _rows(page, "#comparison-tasks")] == sorted(TASKS)


def test_an_uncredited_release_lists_its_experts_without_numbers(page, coordinator_url):
    page.goto(f"{coordinator_url}/ui/releases/5")  # merged: evaluated, never credited
    rows = _rows(page, "#release-credit")
    assert [row[0] for row in rows] == [f"{name}@1" for name in EXPERTS]
    # A merge routes nothing per token: no routing share.
    assert {tuple(row[2:]) for row in rows} == {("–", "–", "–", "–", "missing")}


def test_expert_page_shows_its_credit_in_the_release(page, coordinator_url, screenshots):
    credit = _api(page, f"{coordinator_url}/api/v1/releases/{CREDITED}/credit")
    mine = next(e for e in credit["experts"] if e["ref"] == "alice/navigate@1")
    held_out = mine["means"]["held_out"]["difference"]
    page.goto(f"{coordinator_url}/ui/experts/alice/navigate")
    line = page.locator("article.card#v1 p.credit")
    points = [f"{100 * held_out[key]:+.1f}" for key in ("delta", "low", "high")]
    assert f"in release #{CREDITED}: {points[0]} held-out [{points[1]}, {points[2]}]" in (
        line.inner_text()
    )
    line.screenshot(path=str(screenshots / "expert-credit.png"))
    with page.expect_navigation():
        line.locator("a", has_text=f"in release #{CREDITED}").click()
    assert page.url.endswith(mine["compare_url"])
    assert page.locator("#comparison-sides").inner_text().count(f"#{CREDITED}") == 2


def _facts(page: Any, selector: str) -> dict[str, str]:
    """A `<dl>`'s terms and their definitions' visible texts."""
    return page.locator(selector).evaluate(
        "dl => Object.fromEntries(Array.from(dl.querySelectorAll('dt'), dt => "
        "[dt.innerText.trim(), dt.nextElementSibling.innerText.replace(/\\s+/g, ' ').trim()]))"
    )


def _delta_text(difference: dict[str, Any]) -> str:
    """A paired difference as the pages write it: `▲ +0.125 [+0.031, +0.219]`."""
    marker = ("▲ " if difference["delta"] > 0 else "▼ ") if difference["significant"] else ""
    return (
        f"{marker}{difference['delta']:+.3f} [{difference['low']:+.3f}, {difference['high']:+.3f}]"
    )


def test_the_channel_list_shows_the_channel_at_its_current_release(page, coordinator_url):
    page.goto(coordinator_url + "/ui/channels")
    (row,) = _rows(page, "#channels")
    assert row[:2] == [CHANNEL, f"#{CHANNEL_SECOND}"]
    assert row[2].startswith("phatgoose") and row[2].endswith("k=2")
    assert row[4:7] == ["every admitted", "follows", "2"]
    current = page.locator("#channels tbody tr td:nth-child(2) a")
    assert current.get_attribute("href") == f"/ui/releases/{CHANNEL_SECOND}"
    with page.expect_navigation():
        page.locator("#channels a", has_text=CHANNEL).click()
    assert page.url.endswith(f"/ui/channels/{CHANNEL}")
    assert page.locator("h1").inner_text().startswith(CHANNEL)


def test_the_channel_page_shows_its_settings_history_and_chart(page, coordinator_url, screenshots):
    page.goto(f"{coordinator_url}/ui/channels/{CHANNEL}")
    assert page.locator("h1").inner_text() == f"{CHANNEL} → release #{CHANNEL_SECOND}"
    settings = _facts(page, "#channel-settings")
    assert settings["Method"] == "phatgoose"
    assert settings["k"] == "2 (at most the experts there are)"
    assert settings["Experts"] == "every admitted expert of the base model"
    assert settings["Benchmark"] == (
        f"3 task(s) ({', '.join(TASKS)}), 16 examples per task, seed 0"
    )
    assert settings["Follows the catalog"] == "yes"

    channel = _api(page, f"{coordinator_url}/api/v1/channels/{CHANNEL}/history")
    history = _rows(page, "#channel-history")
    assert [row[:4] for row in history] == [
        ["2", f"#{CHANNEL_SECOND}", "advance", f"expert admitted {NEWCOMER}@1"],
        ["1", f"#{CHANNEL_FIRST}", "advance", f"first release: {len(EXPERTS)} expert(s)"],
    ]
    assert [row[4] for row in history] == [str(entry["job_id"]) for entry in channel]
    assert {row[5] for row in history} == {f"channel:{CHANNEL}"}

    # The chart's numbers, oldest release first: the means the channel diff compares.
    means = _api(page, f"{coordinator_url}/api/v1/releases/{CHANNEL_SECOND}/channel-diff")[
        "comparison"
    ]["means"]
    rows = _rows(page, "#channel-means")
    assert [row[0] for row in rows] == [f"#{CHANNEL_FIRST}", f"#{CHANNEL_SECOND}"]
    assert [row[4] for row in rows] == [str(entry["job_id"]) for entry in reversed(channel)]
    for row, side in zip(rows, ("b", "a"), strict=True):
        for cell, group in zip(row[1:4], ("held_in", "held_out", "all"), strict=True):
            match = re.fullmatch(r"(\d\.\d{3}) ?±\d\.\d{3}", cell)
            assert match, f"{row[0]} {group}: {cell!r} is not a mean ± its standard error"
            assert match[1] == f"{means[group][side]:.3f}"
    assert _image_width(page, "#channel-plot") > 0
    page.screenshot(path=str(screenshots / "channel.png"), full_page=True)


def test_the_second_release_of_the_channel_shows_its_diff_to_the_first(
    page, coordinator_url, screenshots
):
    diff = _api(page, f"{coordinator_url}/api/v1/releases/{CHANNEL_SECOND}/channel-diff")
    assert diff["previous"] == CHANNEL_FIRST
    page.goto(f"{coordinator_url}/ui/releases/{CHANNEL_SECOND}")
    page.locator("#channel-diff").screenshot(path=str(screenshots / "channel-diff.png"))
    link = page.locator("#channel-link")
    assert f"(move 2: expert admitted {NEWCOMER}@1)" in link.inner_text()
    assert _rows(page, "#channel-diff-experts") == [[NEWCOMER, "–", f"{NEWCOMER}@1", "added"]]

    comparison = diff["comparison"]
    assert comparison["comparable"]
    assert (comparison["a"]["release"], comparison["b"]["release"]) == (
        CHANNEL_SECOND,
        CHANNEL_FIRST,
    )
    rows = _rows(page, "#channel-diff-tasks")
    assert [row[0] for row in rows] == sorted(TASKS)
    shifts = {shift["task"]: shift["total_variation"] for shift in diff["task_routing"]}
    assert sorted(shifts) == sorted(TASKS)  # PHATGOOSE routes on every task, before and after
    for row, task in zip(rows, comparison["tasks"], strict=True):
        assert row[1] == ("held-in" if task["task"] in HELD_IN else "held-out")
        assert row[2:4] == [f"{task['b']:.3f}", f"{task['a']:.3f}"]
        match = _DELTA.fullmatch(row[4])
        assert match, f"{task['task']}: {row[4]!r} is not a difference [interval]"
        assert float(match[3]) <= float(match[2]) <= float(match[4])
        assert row[4] == _delta_text(task["difference"])
        assert row[5] == f"{shifts[task['task']]:.3f}"
    sentence = " ".join(page.locator("#channel-diff-means").inner_text().split())
    for group, label in (("held_in", "held-in"), ("held_out", "held-out"), ("all", "all tasks")):
        assert f"{label} {_delta_text(comparison['means'][group]['difference'])}" in sentence

    shares = _rows(page, "#channel-routing")
    assert [row[0] for row in shares] == [*sorted(EXPERTS), NEWCOMER]
    for row, shift in zip(shares, diff["routing"], strict=True):
        before, after = shift["before"], shift["after"]
        assert row[1:3] == [
            "–" if share is None else f"{100 * share:.1f}%" for share in (before, after)
        ]
        assert row[3] == f"{100 * ((after or 0) - (before or 0)):+.1f} pp"
    assert shares[-1][1] == "–"  # the newcomer was not in the first release

    with page.expect_navigation():
        link.locator("a", has_text=CHANNEL).click()
    assert page.url.endswith(f"/ui/channels/{CHANNEL}")


def test_the_channels_nav_link_leads_to_the_list(page, coordinator_url):
    page.goto(coordinator_url + "/")
    with page.expect_navigation():
        page.locator("header.site nav a", has_text="Channels").click()
    assert page.url.endswith("/ui/channels")
    assert page.locator('header.site nav a[aria-current="page"]').inner_text() == "Channels"
    assert page.locator("h1").inner_text() == "Release channels"

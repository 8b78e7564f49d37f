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
from fastapi.testclient import TestClient

from coordinator.auth.models import Role
from coordinator.base_models.service import register_base_model
from coordinator.core.app import create_app
from coordinator.core.config import Settings
from coordinator.worker import DatabaseBackend, Worker, WorkerOptions
from tests.coordinator.helpers import bearer_headers, live_server, make_tiny_base
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
    """A live coordinator: three experts, six releases (base, single x3, merged, PHATGOOSE
    k=2), each evaluated by the real worker on three tiny tasks."""
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
    tasks_dir = root / "tasks"
    for seed, task in enumerate(TASKS):
        _write_task(tasks_dir, task, examples=24, seed=seed)
    with TestClient(app) as client:
        for seed, (name, description) in enumerate(EXPERTS.items()):
            publish_expert(
                client, alice, tiny, root / f"pkg{seed}", name, description=description, seed=seed
            )
        refs = [f"{name}@1" for name in EXPERTS]
        for body in (
            {"method": "base", "base_model": "tiny"},
            *({"method": "single", "experts": [ref]} for ref in refs),
            {"method": "merged", "experts": refs},
            {"method": "phatgoose", "experts": refs, "top_k": 2},
        ):
            number = create_release(client, carol, **body)["number"]
            response = client.post(
                "/api/v1/evaluations",
                headers=carol,
                json={
                    "release": number,
                    "tasks": list(TASKS),
                    "examples_per_task": 16,
                    "task_groups": {"held_in": list(HELD_IN), "held_out": list(HELD_OUT)},
                },
            )
            assert response.status_code == 201, response.text
    options = WorkerOptions(
        base_models={"tiny": str(save_base(tiny, root / "base"))},
        tasks_dir=tasks_dir,
        poll_seconds=0.05,
    )
    assert (
        Worker(DatabaseBackend(app.state.sessionmaker, app.state.blobs), options).run(once=True)
        == 6
    )
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


def test_leaderboard_sorts_when_a_header_is_clicked(page, coordinator_url, screenshots):
    page.goto(coordinator_url + "/")
    assert page.locator("#leaderboard tbody.rows tr").count() == 6
    assert page.locator("#leaderboard tbody.pinned tr.oracle").count() == 1
    page.screenshot(path=str(screenshots / "leaderboard.png"), full_page=True)

    page.locator('#leaderboard th[data-sort-key="release"] a').click()
    assert _first_column(page) == ["#6", "#5", "#4", "#3", "#2", "#1"]
    page.locator('#leaderboard th[data-sort-key="release"] a').click()
    assert _first_column(page) == ["#1", "#2", "#3", "#4", "#5", "#6"]
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
    assert page.locator("#experts tbody tr").count() == 3
    page.fill('input[name="q"]', "navig")
    with page.expect_navigation():
        page.press('input[name="q"]', "Enter")
    rows = page.locator("#experts tbody tr").all_inner_texts()
    assert len(rows) == 1 and "alice/navigate" in rows[0]
    page.screenshot(path=str(screenshots / "experts.png"), full_page=True)

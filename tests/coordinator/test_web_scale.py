"""Pages over a large catalog: thousands of experts and hundreds of evaluated releases are
paginated in SQL; a page holds `limit` rows and says how many there are in all."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from sqlalchemy import insert, select

from coordinator.base_models.models import BaseModelRecord
from coordinator.evaluations.models import EvaluationJob, EvaluationResult, JobState
from coordinator.experts.models import Expert, ExpertVersion
from coordinator.releases.models import Release, ReleaseExpert
from coordinator.web.queries import PAGE_SIZE
from tests.coordinator.web_helpers import table_rows

EXPERTS = 3000
RELEASES = 300
TASKS = ("hyperbaton", "navigate", "winowhy")


def _manifest(index: int) -> dict[str, object]:
    return {
        "name": f"ns{index % 30:02d}/e{index:04d}",
        "description": f"expert number {index}" + (" about colours" if index % 100 == 7 else ""),
        "license": "MIT",
        "training": {"examples": 100, "steps": 10, "gate_steps": 1},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "modules": 2},
    }


@pytest.fixture
def large_catalog(app):
    """3000 experts (one version each, in 30 namespaces, every 500th yanked) and 300
    releases, each evaluated on three tasks; inserted directly, in bulk, with explicit ids."""
    now = datetime.now(UTC)
    with app.state.sessionmaker() as session:
        base = session.scalar(select(BaseModelRecord))
        assert base is not None
        session.execute(
            insert(Expert),
            [
                {"id": i + 1, "namespace": f"ns{i % 30:02d}", "name": f"e{i:04d}"}
                for i in range(EXPERTS)
            ],
        )
        session.execute(
            insert(ExpertVersion),
            [
                {
                    "id": i + 1,
                    "expert_id": i + 1,
                    "number": 1,
                    "base_model_id": base.id,
                    "package_digest": f"sha256:{i:064x}",
                    "manifest": _manifest(i),
                    "rank": 4,
                    "module_count": 2,
                    "total_size": 1000,
                    "uploaded_by": f"ns{i % 30:02d}",
                    "channel": "http",
                    "created_at": now,
                    "yanked_at": now if i % 500 == 0 else None,
                    "yank_reason": "bad data" if i % 500 == 0 else None,
                }
                for i in range(EXPERTS)
            ],
        )
        numbers = range(1, RELEASES + 1)
        session.execute(
            insert(Release),
            [
                {
                    "id": n,
                    "number": n,
                    "method": ("phatgoose", "single", "merged")[n % 3],
                    "top_k": 2 if n % 3 == 0 else None,
                    "base_model_id": base.id,
                    "notes": "",
                    "manifest": {"number": n},
                    "created_by": "carol",
                    "created_at": now,
                }
                for n in numbers
            ],
        )
        session.execute(
            insert(ReleaseExpert),
            [
                {"release_id": n, "position": p, "expert_version_id": n * 7 + p + 1}
                for n in numbers
                for p in range(1 if n % 3 == 1 else 3)
            ],
        )
        session.execute(
            insert(EvaluationJob),
            [
                {
                    "id": n,
                    "release_id": n,
                    "spec": {"tasks": list(TASKS)},
                    "state": JobState.DONE.value,
                    "attempts": 1,
                    "created_at": now,
                }
                for n in numbers
            ],
        )
        session.execute(
            insert(EvaluationResult),
            [
                {
                    "job_id": n,
                    "release_id": n,
                    "task": task,
                    "accuracy": ((n * 37 + t * 11) % 100) / 100,
                    "stderr": 0.05,
                    "n": 40,
                    "evaluator_version": "0.1.0",
                    "created_at": now,
                }
                for n in numbers
                for t, task in enumerate(TASKS)
            ],
        )
        session.commit()


def _total(html: str) -> int:
    found = re.search(r'data-total="(\d+)"', html)
    assert found, "the page does not show a total"
    return int(found.group(1))


def test_catalog_page_holds_one_page_and_shows_the_total(client, large_catalog):
    html = client.get("/ui/experts").text
    rows = table_rows(html, "experts")
    assert len(rows) == PAGE_SIZE
    assert _total(html) == EXPERTS
    assert rows[0][0] == "ns00/e0000"


def test_catalog_pages_follow_each_other(client, large_catalog):
    html = client.get("/ui/experts", params={"offset": 2950}).text
    rows = table_rows(html, "experts")
    assert len(rows) == 50 and rows[-1][0] == "ns29/e2999"
    assert 'rel="next"' not in html and 'rel="prev"' in html


def test_catalog_search_counts_matches_across_pages(client, large_catalog):
    html = client.get("/ui/experts", params={"q": "colours", "limit": 10}).text
    assert _total(html) == 30
    assert len(table_rows(html, "experts")) == 10
    html = client.get("/ui/experts", params={"namespace": "ns07", "status": "yanked"}).text
    assert _total(html) == 0 or all("yanked" in r[-1] for r in table_rows(html, "experts"))
    html = client.get("/ui/experts", params={"status": "yanked"}).text
    assert _total(html) == EXPERTS // 500


def test_leaderboard_holds_one_page_of_releases(client, large_catalog):
    html = client.get("/").text
    rows = table_rows(html, "leaderboard")
    releases = [r for r in rows if r[0].startswith("#")]
    assert len(releases) == PAGE_SIZE
    assert _total(html) == RELEASES
    means = [float(r[4].split()[0]) for r in releases]
    assert means == sorted(means, reverse=True)


def test_leaderboard_last_page_and_largest_page(client, large_catalog):
    html = client.get("/", params={"offset": 280, "sort": "release", "order": "asc"}).text
    numbers = [r[0].split()[0] for r in table_rows(html, "leaderboard") if r[0].startswith("#")]
    assert numbers == [f"#{n}" for n in range(281, 301)]
    html = client.get("/", params={"limit": 200}).text
    assert len([r for r in table_rows(html, "leaderboard") if r[0].startswith("#")]) == 200


def test_releases_page_is_paginated(client, large_catalog):
    html = client.get("/ui/releases", params={"offset": 50}).text
    rows = table_rows(html, "table0")
    assert len(rows) == PAGE_SIZE and rows[0][0] == "#250"
    assert _total(html) == RELEASES

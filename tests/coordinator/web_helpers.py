"""Helpers for the page tests: a small real world (experts uploaded through the API,
releases created through it, evaluation results recorded through the evaluation service
as a worker would) and a minimal HTML table reader."""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from coordinator.auth.models import Token
from coordinator.evaluations import service as evaluations
from coordinator.evaluations.schemas import EvaluationCreate
from tests.coordinator.helpers import TinyBase, upload
from tests.phatgoose.experts import random_expert

WORKER = "test-worker"


def publish_expert(
    client: TestClient,
    headers: dict[str, str],
    tiny_base: TinyBase,
    directory: Path,
    name: str,
    *,
    description: str = "",
    seed: int = 0,
) -> dict[str, Any]:
    expert = random_expert(tiny_base.model, name=name, rank=4, seed=seed)
    expert.manifest = expert.manifest.model_copy(update={"description": description})
    expert.save(directory)
    response = upload(client, headers, directory)
    assert response.status_code == 201, response.text
    return response.json()


def create_release(client: TestClient, headers: dict[str, str], **body: Any) -> int:
    response = client.post("/api/v1/releases", headers=headers, json=body)
    assert response.status_code == 201, response.text
    return int(response.json()["number"])


@dataclass(frozen=True)
class TaskOutcome:
    accuracy: float
    n: int = 40
    routing_stats: dict[str, Any] | None = None

    @property
    def stderr(self) -> float:
        return (self.accuracy * (1 - self.accuracy) / self.n) ** 0.5


def record_evaluation(
    app: FastAPI,
    release: int,
    outcomes: Mapping[str, TaskOutcome],
    *,
    held_in: Sequence[str] = (),
    held_out: Sequence[str] = (),
    evaluator_version: str = "0.1.0",
) -> None:
    """Queue an evaluation of `release`, lease it and record `outcomes` as a worker does."""
    with app.state.sessionmaker() as session:
        maintainer = session.scalar(select(Token).where(Token.role == "maintainer"))
        assert maintainer is not None
        groups = {"held_in": list(held_in), "held_out": list(held_out)}
        job = evaluations.create_job(
            session,
            EvaluationCreate(
                release=release,
                tasks=list(outcomes),
                examples_per_task=40,
                task_groups=groups if held_in or held_out else None,
            ),
            by=maintainer,
        )
        claimed = evaluations.claim_job(session, WORKER, lease_seconds=60)
        assert claimed is not None and claimed.id == job.id
        for task, outcome in outcomes.items():
            evaluations.record_result(
                session,
                job.id,
                WORKER,
                evaluations.TaskScore(
                    task=task,
                    accuracy=outcome.accuracy,
                    stderr=outcome.stderr,
                    n=outcome.n,
                    evaluator_version=evaluator_version,
                    seconds=0.1,
                    routing_stats=outcome.routing_stats,
                ),
            )
        evaluations.complete_job(session, job.id, WORKER)


class _Tables(HTMLParser):
    """Collects the text of every body cell of every table, by the table's id; an element
    inside a cell (a badge, the ± span) starts a new word."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._section = ""
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._cell is not None:
            self._cell.append(" ")  # an element inside a cell separates words
        if tag == "table":
            self._table = dict(attrs).get("id") or f"table{len(self.tables)}"
            self.tables[self._table] = []
        elif tag in ("thead", "tbody", "tfoot"):
            self._section = tag
        elif tag == "tr" and self._table is not None and self._section == "tbody":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def table_rows(html: str, table_id: str) -> list[list[str]]:
    """The body rows of the table with `id=table_id`, each a list of cell texts."""
    parser = _Tables()
    parser.feed(html)
    assert table_id in parser.tables, f"no table #{table_id}; tables: {list(parser.tables)}"
    return parser.tables[table_id]


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height

"""Helpers for client and end-to-end tests: a tiny base model on disk, private data with
marker strings, and a live coordinator that knows the tiny base model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from coordinator.auth.models import Role
from coordinator.auth.service import create_token
from coordinator.base_models.service import register_base_model
from coordinator.core.app import create_app
from coordinator.core.config import Settings
from phatgoose.models import base_model_spec, load_base_model
from tests.coordinator.helpers import live_server
from tests.tiny import tiny_llama, tiny_tokenizer

# Distinctive strings that appear only in the private training data: a client must never
# send them anywhere.
MARKERS = ("QUOKKA-SECRET-4417", "ZEBRA-PRIVATE-9023", "NARWHAL-HIDDEN-5561")


def save_tiny_base(directory: Path, seed: int = 0) -> Path:
    """A tiny llama and its tokenizer saved as a Hugging Face model directory."""
    tiny_llama(seed=seed).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def write_private_data(path: Path, count: int = 12, tag: str = "") -> Path:
    """A JSONL file of multiple-choice examples whose inputs carry the marker strings."""
    lines = []
    for i in range(count):
        marker = MARKERS[i % len(MARKERS)]
        lines.append(
            json.dumps(
                {
                    "input": f"Q: is {marker}{tag} number {i} even?\nA:",
                    "choices": ["yes", "no"],
                    "answer": i % 2,
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def marker_hits(data: bytes) -> list[str]:
    """The markers found in `data` (as UTF-8 or UTF-16 text)."""
    found = []
    for marker in MARKERS:
        for encoding in ("utf-8", "utf-16-le", "utf-16-be"):
            if marker.encode(encoding) in data:
                found.append(f"{marker} ({encoding})")
    return found


@dataclass(frozen=True)
class LiveCoordinator:
    url: str
    token: str  # a contributor token named "alice"
    settings: Settings


@contextmanager
def live_coordinator(data_dir: Path, base_dir: Path) -> Iterator[LiveCoordinator]:
    """A coordinator on loopback (SQLite in `data_dir`) with the tiny base registered under
    its directory's path, and a contributor token."""
    settings = Settings(data_dir=data_dir)
    app = create_app(settings)
    model, _ = load_base_model(str(base_dir))
    with app.state.sessionmaker() as session:
        register_base_model(session, base_model_spec(model, str(base_dir)))
        token = create_token(session, name="alice", role=Role.CONTRIBUTOR).secret_token
    with live_server(app) as url:
        yield LiveCoordinator(url=url, token=token, settings=settings)
    app.state.engine.dispose()

"""Test helpers: real expert packages over a tiny llama (written by phatgoose's own
`Expert.save`), upload requests, tokens and a live server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx2  # what starlette's TestClient returns since starlette 1.0
from fastapi import FastAPI
from fastapi.testclient import TestClient
from torch import nn

from coordinator.auth.models import Role
from coordinator.auth.service import create_token
from coordinator.core.loopback import serve_on_loopback
from phatgoose.models import base_model_spec
from protocol import ADAPTER_CONFIG_FILE, BaseModelSpec
from protocol.validation import validate_directory
from tests.phatgoose.experts import random_expert
from tests.tiny import tiny_llama

# random_expert names the base model after `config.name_or_path`, empty for a fresh model.
TINY_BASE_NAME = "tiny"


@dataclass(frozen=True)
class TinyBase:
    model: nn.Module
    spec: BaseModelSpec

    def write_package(self, directory: Path, name: str, seed: int = 0, rank: int = 4) -> Path:
        expert = random_expert(self.model, name=name, rank=rank, seed=seed)
        expert.save(directory)
        return directory


def make_tiny_base() -> TinyBase:
    model = tiny_llama()
    return TinyBase(model=model, spec=base_model_spec(model, TINY_BASE_NAME))


def package_parts(directory: Path) -> list[tuple[str, tuple[str, bytes]]]:
    """Multipart parts for an upload: one `files` field per package file."""
    return [("files", (p.name, p.read_bytes())) for p in sorted(directory.iterdir())]


def stored_bytes(directory: Path, base: BaseModelSpec) -> dict[str, bytes]:
    """A package's files as the coordinator stores and serves them: as uploaded, except the
    adapter config, which admission rewrites canonically."""
    files = {p.name: p.read_bytes() for p in sorted(directory.iterdir())}
    files[ADAPTER_CONFIG_FILE] = validate_directory(directory, base).canonical_adapter_config
    return files


def upload(client: TestClient, headers: dict[str, str], directory: Path) -> httpx2.Response:
    return client.post("/api/v1/experts", headers=headers, files=package_parts(directory))


def bearer_headers(app: FastAPI, name: str, role: Role) -> dict[str, str]:
    """A new token's Authorization header."""
    with app.state.sessionmaker() as session:
        issued = create_token(session, name=name, role=role)
    return {"Authorization": f"Bearer {issued.secret_token}"}


# A live server on loopback: the coordinator's own helper, under the suite's name.
live_server = serve_on_loopback

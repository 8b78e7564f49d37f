"""Bugs the reliability work found, each pinned by the request that showed it.

- A manifest nested deeper than Python's JSON parser goes was a 500: the coordinator peeks
  at the manifest to route the upload and caught only ValueError, not RecursionError.
- An escaped lone surrogate ("\\ud800") in a manifest string was accepted and committed;
  the 201 reply (and every later listing that showed the version) then failed to encode
  as UTF-8: a 500 after the commit, and a catalog listing broken for everyone.
- A version number or list offset past 32 bits was a 500 (OverflowError on SQLite); a
  base model name outside latin-1 broke the Location header after the commit (a 500).
- A NUL byte in a name in the URL was a 500 on PostgreSQL (its text cannot hold NUL).
- Duplicate-key detection in JSON files and safetensors headers was quadratic in the number
  of keys: a 250 kB expert.json held a worker for 16 s, a 1 MiB one for minutes.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from fastapi import FastAPI
from fastapi.testclient import TestClient
from safetensors.numpy import load_file, save_file

from protocol import BaseModelSpec
from tests.reliability.catalog import catalog_state


def _parts(directory: Path, replace: dict[str, bytes]) -> list[tuple[str, tuple[str, bytes]]]:
    files = sorted(directory.iterdir())
    return [("files", (p.name, replace.get(p.name, p.read_bytes()))) for p in files]


def _post(client: TestClient, headers: dict[str, str], directory: Path, **replace: bytes):
    named = {k.replace("__", "."): v for k, v in replace.items()}
    return client.post("/api/v1/experts", headers=headers, files=_parts(directory, named))


def _no_server_errors(app: FastAPI) -> TestClient:
    return TestClient(app, raise_server_exceptions=False)


def test_deeply_nested_manifest_is_422_not_500(
    app: FastAPI, alice: dict[str, str], package: Callable[..., Path]
) -> None:
    directory = package("alice/demo")
    before = catalog_state(app)
    with _no_server_errors(app) as client:
        for depth in (2_000, 100_000):
            deep = b"[" * depth + b"]" * depth
            response = _post(client, alice, directory, expert__json=deep)
            assert response.status_code == 422, response.text
            assert response.json()["detail"]["check"] == "not_json"
            manifest = json.loads((directory / "expert.json").read_text())
            nested = json.dumps({**manifest, "description": "x"}).encode()[:-1]
            nested += b', "extra": ' + b"[" * depth + b"]" * depth + b"}"
            response = _post(client, alice, directory, expert__json=nested)
            assert response.status_code == 422, response.text
    assert catalog_state(app) == before


def test_lone_surrogate_in_a_manifest_string_is_422_and_commits_nothing(
    app: FastAPI, alice: dict[str, str], package: Callable[..., Path]
) -> None:
    directory = package("alice/demo")
    manifest = json.loads((directory / "expert.json").read_text())
    before = catalog_state(app)
    with _no_server_errors(app) as client:
        for field in ("license", "description", "library_version"):
            hostile = json.dumps({**manifest, field: "ok\ud800"}).encode()
            assert b"\\ud800" in hostile
            response = _post(client, alice, directory, expert__json=hostile)
            assert response.status_code == 422, (field, response.text)
            detail = response.json()["detail"]
            assert (detail["check"], detail["file"]) == ("not_json", "expert.json")
            assert "surrogate" in detail["message"]
        config = json.loads((directory / "adapter_config.json").read_text())
        hostile = json.dumps({**config, "revision": "\udfff"}).encode()
        response = _post(client, alice, directory, adapter_config__json=hostile)
        assert response.status_code == 422, response.text
        assert client.get("/api/v1/experts").status_code == 200
    assert catalog_state(app) == before


def test_json_with_many_keys_is_refused_in_linear_time(
    app: FastAPI, alice: dict[str, str], package: Callable[..., Path]
) -> None:
    directory = package("alice/demo")
    many = json.dumps({f"k{i}": 0 for i in range(80_000)}).encode()  # 1 MB, under the limit
    assert len(many) < 1024 * 1024
    with _no_server_errors(app) as client:
        started = time.monotonic()
        response = _post(client, alice, directory, expert__json=many)
        elapsed = time.monotonic() - started
    assert response.status_code == 422, response.text
    assert elapsed < 20, f"{elapsed:.1f} s (quadratic duplicate-key check?)"


def test_safetensors_header_with_many_keys_is_checked_in_linear_time(
    app: FastAPI, alice: dict[str, str], package: Callable[..., Path], tmp_path: Path
) -> None:
    directory = package("alice/demo")
    tensors = load_file(str(directory / "router.safetensors"))
    metadata = {f"k{i}": "" for i in range(200_000)}  # a 3 MB header, under the 8 MiB limit
    path = tmp_path / "router.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata)
    data = path.read_bytes()
    header_length = struct.unpack("<Q", data[:8])[0]
    assert 2_000_000 < header_length < 8 * 1024 * 1024
    before = catalog_state(app)
    with _no_server_errors(app) as client:
        started = time.monotonic()
        response = _post(client, alice, directory, router__safetensors=data)
        elapsed = time.monotonic() - started
    # Extra metadata is harmless: the package is otherwise the valid one, so it is accepted.
    assert response.status_code == 201, response.text
    assert elapsed < 30, f"{elapsed:.1f} s (quadratic duplicate-key check?)"
    assert catalog_state(app).versions == before.versions + 1


def test_out_of_range_numbers_in_the_url_are_422_not_500(
    app: FastAPI, alice: dict[str, str], package: Callable[..., Path]
) -> None:
    """A version number or offset beyond the database's integers was an OverflowError
    (SQLite) or a DataError (PostgreSQL): a 500. Found by the schemathesis run."""
    with _no_server_errors(app) as client:
        assert _post(client, alice, package("alice/demo")).status_code == 201
        huge = str(2**64)
        for path in (
            f"/api/v1/experts/alice/demo/{huge}",
            f"/api/v1/experts/alice/demo/{huge}/files/expert.json",
            f"/api/v1/experts?offset={huge}",
            "/api/v1/experts/alice/demo/0",
        ):
            response = client.get(path)
            assert response.status_code == 422, (path, response.text)
        response = client.post(
            f"/api/v1/experts/alice/demo/{huge}/yank", json={"reason": "x"}, headers=alice
        )
        assert response.status_code == 422
        assert client.get("/api/v1/experts/alice/demo/1").status_code == 200


def test_base_model_with_a_non_latin1_name_gets_an_encoded_location(
    app: FastAPI, maintainer: dict[str, str], base_spec: BaseModelSpec
) -> None:
    """The Location header of a new base model was the raw name: a name outside latin-1
    failed to encode after the commit (a 500). Found by the schemathesis run."""
    spec = base_spec.model_copy(update={"name": "模型 ü/x", "fingerprint": "sha256:" + "1" * 64})
    with _no_server_errors(app) as client:
        response = client.post(
            "/api/v1/base-models", json=spec.model_dump(mode="json"), headers=maintainer
        )
    assert response.status_code == 201, response.text
    assert response.headers["location"] == "/api/v1/base-models/%E6%A8%A1%E5%9E%8B%20%C3%BC%2Fx"


def test_nul_bytes_in_names_are_4xx_not_500(
    app: FastAPI, alice: dict[str, str], package: Callable[..., Path]
) -> None:
    """PostgreSQL text cannot hold NUL: a name with %00 in the URL was a DataError, a 500.
    Found by test_access.py's traversal test on PostgreSQL."""
    with _no_server_errors(app) as client:
        assert _post(client, alice, package("alice/demo")).status_code == 201
        for path in (
            "/api/v1/experts/a%00b/demo",
            "/api/v1/experts/alice/de%00mo/1",
            "/api/v1/experts/alice/demo/1/files/expert.json%00",
            "/api/v1/base-models/tiny%00",
        ):
            response = client.get(path)
            assert 400 <= response.status_code < 500, (path, response.text)
            assert response.json()["detail"]["message"]
        # A filter matching nothing: an empty page (SQLite) or a 400 (PostgreSQL).
        response = client.get("/api/v1/experts?namespace=a%00b")
        assert response.status_code in (200, 400), response.text
        response = client.post(
            "/api/v1/experts/al%00ice/demo/1/yank", json={"reason": "x"}, headers=alice
        )
        assert 400 <= response.status_code < 500


def test_out_of_range_release_and_evaluation_ids_are_422_not_500(app: FastAPI) -> None:
    """GET /evaluations/{job_id} with a job id past 64 bits was a 500 (schemathesis)."""
    huge = str(2**64)
    with _no_server_errors(app) as client:
        for path in (
            f"/api/v1/evaluations/{huge}",
            f"/api/v1/releases/{huge}",
            f"/api/v1/releases/{huge}/manifest",
        ):
            response = client.get(path)
            assert response.status_code == 422, (path, response.text)


def test_a_lone_surrogate_echoed_by_an_error_is_escaped_not_a_500(
    app: FastAPI, maintainer: dict[str, str]
) -> None:
    """A task name with a lone surrogate (`\\ud800` in the JSON) was echoed raw by the 422
    `invalid_task` error, whose JSON then failed to encode: a 500 (route fuzzing, under
    `pytest -n`). Errors now write such characters as `\\ud800`."""
    body = b'{"release": 1, "tasks": ["naviga\\ud800te"], "examples_per_task": 10}'
    headers = {**maintainer, "content-type": "application/json"}
    with _no_server_errors(app) as client:
        response = client.post("/api/v1/evaluations", headers=headers, content=body)
    assert response.status_code == 422, response.text  # the task is checked first
    detail = response.json()["detail"]
    assert (detail["error"], detail["task"]) == ("invalid_task", "naviga\\ud800te")

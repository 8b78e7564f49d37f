"""Admission over HTTP against hostile manifests and adapter configs (issue 14), on SQLite
and PostgreSQL: 422s that name the field, nothing stored, canonical adapter configs, and a
catalog search that survives a legacy row holding non-JSON."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, StatementError

from coordinator.core.db import make_engine
from coordinator.experts.models import ExpertVersion
from phatgoose.expert import lora_summary
from protocol import ADAPTER_CONFIG_FILE, MANIFEST_FILE, lora_key
from protocol.validation import package_digest
from tests.coordinator.helpers import TINY_BASE_NAME, package_parts, upload
from tests.phatgoose.experts import random_expert
from tests.reliability.catalog import catalog_state


def _with(directory: Path, name: str, data: bytes) -> list[tuple[str, tuple[str, bytes]]]:
    return [
        (field, (filename, data if filename == name else content))
        for field, (filename, content) in package_parts(directory)
    ]


def _post(client: TestClient, headers: dict[str, str], parts: list) -> object:
    return client.post("/api/v1/experts", headers=headers, files=parts)


def _edited_json(path: Path, edit: Callable[[dict], None]) -> bytes:
    data = json.loads(path.read_text())
    edit(data)
    return json.dumps(data).encode()


# --- item 4 --------------------------------------------------------------------------------


def test_overflowing_number_in_a_manifest_is_422_and_stores_nothing(
    app: FastAPI, alice: dict[str, str], package: Callable[..., Path]
) -> None:
    directory = package("alice/demo")
    manifest = (directory / MANIFEST_FILE).read_text()
    hostile = manifest.replace('"examples": ', '"learning_rate": 1e999, "examples": ', 1)
    assert hostile != manifest
    before = catalog_state(app)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = _post(client, alice, _with(directory, MANIFEST_FILE, hostile.encode()))
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert (detail["check"], detail["file"]) == ("not_json", MANIFEST_FILE)
        assert "1e999" in detail["message"]
        assert client.get("/ui/experts", params={"q": "demo"}).status_code == 200
    assert catalog_state(app).rows == before.rows


def test_catalog_search_survives_a_legacy_row_holding_non_json(
    app: FastAPI, client: TestClient, alice: dict[str, str], package: Callable[..., Path]
) -> None:
    for name in ("alice/broken", "alice/fine"):
        assert upload(client, alice, package(name)).status_code == 201
    engine = app.state.engine
    with engine.begin() as connection:
        version_id = connection.execute(
            text(
                "SELECT v.id FROM expert_versions v JOIN experts e ON e.id = v.expert_id "
                "WHERE e.name = 'broken'"
            )
        ).scalar_one()
        manifest = connection.execute(
            text("SELECT manifest FROM expert_versions WHERE id = :id"), {"id": version_id}
        ).scalar_one()
        manifest = manifest if isinstance(manifest, str) else json.dumps(manifest)
        # What an admission before the fix stored for `1e999`: Python's `Infinity`.
        legacy = manifest.replace('"steps": ', '"learning_rate": Infinity, "steps": ', 1)
        if engine.dialect.name == "sqlite":
            connection.execute(
                text("UPDATE expert_versions SET manifest = :m WHERE id = :id"),
                {"m": legacy, "id": version_id},
            )
    if engine.dialect.name != "sqlite":
        # PostgreSQL's JSON type refuses it outright; the overflowing literal itself is valid
        # JSON text there, so that is what such a row can hold.
        with pytest.raises(DBAPIError), engine.begin() as connection:
            connection.execute(
                text("UPDATE expert_versions SET manifest = CAST(:m AS JSON) WHERE id = :id"),
                {"m": legacy, "id": version_id},
            )
        with engine.begin() as connection:
            connection.execute(
                text("UPDATE expert_versions SET manifest = CAST(:m AS JSON) WHERE id = :id"),
                {"m": legacy.replace("Infinity", "1e999"), "id": version_id},
            )
    with TestClient(app, raise_server_exceptions=False) as visitor:
        for query in ({"q": "fine"}, {"q": "test"}, {"q": "broken"}, {}):
            response = visitor.get("/ui/experts", params=query)
            assert response.status_code == 200, (query, response.text[:500])
        assert "alice/fine" in visitor.get("/ui/experts", params={"q": "fine"}).text


def test_json_columns_refuse_nan_and_infinity(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'strict.sqlite'}")
    try:
        ExpertVersion.metadata.create_all(engine)
        with engine.begin() as connection:
            for bad in (math.inf, -math.inf, math.nan):
                with pytest.raises(StatementError, match="JSON compliant"):
                    connection.execute(
                        ExpertVersion.__table__.insert().values(  # type: ignore[attr-defined]
                            expert_id=1,
                            number=1,
                            base_model_id=1,
                            package_digest="sha256:" + "0" * 64,
                            manifest={"training": {"learning_rate": bad}},
                            rank=1,
                            module_count=1,
                            total_size=1,
                            uploaded_by="x",
                            channel="http",
                        )
                    )
    finally:
        engine.dispose()


# --- item 8 --------------------------------------------------------------------------------


def test_manifest_claiming_other_target_modules_is_422_naming_both(
    client: TestClient, alice: dict[str, str], package: Callable[..., Path]
) -> None:
    directory = package("alice/demo")
    config = json.loads((directory / ADAPTER_CONFIG_FILE).read_text())
    actual = sorted(config["target_modules"])
    claimed = actual[1:]  # one name fewer; rank, alpha and module count unchanged

    def claim(manifest: dict) -> None:
        manifest["lora"]["target_modules"] = claimed

    parts = _with(directory, MANIFEST_FILE, _edited_json(directory / MANIFEST_FILE, claim))
    response = _post(client, alice, parts)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert (detail["check"], detail["file"]) == ("manifest_mismatch", MANIFEST_FILE)
    assert json.dumps(sorted(claimed)) in detail["message"]
    assert json.dumps(actual) in detail["expected"]


# --- item 9 --------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["license", "library_version"])
def test_overlong_manifest_string_is_422_naming_the_field_and_limit(
    client: TestClient, alice: dict[str, str], package: Callable[..., Path], field: str
) -> None:
    directory = package("alice/demo")
    parts = _with(
        directory,
        MANIFEST_FILE,
        _edited_json(directory / MANIFEST_FILE, lambda m: m.update({field: "x" * 100_000})),
    )
    response = _post(client, alice, parts)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert (detail["check"], detail["file"]) == ("manifest_schema", MANIFEST_FILE)
    assert f"field '{field}'" in detail["message"]
    assert "256" in detail["expected"]


# --- item 14 -------------------------------------------------------------------------------


def test_100000_target_modules_are_422_before_matching(
    client: TestClient, alice: dict[str, str], package: Callable[..., Path]
) -> None:
    directory = package("alice/demo")
    names = [str(i) for i in range(100_000)]

    def many(config: dict) -> None:
        config["target_modules"] = config["target_modules"] + names

    data = _edited_json(directory / ADAPTER_CONFIG_FILE, many)
    assert len(data) < 1024 * 1024  # under the JSON size limit: the list cap must refuse it
    response = _post(client, alice, _with(directory, ADAPTER_CONFIG_FILE, data))
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert (detail["check"], detail["file"]) == ("peft_config", ADAPTER_CONFIG_FILE)
    assert "1024" in detail["expected"]
    assert len(detail["message"]) < 1000


# --- item 16 -------------------------------------------------------------------------------


def test_adapter_config_is_served_canonically_without_load_time_code(
    client: TestClient, alice: dict[str, str], package: Callable[..., Path]
) -> None:
    directory = package("alice/demo")

    def hostile(config: dict) -> None:
        config["auto_mapping"] = {"base_model_class": "os.system", "parent_library": "os"}
        config["megatron_core"] = "os"
        config["base_model_name_or_path"] = "https://example.invalid/weights"
        config["revision"] = "evil"

    parts = _with(
        directory, ADAPTER_CONFIG_FILE, _edited_json(directory / ADAPTER_CONFIG_FILE, hostile)
    )
    response = _post(client, alice, parts)
    assert response.status_code == 201, response.text
    body = response.json()

    served = client.get(f"/api/v1/experts/alice/demo/1/files/{ADAPTER_CONFIG_FILE}")
    assert served.status_code == 200
    config = json.loads(served.content)
    for key in ("auto_mapping", "megatron_core", "revision"):
        assert key not in config
    assert config["base_model_name_or_path"] == TINY_BASE_NAME
    # The catalog's hashes and digest describe the bytes it serves.
    files = {f["filename"]: f["sha256"] for f in body["files"]}
    assert files[ADAPTER_CONFIG_FILE] == hashlib.sha256(served.content).hexdigest()
    assert served.headers["x-content-sha256"] == files[ADAPTER_CONFIG_FILE]
    assert body["package_digest"] == package_digest(files)
    for _field, (name, content) in package_parts(directory):
        if name != ADAPTER_CONFIG_FILE:
            assert files[name] == hashlib.sha256(content).hexdigest()


def test_configs_differing_only_in_dropped_keys_are_one_package(
    client: TestClient, alice: dict[str, str], package: Callable[..., Path]
) -> None:
    directory = package("alice/demo")
    assert upload(client, alice, directory).status_code == 201
    parts = _with(
        directory,
        ADAPTER_CONFIG_FILE,
        _edited_json(directory / ADAPTER_CONFIG_FILE, lambda c: c.update(peft_version="9.9")),
    )
    response = _post(client, alice, parts)
    assert response.status_code == 409, response.text
    assert response.json()["detail"]["check"] == "duplicate"


def _expert_without(tiny_base, name: str, seed: int, excluded: str):
    """A random expert adapting every default target but `excluded` (PEFT's
    exclude_modules): the same target names and module count as its siblings."""
    expert = random_expert(tiny_base.model, name=name, rank=4, seed=seed)
    weights = {
        k: v
        for k, v in expert.lora_weights.items()
        if k not in (lora_key(excluded, "A"), lora_key(excluded, "B"))
    }
    gates = {p: g for p, g in expert.gates.items() if p != excluded}
    config = dataclasses.replace(expert.lora_config, exclude_modules=[excluded])
    manifest = expert.manifest.model_copy(update={"lora": lora_summary(config, modules=len(gates))})
    return dataclasses.replace(
        expert, manifest=manifest, lora_config=config, lora_weights=weights, gates=gates
    )


def test_a_merged_release_compares_the_modules_adapters_really_adapt(
    client: TestClient, alice: dict[str, str], maintainer: dict[str, str], tiny_base, tmp_path
) -> None:
    """Same target names, same rank and module count, different modules (one excludes
    layer 0's q_proj, the other layer 1's): averaging them could never load."""
    for name, seed, layer in (("a", 0, 0), ("b", 1, 1)):
        excluded = f"model.layers.{layer}.self_attn.q_proj"
        _expert_without(tiny_base, f"alice/{name}", seed, excluded).save(tmp_path / name)
        assert upload(client, alice, tmp_path / name).status_code == 201
    response = client.post(
        "/api/v1/releases",
        headers=maintainer,
        json={"method": "merged", "experts": ["alice/a", "alice/b"]},
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"]["check"] == "shapes"

"""Poisoned experts: built to capture the router (huge gates) or to wreck a merge (huge
updates), they are refused at upload by the admission bounds, and a release built from the
catalog afterwards computes exactly what it computes without the attempt.

(What a norm cap cannot stop, such as a gate of honest size aimed at common activation
directions, is discussed in docs/security.md.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from phatgoose.expert import Expert
from phatgoose.routing import build_routed_model
from tests.coordinator.helpers import TinyBase, package_parts
from tests.phatgoose.experts import random_expert
from tests.reliability.catalog import catalog_state
from tests.tiny import tiny_llama

BATCH = torch.randint(4, 60, (2, 7), generator=torch.Generator().manual_seed(0))


def _logits(experts: list[Expert], method: str) -> torch.Tensor:
    model = build_routed_model(tiny_llama(), experts, method, top_k=2)
    with torch.no_grad():
        return model(input_ids=BATCH).logits


def _hidden(experts: list[Expert], method: str) -> torch.Tensor:
    """The residual stream after the first layer (the final norm would hide the scale)."""
    model = build_routed_model(tiny_llama(), experts, method, top_k=2)
    with torch.no_grad():
        return model(input_ids=BATCH, output_hidden_states=True).hidden_states[1]


def _router_capture(expert: Expert) -> Expert:
    """Gates scaled up 10,000 times: under a router that uses raw gates, this expert wins
    every token."""
    for path in expert.gates:
        expert.gates[path] = expert.gates[path] * 1e4
    return expert


def _merge_wrecker(expert: Expert) -> Expert:
    """B scaled up 100,000 times: its update dominates any average it enters."""
    for key in expert.lora_weights:
        if "lora_B" in key:
            expert.lora_weights[key] = expert.lora_weights[key] * 1e5
    return expert


def _constant_gate(expert: Expert) -> Expert:
    """An all-zero gate (the gate step skipped): it would be picked by ties."""
    for path in expert.gates:
        expert.gates[path] = torch.zeros_like(expert.gates[path])
    return expert


ATTACKS = {
    "gate_norm": _router_capture,
    "update_norm": _merge_wrecker,
    "gate_constant": _constant_gate,
}


def _download(client: TestClient, ref_url: str, files: list[str], directory: Path) -> Path:
    directory.mkdir(parents=True)
    for name in files:
        response = client.get(f"{ref_url}/files/{name}")
        assert response.status_code == 200
        (directory / name).write_bytes(response.content)
    return directory


def test_poisoned_experts_are_refused_and_releases_are_unaffected(
    app: FastAPI,
    client: TestClient,
    alice: dict[str, str],
    bob: dict[str, str],
    tiny_base: TinyBase,
    tmp_path: Path,
) -> None:
    honest = [
        random_expert(tiny_base.model, name=f"alice/honest{z}", rank=4, seed=z) for z in (1, 2, 3)
    ]
    refs = []
    for expert in honest:
        directory = tmp_path / expert.name.replace("/", "-")
        expert.save(directory)
        response = client.post("/api/v1/experts", headers=alice, files=package_parts(directory))
        assert response.status_code == 201, response.text
        refs.append(response.headers["location"])
    before = catalog_state(app)

    for check, poison in ATTACKS.items():
        attacker = poison(random_expert(tiny_base.model, name="bob/helpful", rank=4, seed=9))
        directory = tmp_path / f"poisoned-{check}"
        attacker.save(directory)
        response = client.post("/api/v1/experts", headers=bob, files=package_parts(directory))
        assert response.status_code == 422, (check, response.text)
        detail = response.json()["detail"]
        assert detail["check"] == check, detail
        assert detail["tensor"], detail  # names the offending tensor
    assert catalog_state(app) == before

    # A release over what the catalog holds: the honest experts, as downloaded.
    listed = client.get("/api/v1/experts").json()
    assert listed["total"] == len(honest)
    files = [
        "adapter_config.json",
        "adapter_model.safetensors",
        "expert.json",
        "router.safetensors",
    ]
    from_catalog = [
        Expert.load(_download(client, ref, files, tmp_path / f"catalog-{i}"))
        for i, ref in enumerate(refs)
    ]
    for method in ("phatgoose", "merged"):
        released = _logits(from_catalog, method)
        reference = _logits(honest, method)  # computed without the attacker's attempt
        torch.testing.assert_close(released, reference, rtol=0, atol=0)
        assert torch.isfinite(released).all()


@pytest.mark.parametrize("method", ["merged", "arrow"])
def test_without_admission_the_poisoned_update_would_have_dominated(
    tiny_base: TinyBase, method: str
) -> None:
    """Why the bound matters: admitted anyway, the wrecker changes a merged or Arrow-routed
    release out of all proportion (this is what the refusal above prevents)."""
    honest = [random_expert(tiny_base.model, name=f"honest{z}", rank=4, seed=z) for z in (1, 2, 3)]
    wrecker = _merge_wrecker(random_expert(tiny_base.model, name="wrecker", rank=4, seed=9))
    clean = _hidden(honest, method)
    poisoned = _hidden([*honest, wrecker], method)
    assert (poisoned - clean).abs().max() > 100 * clean.abs().max()

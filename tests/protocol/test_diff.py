"""Diffing two expert packages (protocol.diff): every number against a direct computation
that materialises each module's update `s B A` with numpy, on tiny random experts."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from protocol import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, GATE_SUFFIX, ROUTER_FILE, lora_keys
from protocol.diff import (
    BaseModelMismatch,
    DiffError,
    PackageDiff,
    diff_packages,
    lora_inner,
    update_change,
)
from protocol.peft_format import parse_lora_key
from tests.phatgoose.experts import random_expert
from tests.tiny import tiny_llama

# Two layers x seven linears of the tiny llama.
MODULES = 14


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llama()


def write(model: torch.nn.Module, directory: Path, *, seed: int = 0, rank: int = 4, **kw) -> Path:
    random_expert(model, name="alice/demo", rank=rank, seed=seed, **kw).save(directory)
    return directory


def copy(source: Path, directory: Path) -> Path:
    shutil.copytree(source, directory)
    return directory


def materialised(directory: Path) -> dict[str, np.ndarray]:
    """Every module's full update `scale * B @ A` (d x n, float64), as PEFT computes it."""
    config = json.loads((directory / ADAPTER_CONFIG_FILE).read_text())
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = load_file(directory / ADAPTER_WEIGHTS_FILE)
    updates = {}
    for key in tensors:
        path, matrix = parse_lora_key(key)
        if matrix == "A":
            key_a, key_b = lora_keys(path)
            b = tensors[key_b].astype(np.float64)
            updates[path] = scale * (b @ tensors[key_a].astype(np.float64))
    return updates


def direct_relative_change(a: Path, b: Path) -> dict[str, float]:
    updates_a, updates_b = materialised(a), materialised(b)
    return {
        path: float(np.linalg.norm(updates_b[path] - w) / np.linalg.norm(w))
        for path, w in updates_a.items()
        if path in updates_b
    }


def gates(directory: Path) -> dict[str, np.ndarray]:
    router = load_file(directory / ROUTER_FILE)
    return {k.removesuffix(GATE_SUFFIX): v for k, v in router.items() if k.endswith(GATE_SUFFIX)}


def by_path(diff: PackageDiff) -> dict[str, object]:
    return {m.path: m for m in diff.modules}


def test_relative_change_equals_the_materialised_updates(model, tmp_path):
    a, b = write(model, tmp_path / "a", seed=0), write(model, tmp_path / "b", seed=1)

    diff = diff_packages(a, b)

    expected = direct_relative_change(a, b)
    assert len(diff.modules) == len(expected) == MODULES
    updates_a, updates_b = materialised(a), materialised(b)
    for m in diff.modules:
        assert m.status == "changed" and m.present == "both"
        assert m.relative_change == pytest.approx(expected[m.path], rel=1e-10)
        assert m.norm_a == pytest.approx(np.linalg.norm(updates_a[m.path]), rel=1e-10)
        assert m.norm_b == pytest.approx(np.linalg.norm(updates_b[m.path]), rel=1e-10)
        assert m.identical.lora_a is False and m.identical.lora_b is False
        assert m.identical.gate is False


def test_the_cross_term_is_the_frobenius_inner_product_of_the_updates():
    rng = np.random.default_rng(0)
    a1, b1 = rng.normal(size=(3, 11)), rng.normal(size=(7, 3))
    a2, b2 = rng.normal(size=(5, 11)), rng.normal(size=(7, 5))

    assert lora_inner(a1, b1, a2, b2) == pytest.approx(np.sum((b1 @ a1) * (b2 @ a2)), rel=1e-12)
    change = update_change(a1, b1, 0.5, a2, b2, 2.0)
    assert change.difference == pytest.approx(
        np.linalg.norm(2.0 * b2 @ a2 - 0.5 * b1 @ a1), rel=1e-12
    )


def test_ranks_may_differ_between_the_two(model, tmp_path):
    a, b = write(model, tmp_path / "a", rank=2), write(model, tmp_path / "b", rank=8, seed=3)

    diff = diff_packages(a, b)

    expected = direct_relative_change(a, b)
    for m in diff.modules:
        assert (m.rank_a, m.rank_b) == (2, 8)
        assert (m.scale_a, m.scale_b) == (2.0, 2.0)  # random_expert: alpha = 2r
        assert m.relative_change == pytest.approx(expected[m.path], rel=1e-10)
    assert (diff.a.lora.r, diff.b.lora.r) == (2, 8)


def test_a_package_against_itself_is_unchanged_everywhere(model, tmp_path):
    a = write(model, tmp_path / "a")

    diff = diff_packages(a, a)

    assert diff.summary.modules_unchanged == MODULES
    assert diff.summary.modules_changed == diff.summary.modules_added == 0
    assert diff.summary.max_relative_change == 0.0
    assert diff.summary.median_relative_change == 0.0
    assert diff.summary.mean_gate_cosine == pytest.approx(1.0, abs=1e-12)
    assert diff.summary.lora_identical_modules == diff.summary.gate_identical_modules == MODULES
    for m in diff.modules:
        assert m.relative_change == 0.0  # exactly: the same bytes are the same update
        assert m.identical.lora_a and m.identical.lora_b and m.identical.gate
    assert all(f.identical for f in diff.files)
    assert diff.a.package_digest == diff.b.package_digest


def test_only_retrained_gates_show_as_gates_that_changed(model, tmp_path):
    a = write(model, tmp_path / "a")
    b = copy(a, tmp_path / "b")
    router = load_file(b / ROUTER_FILE)
    rng = np.random.default_rng(7)
    save_file(
        {k: v + rng.normal(size=v.shape).astype(v.dtype) for k, v in router.items()},
        b / ROUTER_FILE,
    )

    diff = diff_packages(a, b)

    gates_a, gates_b = gates(a), gates(b)
    for m in diff.modules:
        assert m.status == "changed"
        assert m.identical.lora_a and m.identical.lora_b
        assert m.identical.gate is False
        assert m.relative_change == 0.0
        g1, g2 = gates_a[m.path].astype(np.float64), gates_b[m.path].astype(np.float64)
        cosine = g1 @ g2 / (np.linalg.norm(g1) * np.linalg.norm(g2))
        assert m.gate_cosine == pytest.approx(cosine, rel=1e-10)
        assert m.gate_cosine < 1
    files = {f.filename: f.identical for f in diff.files}
    assert files[ADAPTER_WEIGHTS_FILE] and files[ADAPTER_CONFIG_FILE]
    assert not files[ROUTER_FILE]
    assert diff.summary.lora_identical_modules == MODULES
    assert diff.summary.gate_identical_modules == 0


def test_modules_added_and_removed_are_listed_apart(model, tmp_path):
    a = write(model, tmp_path / "a", target_modules=["q_proj", "v_proj"])
    b = write(model, tmp_path / "b", target_modules=["v_proj", "down_proj"], seed=1)

    diff = diff_packages(a, b)

    status = {m.path: m.status for m in diff.modules}
    assert status["model.layers.0.self_attn.q_proj"] == "removed"
    assert status["model.layers.1.mlp.down_proj"] == "added"
    assert status["model.layers.0.self_attn.v_proj"] == "changed"
    summary = diff.summary
    assert (summary.modules_added, summary.modules_removed, summary.modules_changed) == (2, 2, 2)
    removed = by_path(diff)["model.layers.0.self_attn.q_proj"]
    assert removed.present == "a" and removed.rank_b is None and removed.relative_change is None
    assert removed.norm_a == pytest.approx(
        np.linalg.norm(materialised(a)["model.layers.0.self_attn.q_proj"]), rel=1e-10
    )
    added = by_path(diff)["model.layers.1.mlp.down_proj"]
    assert added.present == "b" and added.rank_a is None and added.gate_cosine is None


def test_experts_on_different_base_models_are_refused_naming_both(model, tmp_path):
    a = write(model, tmp_path / "a")
    other = tiny_llama(seed=1)
    b = write(other, tmp_path / "b")

    with pytest.raises(BaseModelMismatch) as refused:
        diff_packages(a, b)

    fingerprint_a = json.loads((a / "expert.json").read_text())["base_model"]["fingerprint"]
    fingerprint_b = json.loads((b / "expert.json").read_text())["base_model"]["fingerprint"]
    assert fingerprint_a != fingerprint_b
    assert fingerprint_a in str(refused.value) and fingerprint_b in str(refused.value)


def test_a_scale_change_alone_is_a_change(model, tmp_path):
    a = write(model, tmp_path / "a")  # r = 4, alpha = 8: scale 2
    b = copy(a, tmp_path / "b")
    config = json.loads((b / ADAPTER_CONFIG_FILE).read_text())
    config["lora_alpha"] = 12  # scale 3
    (b / ADAPTER_CONFIG_FILE).write_text(json.dumps(config))

    diff = diff_packages(a, b)

    for m in diff.modules:
        assert m.identical.lora_a and m.identical.lora_b and m.identical.gate
        assert m.status == "changed"
        assert (m.scale_a, m.scale_b) == (2.0, 3.0)
        assert m.relative_change == pytest.approx(0.5, rel=1e-12)


def test_rslora_scales_by_the_square_root_of_the_rank(model, tmp_path):
    a = write(model, tmp_path / "a")
    b = copy(write(model, tmp_path / "b0", seed=2), tmp_path / "b")
    config = json.loads((b / ADAPTER_CONFIG_FILE).read_text())
    config["use_rslora"] = True
    (b / ADAPTER_CONFIG_FILE).write_text(json.dumps(config))

    diff = diff_packages(a, b)

    expected = direct_relative_change(a, b)
    assert diff.b.lora.scale == pytest.approx(8 / 2)  # alpha / sqrt(4)
    for m in diff.modules:
        assert m.relative_change == pytest.approx(expected[m.path], rel=1e-10)


def test_identity_compares_bytes_not_values(model, tmp_path):
    a = write(model, tmp_path / "a")
    b = copy(a, tmp_path / "b")
    key_a, _ = lora_keys("model.layers.0.self_attn.q_proj")
    for directory, zero in ((a, 0.0), (b, -0.0)):
        tensors = load_file(directory / ADAPTER_WEIGHTS_FILE)
        tensors[key_a][0, 0] = zero
        save_file(tensors, directory / ADAPTER_WEIGHTS_FILE)

    module = by_path(diff_packages(a, b))["model.layers.0.self_attn.q_proj"]

    assert module.identical.lora_a is False  # 0.0 == -0.0, but not their bytes
    assert module.relative_change == 0.0


def test_layers_group_modules_by_their_block(model, tmp_path):
    a, b = write(model, tmp_path / "a", seed=0), write(model, tmp_path / "b", seed=1)

    diff = diff_packages(a, b)

    assert [(layer.layer, layer.index, layer.modules) for layer in diff.layers] == [
        ("model.layers.0", 0, 7),
        ("model.layers.1", 1, 7),
    ]
    for layer in diff.layers:
        members = [m.relative_change for m in diff.modules if m.layer == layer.layer]
        assert layer.mean_relative_change == pytest.approx(np.mean(members), rel=1e-12)
        assert layer.max_relative_change == max(members)
    changes = [m.relative_change for m in diff.modules]
    assert diff.summary.median_relative_change == pytest.approx(np.median(changes))
    assert diff.summary.max_relative_change == max(changes)


def test_the_diff_is_json(model, tmp_path):
    a, b = write(model, tmp_path / "a", seed=0), write(model, tmp_path / "b", seed=1)

    diff = diff_packages(a, b)

    assert PackageDiff.model_validate_json(json.dumps(diff.model_dump(mode="json"))) == diff


def test_factors_of_different_ranks_within_a_module_are_refused_naming_the_shapes(model, tmp_path):
    a = write(model, tmp_path / "a")
    b = copy(a, tmp_path / "b")
    path = "model.layers.1.mlp.down_proj"
    key_a, _ = lora_keys(path)
    tensors = load_file(b / ADAPTER_WEIGHTS_FILE)
    tensors[key_a] = np.zeros((3, 64), dtype=np.float32)  # rank 3, but lora_B has rank 4
    save_file(tensors, b / ADAPTER_WEIGHTS_FILE)

    with pytest.raises(DiffError, match=rf"b: module '{path}'.*\[3, 64\].*\[32, 4\]"):
        diff_packages(a, b)


def test_a_module_whose_factors_disagree_between_packages_is_refused(model, tmp_path):
    a = write(model, tmp_path / "a")
    b = copy(a, tmp_path / "b")
    path = "model.layers.0.self_attn.q_proj"
    key_a, _ = lora_keys(path)
    tensors = load_file(b / ADAPTER_WEIGHTS_FILE)
    tensors[key_a] = np.ones((4, 33), dtype=np.float32)  # in_features 33, not 32
    save_file(tensors, b / ADAPTER_WEIGHTS_FILE)
    router = load_file(b / ROUTER_FILE)
    router[path + GATE_SUFFIX] = np.ones(33, dtype=np.float32)
    save_file(router, b / ROUTER_FILE)

    with pytest.raises(DiffError, match=rf"module '{path}'.*\[4, 32\].*\[4, 33\]"):
        diff_packages(a, b)


def test_a_directory_without_a_package_is_refused(tmp_path, model):
    a = write(model, tmp_path / "a")
    (tmp_path / "empty").mkdir()

    with pytest.raises(DiffError, match=r"b .*adapter_config\.json"):
        diff_packages(a, tmp_path / "empty")

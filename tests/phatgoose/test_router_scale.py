"""Routing must not depend on the scale of a contributor's gates (router numerics 2).

Gates trained for a few steps from zero have variances near 1e-5; LayerNorm's eps (numerics
1) shrank such rows by their own factor, so experts whose gates grew larger were chosen
more. Here every expert's gates are that small, as after the cpu preset's 16 gate steps.
"""

import pytest
import torch

from phatgoose.routing import build_routed_model, capture_routing
from phatgoose.routing.routers import standardise_rows
from protocol import ROUTER_NUMERICS
from tests.phatgoose.experts import random_expert
from tests.tiny import tiny_llama

GATE_STD = 3e-3  # variance 1e-5: LayerNorm's eps would shrink these rows by 0.7


def small_gated_experts(model, scales=(1.0, 1.0, 1.0)):
    experts = []
    for z, scale in enumerate(scales):
        expert = random_expert(model, name=f"e{z}", rank=2, seed=z)
        gates = {p: g * GATE_STD * scale for p, g in expert.gates.items()}
        experts.append(expert.with_gates(gates, gate_steps=16))
    return experts


def routed_run(experts, numerics=ROUTER_NUMERICS):
    model = build_routed_model(tiny_llama(), experts, top_k=2, router_numerics=numerics)
    input_ids = torch.randint(4, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture_routing(model) as stats:
        logits = model(input_ids=input_ids).logits
    return logits, {path: counts.clone() for path, counts in stats.counts.items()}


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_a_row_and_its_multiple_standardise_alike(scale):
    rows = torch.randn(4, 64) * GATE_STD
    torch.testing.assert_close(standardise_rows(rows * scale), standardise_rows(rows))


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_scaling_one_experts_gates_changes_no_decision_and_no_output(scale):
    logits, counts = routed_run(small_gated_experts(tiny_llama()))
    scaled_logits, scaled_counts = routed_run(small_gated_experts(tiny_llama(), (1.0, scale, 1.0)))
    assert scaled_counts.keys() == counts.keys()
    for path, path_counts in counts.items():
        assert torch.equal(scaled_counts[path], path_counts), path
    torch.testing.assert_close(scaled_logits, logits, atol=1e-5, rtol=1e-5)


def test_with_layer_norms_eps_one_experts_gate_scale_changes_decisions():
    # What numerics 2 fixes: under numerics 1, the shrunk rows' affinities lose magnitude
    # against an expert whose gates grew larger, so who is chosen changes.
    _, counts = routed_run(small_gated_experts(tiny_llama()), numerics=1)
    _, scaled = routed_run(small_gated_experts(tiny_llama(), (1.0, 1e3, 1.0)), numerics=1)
    changed = [path for path in counts if not torch.equal(counts[path], scaled[path])]
    assert len(changed) > len(counts) // 2


def test_an_all_zero_gate_routes_without_nan():
    experts = small_gated_experts(tiny_llama())
    experts[0] = experts[0].with_gates(
        {p: torch.zeros_like(g) for p, g in experts[0].gates.items()}, gate_steps=0
    )
    assert torch.equal(standardise_rows(torch.zeros(2, 8)), torch.zeros(2, 8))
    logits, counts = routed_run(experts)
    assert torch.isfinite(logits).all()
    assert all(c.sum() > 0 for c in counts.values())


def test_numerics_1_is_layer_norm_for_releases_made_with_it():
    rows = torch.randn(3, 16) * GATE_STD
    expected = torch.nn.functional.layer_norm(rows, (16,), eps=1e-5)
    torch.testing.assert_close(standardise_rows(rows, numerics=1), expected)


def test_unknown_numerics_are_refused():
    with pytest.raises(ValueError, match="router_numerics must be 1 to 2"):
        build_routed_model(tiny_llama(), small_gated_experts(tiny_llama()), router_numerics=3)

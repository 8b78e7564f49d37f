"""The routed linear's dtype contract: the router decides in float32, the expert mixture runs
in the stacked factors' dtype (the model's compute precision), and the update lands in the
base output's dtype, whatever mix of float32 and bfloat16 input, base weight and factors,
with or without autocast, on every mixture path.

Tolerances: bfloat16 keeps 8 significant bits (relative rounding 2^-9 per value), and the
tiny layers here sum at most a few dozen products, so a bfloat16 result stays within 3 % of
the float32 reference's largest entry; float32 throughout stays within 1e-5.
"""

import pytest
import torch
from torch import nn

from phatgoose.precision import compute_in, resolve_precision
from phatgoose.routing import build_routed_model, capture_routing
from phatgoose.routing import layer as routing_layer
from phatgoose.routing.layer import RoutedLinear, stack_updates
from phatgoose.routing.routers import FixedRouter, TokenRouter, constant_choice
from tests.phatgoose.experts import random_expert
from tests.tiny import tiny_llama

BF16, FP32 = torch.bfloat16, torch.float32
# 32-byte rows in bfloat16: grouped_mm applies in both dtypes.
N_IN, D_OUT, RANK, EXPERTS = 16, 24, 8, 5
PATHS = ["single_expert_update", "grouped_update", "pair_update"]


def routed_layer(path: str, seed: int = 0) -> RoutedLinear:
    gen = torch.Generator().manual_seed(seed)
    count = 1 if path == "single_expert_update" else EXPERTS
    updates = [
        (torch.randn(RANK, N_IN, generator=gen), torch.randn(D_OUT, RANK, generator=gen), 0.5)
        for _ in range(count)
    ]
    torch.manual_seed(seed)
    router = (
        FixedRouter(constant_choice())
        if count == 1
        else TokenRouter(torch.randn(count, N_IN, generator=gen), top_k=2)
    )
    return RoutedLinear(nn.Linear(N_IN, D_OUT), *stack_updates(updates), router)


def force_path(path: str, monkeypatch) -> None:
    monkeypatch.setattr(routing_layer, "use_grouped_mm", path == "grouped_update")
    monkeypatch.setattr(routing_layer, "GROUPED_MIN_PAIRS", dict.fromkeys((FP32, BF16), 0))


def record_mixture_dtypes(monkeypatch) -> list[tuple[str, torch.dtype]]:
    """(path, dtype of the `u` it computed with) for every mixture call."""
    seen: list[tuple[str, torch.dtype]] = []
    for name in PATHS:
        method = getattr(RoutedLinear, name)

        def recording(self, u, *args, name=name, method=method):
            seen.append((name, u.dtype))
            return method(self, u, *args)

        monkeypatch.setattr(RoutedLinear, name, recording)
    return seen


def cast(layer: RoutedLinear, base_dtype: torch.dtype, factor_dtype: torch.dtype) -> None:
    """As `compute_in` does: another dtype's copies of the base weight and of the factors."""
    layer.base_layer.to(base_dtype)
    layer.register_buffer("lora_A", layer.lora_A.to(factor_dtype), persistent=False)
    layer.register_buffer("lora_B", layer.lora_B.to(factor_dtype), persistent=False)


COMBINATIONS = [
    (u_dtype, base_dtype, factor_dtype, autocast)
    for u_dtype in (FP32, BF16)
    for base_dtype in (FP32, BF16)
    for factor_dtype in (FP32, BF16)
    for autocast in (False, True)
    if autocast or base_dtype == u_dtype  # without autocast, nn.Linear needs matching dtypes
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("u_dtype", "base_dtype", "factor_dtype", "autocast"), COMBINATIONS)
def test_every_dtype_mix_runs_the_mixture_in_the_factors_dtype(
    path, u_dtype, base_dtype, factor_dtype, autocast, monkeypatch
):
    force_path(path, monkeypatch)
    layer = routed_layer(path)
    u = torch.randn(3, 4, N_IN)
    with torch.no_grad():
        reference = layer(u)  # float32 throughout
        cast(layer, base_dtype, factor_dtype)
        seen = record_mixture_dtypes(monkeypatch)
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            got = layer(u.to(u_dtype))
            expected_dtype = layer.base_layer(u.to(u_dtype)).dtype
    assert seen == [(path, factor_dtype)]
    assert got.dtype == expected_dtype  # the base output's dtype
    low = BF16 in (u_dtype, base_dtype, factor_dtype) or autocast
    tolerance = 3e-2 * reference.abs().max().item() if low else 1e-5
    torch.testing.assert_close(got.float(), reference, atol=tolerance, rtol=0)


@pytest.mark.parametrize("path", ["grouped_update", "pair_update"])
def test_bf16_routes_exactly_as_float32_for_the_same_input(path, monkeypatch):
    """The router decides in float32 (autocast off inside it): the same input under a
    bfloat16 autocast picks the same experts with the same float32 weights."""
    force_path(path, monkeypatch)
    layer = routed_layer(path)
    u = torch.randn(6, N_IN)
    with torch.no_grad():
        indices, weights = layer.router(u)
        cast(layer, BF16, BF16)
        with torch.autocast("cpu", dtype=BF16):
            bf16_indices, bf16_weights = layer.router(u)
    assert torch.equal(bf16_indices, indices)
    assert bf16_weights.dtype == FP32
    torch.testing.assert_close(bf16_weights, weights, atol=0, rtol=0)


def test_factors_keep_their_layout_through_a_dtype_copy():
    """`compute_in` swaps in `.to(bfloat16)` copies: they keep `factor_layout`, so the
    embedding bags and grouped_mm read them without a copy per forward."""
    layer = routed_layer("pair_update")
    for factor in (layer.lora_A, layer.lora_B, layer.lora_A.to(BF16), layer.lora_B.to(BF16)):
        assert factor.transpose(1, 2).is_contiguous()


def test_gate_gradient_flows_through_a_bf16_mixture():
    """Gate training under bfloat16: the gate (float32) gets the gradient that float32
    compute gives, within bfloat16's tolerance."""
    from phatgoose.routing.routers import GateRouter

    gen = torch.Generator().manual_seed(3)
    update = (torch.randn(RANK, N_IN, generator=gen), torch.randn(D_OUT, RANK, generator=gen), 1.0)
    linear = nn.Linear(N_IN, D_OUT).requires_grad_(False)
    layer = RoutedLinear(linear, *stack_updates([update]), GateRouter(torch.randn(N_IN) / 4))
    u = torch.randn(8, N_IN)
    (gate,) = [p for p in layer.parameters() if p.requires_grad]
    expected = torch.autograd.grad(layer(u).square().sum(), gate)[0]
    cast(layer, BF16, BF16)
    with torch.autocast("cpu", dtype=BF16):
        got = torch.autograd.grad(layer(u).float().square().sum(), gate)[0]
    assert got.dtype == FP32
    torch.testing.assert_close(got, expected, atol=5e-2 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("mixture", ["grouped_update", "pair_update"])
def test_tiny_routed_model_in_bf16_stays_close_to_float32(mixture, monkeypatch):
    """A routed tiny Llama under `compute_in(bfloat16)`: the mixture runs in bfloat16 on the
    path asked for, and at least 95 % of the expert choices are float32's (the router
    decides in float32, but on an input that upstream bfloat16 rounding moved, so
    near-ties may flip). A flipped choice swaps a whole random expert, so the logits are
    compared on average: within 2 % of their scale (measured: 1 %, with 99 % agreement)."""
    force_path(mixture, monkeypatch)
    model = tiny_llama()
    experts = [random_expert(model, name=f"e{z}", rank=8, seed=z) for z in range(6)]
    build_routed_model(model, experts, "phatgoose", top_k=2)
    ids = torch.randint(4, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with capture_routing(model) as fp32_stats:
            reference = model(input_ids=ids).logits
        seen = record_mixture_dtypes(monkeypatch)
        with compute_in(resolve_precision("bfloat16"), model), capture_routing(model) as stats:
            logits = model(input_ids=ids).logits.float()
    assert {dtype for _, dtype in seen} == {BF16}
    assert {path for path, _ in seen} == {mixture}
    same = total = 0
    for path, counts in fp32_stats.to_dict()["counts"].items():
        other = stats.to_dict()["counts"][path]
        same += sum(min(a, b) for a, b in zip(counts, other, strict=True))
        total += sum(counts)
    assert same / total >= 0.95, f"{same}/{total} selections agree"
    scale = reference.abs().max().item()
    assert (logits - reference).abs().mean().item() <= 0.02 * scale

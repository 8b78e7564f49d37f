"""The routed linear's selected-only mixture, in each of its regimes, against the first
(loop) implementation kept in the micro-benchmark and a per-token reference."""

import pytest
import torch

from benchmarks.routed_linear_micro import METHODS, cast_layer, mixture_loop_v1, shared_routing
from phatgoose.routing.layer import RoutedLinear
from phatgoose.routing.routers import TokenRouter


def per_token_reference(layer, u, indices, weights):
    out = torch.zeros(u.shape[0], layer.out_features)
    for t in range(u.shape[0]):  # y_t = sum_k w_tk B_z A_z u_t
        for z, w in zip(indices[t].tolist(), weights[t].tolist(), strict=True):
            out[t] += w * (layer.lora_B[z] @ (layer.lora_A[z] @ u[t]))
    return out


def layer_with(num_experts, n=6, d=5, rank=3):
    """Default sizes are not multiples of 4: the platform's path must not need alignment."""
    generator = torch.Generator().manual_seed(num_experts)
    base = torch.nn.Linear(n, d, bias=False)
    lora_a = torch.randn(num_experts, rank, n, generator=generator)
    lora_b = torch.randn(num_experts, d, rank, generator=generator)
    rows = torch.randn(num_experts, n, generator=generator)
    return RoutedLinear(base, lora_a, lora_b, TokenRouter(rows, min(2, num_experts)))


@pytest.mark.parametrize("sizes", [(6, 5, 3), (8, 12, 4)], ids=["unaligned", "aligned"])
@pytest.mark.parametrize(
    ("num_experts", "tokens", "choice"),
    [
        (40, 3, "spread"),  # few experts present among many: compact padded block
        (4, 30, "spread"),  # most experts present: padded block indexed by expert id
        (5, 40, "skewed"),  # one expert holds most pairs: its own matmul, the rest padded
        (3, 20, "one"),  # every pair on one expert (a fixed router)
    ],
)
def test_selected_update_matches_the_loop_and_a_per_token_reference(
    num_experts, tokens, choice, sizes
):
    n, d, rank = sizes
    layer = layer_with(num_experts, n=n, d=d, rank=rank)
    generator = torch.Generator().manual_seed(tokens)
    u = torch.randn(tokens, n, generator=generator)
    k = 2
    if choice == "spread":
        indices = torch.stack(
            [torch.randperm(num_experts, generator=generator)[:k] for _ in range(tokens)]
        )
    elif choice == "skewed":
        other = torch.randint(1, num_experts, (tokens,), generator=generator)
        indices = torch.stack([torch.zeros(tokens, dtype=torch.long), other], dim=1)
    else:
        k = 1
        indices = torch.full((tokens, 1), num_experts - 1)
    weights = torch.softmax(torch.randn(tokens, k, generator=generator), dim=-1)
    expected = per_token_reference(layer, u, indices, weights)
    torch.testing.assert_close(
        layer.selected_update(u, indices, weights), expected, rtol=1e-4, atol=1e-4
    )
    for name, mixture in METHODS.items():
        if name == "grouped_mm" and n % 4:
            continue  # grouped_mm needs 16-byte strides
        torch.testing.assert_close(
            mixture(layer, u, indices, weights), expected, rtol=1e-4, atol=1e-4, msg=name
        )
    torch.testing.assert_close(
        mixture_loop_v1(layer, u, indices, weights), expected, rtol=1e-4, atol=1e-4
    )


def test_shared_routing_proposal_equals_each_routers_own():
    generator = torch.Generator().manual_seed(0)
    routers = [TokenRouter(torch.randn(7, 8, generator=generator), 2) for _ in range(3)]
    u = torch.randn(2, 5, 8, generator=generator)
    for router, (indices, weights) in zip(routers, shared_routing(routers, u), strict=True):
        own_indices, own_weights = router(u)
        assert torch.equal(indices, own_indices)
        torch.testing.assert_close(weights, own_weights, rtol=1e-6, atol=1e-6)


def test_every_mixture_in_bf16_stays_within_bf16_rounding_of_float32():
    """Factors and input in bfloat16 (8 significant bits), sizes grouped_mm takes in both
    dtypes: each mixture within 3 % of the float32 reference's largest entry."""
    layer = layer_with(6, n=16, d=24, rank=8)
    generator = torch.Generator().manual_seed(1)
    u = torch.randn(20, 16, generator=generator)
    indices, weights = layer.router(u)
    expected = per_token_reference(layer, u, indices, weights)
    cast_layer(layer, torch.bfloat16)
    tolerance = 3e-2 * expected.abs().max().item()
    for name, mixture in METHODS.items():
        got = mixture(layer, u.bfloat16(), indices, weights)
        assert got.dtype == torch.bfloat16, name
        torch.testing.assert_close(got.float(), expected, rtol=0, atol=tolerance, msg=name)

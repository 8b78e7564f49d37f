"""One routed linear on raw tensors, against a token-by-token reference."""

import math

import pytest
import torch
from torch import nn

from phatgoose.routing import layer as routing_layer
from phatgoose.routing.layer import RoutedLinear, grouped_mm_applies, stack_updates
from phatgoose.routing.routers import (
    ArrowRouter,
    FixedRouter,
    GateRouter,
    TokenRouter,
    constant_choice,
)

# Sizes grouped_mm accepts (16-byte strides), so both mixtures run on them.
N_IN, D_OUT, RANKS = 12, 16, (2, 4, 4, 8, 3)
HAS_GROUPED_MM = hasattr(torch.nn.functional, "grouped_mm")


def force_mixture(monkeypatch, name: str) -> None:
    """`grouped_mm`: grouped_update wherever grouped_mm applies, however few the pairs;
    `pairs`: grouped_mm off, so pair_update takes every multi-expert mixture."""
    monkeypatch.setattr(routing_layer, "use_grouped_mm", name == "grouped_mm")
    thresholds = dict.fromkeys(routing_layer.GROUPED_MIN_PAIRS, 0)
    monkeypatch.setattr(routing_layer, "GROUPED_MIN_PAIRS", thresholds)


@pytest.fixture(autouse=True, params=["grouped_mm", "pairs"])
def mixture(request, monkeypatch):
    """Every test runs with the grouped_mm mixture and with the embedding-bag one."""
    if request.param == "grouped_mm" and not HAS_GROUPED_MM:
        pytest.skip("this torch has no grouped_mm")
    force_mixture(monkeypatch, request.param)
    return request.param


def random_updates(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(r, N_IN, generator=gen), torch.randn(D_OUT, r, generator=gen), 2.0 / r)
        for r in RANKS
    ]


def base_linear(seed: int = 1) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(N_IN, D_OUT)


def by_hand_standardise(x: torch.Tensor) -> torch.Tensor:
    """A token: LayerNorm's eps under the square root."""
    centred = x - x.mean(-1, keepdim=True)
    return centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5)


def by_hand_standardise_row(x: torch.Tensor) -> torch.Tensor:
    """A router row (router numerics 2): divided by its own standard deviation only."""
    centred = x.double() - x.double().mean(-1, keepdim=True)
    return (centred / centred.pow(2).mean(-1, keepdim=True).sqrt()).float()


def reference(linear, updates, u, select):
    """Loop over tokens: score every expert, keep the top-k, add their weighted updates."""
    out = []
    for token in u.reshape(-1, N_IN):
        chosen, weights = select(token)
        y = linear(token)
        for z, w in zip(chosen, weights, strict=True):
            a, b, scale = updates[z]
            y = y + w * scale * (b @ (a @ token))
        out.append(y)
    return torch.stack(out).reshape(*u.shape[:-1], D_OUT)


def test_token_router_matches_per_token_phatgoose_reference():
    updates, linear = random_updates(), base_linear()
    gates = torch.randn(len(RANKS), N_IN)
    layer = RoutedLinear(linear, *stack_updates(updates), TokenRouter(gates, top_k=2))
    u = torch.randn(3, 5, N_IN)

    def select(token):
        affinity = torch.stack(
            [by_hand_standardise_row(g) @ by_hand_standardise(token) for g in gates]
        )
        chosen = affinity.argsort(descending=True)[:2]
        return chosen.tolist(), torch.softmax(affinity[chosen] / math.sqrt(N_IN), dim=0)

    torch.testing.assert_close(layer(u), reference(linear, updates, u, select), atol=1e-5, rtol=0)


def test_arrow_router_matches_per_token_reference_without_standardising_or_sqrt_n():
    updates, linear = random_updates(), base_linear()
    rows = torch.randn(len(RANKS), N_IN)
    layer = RoutedLinear(linear, *stack_updates(updates), ArrowRouter(rows, top_k=3))
    u = torch.randn(4, N_IN)

    def select(token):
        score = (rows @ token).abs()
        chosen = score.argsort(descending=True)[:3]
        return chosen.tolist(), torch.softmax(score[chosen], dim=0)

    torch.testing.assert_close(layer(u), reference(linear, updates, u, select), atol=1e-5, rtol=0)


def test_stacking_zero_pads_lower_ranks_and_folds_scale_into_b():
    updates = random_updates()
    lora_A, lora_B = stack_updates(updates)
    assert lora_A.shape == (5, 8, N_IN) and lora_B.shape == (5, D_OUT, 8)
    for z, (a, b, scale) in enumerate(updates):
        torch.testing.assert_close(lora_B[z] @ lora_A[z], scale * b @ a)
        assert lora_A[z, a.shape[0] :].abs().sum() == 0


def test_unselected_experts_are_never_computed():
    updates, linear = random_updates(), base_linear()
    gates = torch.randn(len(RANKS), N_IN)
    layer = RoutedLinear(linear, *stack_updates(updates), TokenRouter(gates, top_k=1))
    u = torch.randn(1, 2, N_IN)  # two tokens with k = 1 leave at least three experts out
    before = layer(u)
    chosen = set(layer.router(u)[0].flatten().tolist())
    unselected = sorted(set(range(len(RANKS))) - chosen)
    assert unselected, "the seed should leave some expert unselected"
    layer.lora_A[unselected] = float("nan")
    layer.lora_B[unselected] = float("nan")
    torch.testing.assert_close(layer(u), before)


def test_fixed_router_applies_each_rows_expert_to_the_whole_row():
    updates, linear = random_updates(), base_linear()
    layer = RoutedLinear(linear, *stack_updates(updates), FixedRouter(lambda: torch.tensor([3, 0])))
    u = torch.randn(2, 4, N_IN)
    for row, z in enumerate([3, 0]):
        a, b, scale = updates[z]
        torch.testing.assert_close(layer(u)[row], linear(u[row]) + scale * u[row] @ a.T @ b.T)


def test_fixed_router_repeats_row_choices_for_beams():
    updates, linear = random_updates(), base_linear()
    layer = RoutedLinear(linear, *stack_updates(updates), FixedRouter(lambda: torch.tensor([1, 4])))
    indices, _ = layer.router(torch.randn(4, 3, N_IN))
    assert indices.flatten().tolist() == [1, 1, 4, 4]


def test_constant_choice_routes_every_row_to_one_expert():
    updates, linear = random_updates(), base_linear()
    layer = RoutedLinear(linear, *stack_updates(updates[2:3]), FixedRouter(constant_choice()))
    u = torch.randn(3, N_IN)
    a, b, scale = updates[2]
    torch.testing.assert_close(layer(u), linear(u) + scale * u @ a.T @ b.T)


def test_gate_router_weights_its_one_expert_by_the_sigmoid_of_the_gate():
    updates, linear = random_updates()[2:3], base_linear()
    gate = torch.randn(N_IN)
    layer = RoutedLinear(linear, *stack_updates(updates), GateRouter(gate))
    u = torch.randn(3, 5, N_IN)

    def select(token):  # y = W u + scale * B A u * sigmoid(v^T u)
        return [0], torch.sigmoid(gate @ token)[None]

    torch.testing.assert_close(layer(u), reference(linear, updates, u, select), atol=1e-5, rtol=0)
    torch.testing.assert_close(layer(u[0, 0]), layer(u)[0, 0])  # one unbatched token


def test_gate_router_trains_only_its_gate_through_every_mixture_path():
    # One stacked expert: two plain matmuls, whose backward reaches the gate.
    updates, linear = random_updates()[2:3], base_linear()
    linear.requires_grad_(False)
    layer = RoutedLinear(linear, *stack_updates(updates), GateRouter(torch.zeros(N_IN)))
    (gate,) = [p for p in layer.parameters() if p.requires_grad]
    u = torch.randn(6, N_IN)
    got = torch.autograd.grad(layer(u).sum(), gate)[0]
    a, b, scale = updates[0]
    expected_sum = sum(torch.sigmoid(gate @ t) * scale * (b @ (a @ t)).sum() for t in u)
    expected = torch.autograd.grad(expected_sum, gate)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert got.abs().max() > 0


def test_top_k_larger_than_the_experts_is_refused():
    with pytest.raises(ValueError, match=r"top_k must be an integer between 1 and .* \(5\)"):
        TokenRouter(torch.randn(5, N_IN), top_k=6)


def test_mismatched_stacked_shapes_are_refused_with_the_module_path():
    lora_A, lora_B = stack_updates(random_updates())
    with pytest.raises(ValueError, match=r"layers.0.q: lora_A must be \[N, r, 12\]"):
        RoutedLinear(
            base_linear(),
            lora_A[:, :, :5],
            lora_B,
            FixedRouter(constant_choice()),
            path="layers.0.q",
        )


def record_paths(monkeypatch) -> list[str]:
    """Names of the mixture paths `selected_update` takes, in call order."""
    calls: list[str] = []
    for name in ("grouped_update", "pair_update", "single_expert_update"):
        method = getattr(RoutedLinear, name)
        monkeypatch.setattr(
            RoutedLinear,
            name,
            lambda self, *a, name=name, method=method: calls.append(name) or method(self, *a),
        )
    return calls


def test_each_mixture_path_runs_where_it_applies(mixture, monkeypatch):
    """Forced as the fixture says: aligned sizes take grouped_mm (when on), else the bags."""
    updates, linear = random_updates(), base_linear()
    layer = RoutedLinear(linear, *stack_updates(updates), TokenRouter(torch.randn(5, N_IN), 2))
    calls = record_paths(monkeypatch)
    layer(torch.randn(6, N_IN))
    layer(torch.randn(1, N_IN))
    path = "grouped_update" if mixture == "grouped_mm" else "pair_update"
    assert calls == [path, path]


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="this torch has no grouped_mm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_takes_over_from_the_bags_at_its_pairs_per_expert(dtype, monkeypatch):
    monkeypatch.setattr(routing_layer, "use_grouped_mm", True)
    monkeypatch.setattr(routing_layer, "GROUPED_MIN_PAIRS", {torch.float32: 8, torch.bfloat16: 48})
    n = 16  # 32 bytes of bfloat16: grouped_mm's strides in both dtypes
    updates = [(torch.randn(8, n), torch.randn(D_OUT, 8), 1.0) for _ in range(5)]
    layer = RoutedLinear(
        nn.Linear(n, D_OUT), *stack_updates(updates), TokenRouter(torch.randn(5, n), 2)
    ).to(dtype)
    calls = record_paths(monkeypatch)
    threshold = {torch.float32: 8, torch.bfloat16: 48}[dtype]
    tokens = threshold * 5 // 2  # k = 2 pairs per token, 5 experts
    with torch.no_grad():
        layer(torch.randn(tokens, n, dtype=dtype))
        layer(torch.randn(tokens - 1, n, dtype=dtype))
    assert calls == ["grouped_update", "pair_update"]


@pytest.mark.parametrize("tokens", [1, 2, 3, 7])
def test_few_and_many_tokens_match_the_reference(tokens):
    updates, linear = random_updates(), base_linear()
    gates = torch.randn(len(RANKS), N_IN)
    layer = RoutedLinear(linear, *stack_updates(updates), TokenRouter(gates, top_k=2))
    u = torch.randn(tokens, N_IN)
    indices, weights = layer.router(u)

    def select(token):
        t = next(i for i in range(tokens) if torch.equal(u[i], token))
        return indices[t].tolist(), weights[t]

    torch.testing.assert_close(layer(u), reference(linear, updates, u, select), atol=1e-5, rtol=0)


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="this torch has no grouped_mm")
def test_grouped_mm_applies_only_to_aligned_cpu_operands_without_a_graph(mixture, monkeypatch):
    a, b = torch.zeros(3, 8, 12), torch.zeros(3, 10, 8)
    u = torch.zeros(5, 12)
    assert grouped_mm_applies(u, a, b) == (mixture == "grouped_mm")  # the switch
    monkeypatch.setattr(routing_layer, "use_grouped_mm", True)
    assert grouped_mm_applies(u, a, b)
    u16, a16, b16 = torch.zeros(5, 16), torch.zeros(3, 8, 16), torch.zeros(3, 10, 8)
    for dtype in (torch.bfloat16, torch.float16):
        assert grouped_mm_applies(u16.to(dtype), a16.to(dtype), b16.to(dtype))
    assert not grouped_mm_applies(u.half(), a.half(), b.half())  # 12 halves: 24 bytes
    assert not grouped_mm_applies(u.double(), a.double(), b.double())  # no CPU kernel
    assert not grouped_mm_applies(torch.zeros(5, 6), torch.zeros(3, 8, 6), b)  # n = 6
    assert not grouped_mm_applies(u, torch.zeros(3, 6, 12), torch.zeros(3, 10, 6))  # r = 6
    assert not grouped_mm_applies(u, a, b.double())
    # B stored as a transposed [N, r, d] view (d = 10 is not a multiple of 4 floats).
    assert not grouped_mm_applies(u, a, torch.zeros(3, 8, 10).transpose(1, 2))
    assert grouped_mm_applies(u, a, torch.zeros(3, 8, 12).transpose(1, 2))
    assert not grouped_mm_applies(u, a, b, torch.ones(5, 1, requires_grad=True))
    assert not grouped_mm_applies(u.requires_grad_(), a, b)
    with torch.no_grad():
        assert grouped_mm_applies(u, a, b)


def test_gradients_flow_through_the_routed_linear():
    updates, linear = random_updates(), base_linear()
    lora_A, lora_B = stack_updates(updates)
    layer = RoutedLinear(linear, lora_A, lora_B, TokenRouter(torch.randn(5, N_IN), top_k=2))
    u = torch.randn(6, N_IN, requires_grad=True)
    layer(u).sum().backward()
    expected = torch.autograd.grad(reference_sum(layer, u), u)[0]
    torch.testing.assert_close(u.grad, expected, atol=1e-5, rtol=1e-5)


def reference_sum(layer, u):
    indices, weights = layer.router(u)
    total = layer.base_layer(u).sum()
    for t in range(u.shape[0]):
        for z, w in zip(indices[t].tolist(), weights[t], strict=True):
            total = total + w * (layer.lora_B[z] @ (layer.lora_A[z] @ u[t])).sum()
    return total

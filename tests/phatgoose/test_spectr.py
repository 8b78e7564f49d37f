"""SpectR routing: its scores against the dense update's SVD, the routed model against a
token-by-token reference, and Arrow as its rank-1 case."""

import copy

import pytest
import torch

from phatgoose.routing import RoutedLinear, build_routed_model
from phatgoose.routing import layer as routing_layer
from phatgoose.routing.model import routing_state
from phatgoose.routing.routers import SpectralRouter
from phatgoose.routing.rows import spectral_basis, spectral_rows
from protocol import lora_key
from tests.phatgoose.experts import random_expert
from tests.phatgoose.test_routing_model import batch_for, logits

RANKS = (1, 2, 3, 5, 8)  # five experts, each of its own rank
SCORES = ("input", "spectrum")
WEIGHTINGS = ("uniform", "softmax")


def make_experts(model, ranks=RANKS):
    """Random experts with B halved: updates half the size of the module's input.

    At full size (updates as large as the input) softmax over "spectrum" scores on the tiny
    T5 is so sharp that rounding the reference's own float64 scores to float32 moves its
    logits by 8e-5, beyond what a 1e-5 comparison can take; at half size, 1.5e-6.
    """
    experts = [random_expert(model, name=f"e{z}", rank=r, seed=20 + z) for z, r in enumerate(ranks)]
    for e in experts:
        for path in e.module_paths():
            e.lora_weights[lora_key(path, "B")] = e.lora_weights[lora_key(path, "B")] / 2
    return experts


def dense_spectra(experts, path):
    """Per expert: the dense update `s B A` and its SVD by torch.linalg.svd, in float64."""
    spectra = []
    for e in experts:
        a, b, scale = e.lora_update(path)
        update = scale * b.double() @ a.double()
        _, singular, vh = torch.linalg.svd(update)
        rank = a.shape[0]  # random factors: the update has the LoRA's full rank
        spectra.append((update, singular[:rank], vh[:rank]))
    return spectra


def naive_score(spectrum, token, score):
    """`||V^T u||` ("input") or `||S V^T u||` ("spectrum") from the dense SVD."""
    _, singular, vh = spectrum
    projection = vh @ token.double()
    return (projection * singular if score == "spectrum" else projection).norm()


def naive_spectr_hooks(model, experts, top_k, score, weighting):
    """Forward hooks adding, token by token, the selected experts' weighted dense updates."""
    modules = dict(model.named_modules())
    hooks = []
    for path in experts[0].module_paths():
        spectra = dense_spectra(experts, path)

        def add_updates(_module, inputs, output, spectra=spectra):
            u = inputs[0].reshape(-1, inputs[0].shape[-1])
            extra = torch.zeros(u.shape[0], output.shape[-1], dtype=torch.float64)
            for t, token in enumerate(u):
                scores = torch.stack([naive_score(s, token, score) for s in spectra])
                chosen = scores.argsort(descending=True)[:top_k]
                if weighting == "uniform":
                    weights = torch.full((top_k,), 1 / top_k, dtype=torch.float64)
                else:
                    weights = torch.softmax(scores[chosen], dim=0)
                for z, w in zip(chosen.tolist(), weights, strict=True):
                    extra[t] += w * (spectra[z][0] @ token.double())
            return output + extra.float().reshape(output.shape)

        hooks.append(modules[path].register_forward_hook(add_updates))
    return hooks


def record_routers(model):
    """Forward hooks keeping every router's (indices, weights), in call order, by path."""
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    hooks = []
    for module in model.modules():
        if isinstance(module, RoutedLinear):

            def keep(_router, _inputs, output, path=module.path):
                seen.setdefault(path, []).append(output)

            hooks.append(module.router.register_forward_hook(keep))
    return seen, hooks


@pytest.fixture(params=["grouped_mm", "pairs"])
def mixture(request, monkeypatch):
    """Each mixture path: grouped_mm wherever it applies, and the embedding bags."""
    if request.param == "grouped_mm" and not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("this torch has no grouped_mm")
    monkeypatch.setattr(routing_layer, "use_grouped_mm", request.param == "grouped_mm")
    thresholds = dict.fromkeys(routing_layer.GROUPED_MIN_PAIRS, 0)
    monkeypatch.setattr(routing_layer, "GROUPED_MIN_PAIRS", thresholds)
    return request.param


@pytest.mark.parametrize("score", SCORES)
def test_spectral_rows_score_tokens_as_the_dense_updates_svd(llama, score):
    experts = make_experts(llama)
    path = "model.layers.1.mlp.up_proj"
    bases = spectral_rows(experts, path, score)
    assert bases.shape == (len(RANKS), max(RANKS), 32) and bases.dtype == torch.float32
    tokens = torch.randn(7, 32, generator=torch.Generator().manual_seed(1))
    scores = (tokens @ bases.flatten(0, 1).T).unflatten(-1, bases.shape[:2]).norm(dim=-1)
    spectra = dense_spectra(experts, path)
    expected = torch.tensor(
        [[naive_score(s, token, score).item() for s in spectra] for token in tokens]
    )
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    if score == "spectrum":  # ||S V^T u|| is the norm of the update's output
        outputs = torch.stack([(s[0] @ tokens.double().T).norm(dim=0) for s in spectra], dim=1)
        torch.testing.assert_close(scores, outputs.float(), rtol=1e-5, atol=1e-6)


def test_spectral_basis_of_batched_factors_equals_each_experts_own():
    gen = torch.Generator().manual_seed(2)
    lora_A, lora_B = torch.randn(3, 4, 20, generator=gen), torch.randn(3, 12, 4, generator=gen)
    scales = torch.tensor([0.5, 1.0, 2.0])
    batched = spectral_basis(lora_A, lora_B, scales, "spectrum")
    for z in range(3):
        own = spectral_basis(lora_A[z], lora_B[z], scales[z].item(), "spectrum")
        torch.testing.assert_close(batched[z], own)


def test_an_expert_with_a_zero_update_has_no_subspace_and_scores_zero():
    lora_A = torch.randn(4, 20, generator=torch.Generator().manual_seed(3))
    for score in SCORES:
        assert torch.equal(
            spectral_basis(lora_A, torch.zeros(12, 4), 2.0, score), torch.zeros(4, 20)
        )


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_the_router_takes_the_top_k_scores_with_their_weights(weighting):
    gen = torch.Generator().manual_seed(4)
    bases = torch.randn(5, 3, 16, generator=gen)
    bases[0, 2] = 0.0  # a padded lower rank
    tokens = torch.randn(2, 6, 16, generator=gen)
    indices, weights = SpectralRouter(bases, top_k=2, weighting=weighting)(tokens)
    scores = torch.stack([(tokens @ bases[z].T).norm(dim=-1) for z in range(5)], dim=-1)
    expected = scores.topk(2, dim=-1)
    assert torch.equal(indices, expected.indices)
    if weighting == "uniform":
        assert torch.equal(weights, torch.full((2, 6, 2), 0.5))
    else:
        torch.testing.assert_close(weights, torch.softmax(expected.values, dim=-1))


def test_the_router_decides_in_float32_under_bfloat16_autocast():
    gen = torch.Generator().manual_seed(5)
    router = SpectralRouter(torch.randn(6, 4, 32, generator=gen), top_k=2, weighting="softmax")
    tokens = torch.randn(40, 32, generator=gen)
    indices, weights = router(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast_indices, cast_weights = router(tokens)
    assert cast_weights.dtype == torch.float32
    assert torch.equal(cast_indices, indices) and torch.equal(cast_weights, weights)


@pytest.mark.usefixtures("mixture")
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("score", SCORES)
def test_spectr_logits_equal_the_per_token_reference(tiny_model, score, weighting):
    experts, batch = make_experts(tiny_model), batch_for(tiny_model)
    hooks = naive_spectr_hooks(tiny_model, experts, 2, score, weighting)
    expected = logits(tiny_model, batch)
    for hook in hooks:
        hook.remove()
    base = logits(tiny_model, batch)
    assert not torch.allclose(expected, base, atol=1e-3)  # the experts do change the output
    params = {"score": score, "weighting": weighting}
    routed = build_routed_model(tiny_model, experts, "spectr", top_k=2, params=params)
    # rtol: grouped_mm sums in another order (as for the other token routers).
    torch.testing.assert_close(logits(routed, batch), expected, atol=1e-5, rtol=1e-5)


def test_rank_one_spectr_with_softmax_routes_exactly_as_arrow(tiny_model):
    experts, batch = make_experts(tiny_model, ranks=(1,) * 5), batch_for(tiny_model)
    outputs, decisions = {}, {}
    for method, params in (("arrow", None), ("spectr", {"weighting": "softmax"})):
        model = build_routed_model(copy.deepcopy(tiny_model), experts, method, params=params)
        decisions[method], hooks = record_routers(model)
        outputs[method] = logits(model, batch)
        for hook in hooks:
            hook.remove()
    assert decisions["spectr"].keys() == decisions["arrow"].keys() and decisions["arrow"]
    for path, arrow_calls in decisions["arrow"].items():
        for (spectr_i, spectr_w), (arrow_i, arrow_w) in zip(
            decisions["spectr"][path], arrow_calls, strict=True
        ):
            assert torch.equal(spectr_i, arrow_i), path
            torch.testing.assert_close(spectr_w, arrow_w, atol=1e-7, rtol=0)
    torch.testing.assert_close(outputs["spectr"], outputs["arrow"], atol=1e-6, rtol=0)


def test_the_resolved_parameters_are_recorded_with_their_defaults(llama):
    routed = build_routed_model(llama, make_experts(llama), "spectr", params={"score": "spectrum"})
    assert routing_state(routed).params == {"score": "spectrum", "weighting": "uniform"}
    layer = routed.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer.router, SpectralRouter) and layer.router.weighting == "uniform"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"score": "bogus"}, r"parameter 'score' must be one of 'input', 'spectrum', got 'bogus'"),
        ({"weighting": "max"}, r"parameter 'weighting' must be one of 'uniform', 'softmax'"),
        ({"temperature": 2}, r"method 'spectr' has no parameter\(s\) 'temperature'"),
    ],
)
def test_unknown_parameters_and_values_are_refused_clearly(llama, params, message):
    with pytest.raises(ValueError, match=message):
        build_routed_model(llama, make_experts(llama), "spectr", params=params)
    assert not any(isinstance(m, RoutedLinear) for m in llama.modules())


def test_the_router_and_the_rows_refuse_unknown_choices():
    with pytest.raises(ValueError, match=r"SpectR weighting must be one of 'uniform', 'softmax'"):
        SpectralRouter(torch.zeros(3, 2, 8), top_k=1, weighting="max")
    with pytest.raises(ValueError, match=r"SpectR score must be one of 'input', 'spectrum'"):
        spectral_basis(torch.zeros(2, 8), torch.zeros(4, 2), score="output")
    with pytest.raises(ValueError, match=r"top_k must be .* \(3\), got 4"):
        SpectralRouter(torch.zeros(3, 2, 8), top_k=4)

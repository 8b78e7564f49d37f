"""Routed models end to end: every method against a reference computed by hand."""

import copy
import math

import pytest
import torch
from peft import get_peft_model, set_peft_model_state_dict
from torch import nn

from phatgoose.routing import RoutedLinear, build_routed_model, unroute_model
from phatgoose.routing import layer as routing_layer
from phatgoose.routing.rows import top_right_singular_vector
from protocol import TOKEN_METHODS
from tests.phatgoose.experts import random_expert

RANKS = (2, 4, 4, 8, 3)


def make_experts(model, ranks=RANKS, **kwargs):
    return [
        random_expert(
            model, name=f"e{z}", rank=r, seed=10 + z, with_average_activation=True, **kwargs
        )
        for z, r in enumerate(ranks)
    ]


def batch_for(model):
    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(4, 60, (2, 6), generator=gen)}
    if model.config.is_encoder_decoder:
        batch["decoder_input_ids"] = torch.randint(4, 60, (2, 4), generator=gen)
    return batch


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def by_hand_standardise(x):
    """A token: LayerNorm's eps under the square root."""
    centred = x - x.mean()
    return centred / torch.sqrt(centred.pow(2).mean() + 1e-5)


def by_hand_standardise_row(x):
    """A router row (router numerics 2): divided by its own standard deviation only."""
    centred = x.double() - x.double().mean()
    return (centred / centred.pow(2).mean().sqrt()).float()


def naive_selector(method, experts, path, top_k):
    """Per token: (chosen expert indices, weights), computed from the experts directly."""
    if method == "arrow":
        rows = []
        for e in experts:
            a, b, _ = e.lora_update(path)
            rows.append(torch.linalg.svd(b @ a).Vh[0])
        rows = torch.stack(rows)

        def select(token):
            score = (rows @ token).abs()
            chosen = score.argsort(descending=True)[:top_k]
            return chosen, torch.softmax(score[chosen], dim=0)

        return select

    if method == "spectr":  # its defaults: ||V_e^T u|| over the update's rank, 1/k each
        bases = []
        for e in experts:
            a, b, scale = e.lora_update(path)
            bases.append(torch.linalg.svd(scale * (b @ a)).Vh[: a.shape[0]])

        def select(token):
            score = torch.stack([(basis @ token).norm() for basis in bases])
            chosen = score.argsort(descending=True)[:top_k]
            return chosen, torch.full((top_k,), 1 / top_k)

        return select

    vectors = [
        e.gates[path] if method == "phatgoose" else e.average_activations[path] for e in experts
    ]
    rows = torch.stack([by_hand_standardise_row(v) for v in vectors])

    def select(token):
        affinity = rows @ by_hand_standardise(token)
        chosen = affinity.argsort(descending=True)[:top_k]
        return chosen, torch.softmax(affinity[chosen] / math.sqrt(token.shape[0]), dim=0)

    return select


def naive_routing_hooks(model, experts, method, top_k):
    """Forward hooks adding, token by token, the selected experts' weighted updates."""
    modules = dict(model.named_modules())
    hooks = []
    for path in experts[0].module_paths():
        select = naive_selector(method, experts, path, top_k)

        def add_updates(_module, inputs, output, path=path, select=select):
            u = inputs[0].reshape(-1, inputs[0].shape[-1])
            extra = torch.zeros(u.shape[0], output.shape[-1])
            for t, token in enumerate(u):
                chosen, weights = select(token)
                for z, w in zip(chosen.tolist(), weights, strict=True):
                    a, b, scale = experts[z].lora_update(path)
                    extra[t] += w * scale * (b @ (a @ token))
            return output + extra.reshape(output.shape)

        hooks.append(modules[path].register_forward_hook(add_updates))
    return hooks


@pytest.fixture(params=["grouped_mm", "pairs"])
def mixture(request, monkeypatch):
    """Run a test with the grouped_mm mixture (wherever it applies, however few the pairs)
    and with the embedding-bag one."""
    if request.param == "grouped_mm" and not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("this torch has no grouped_mm")
    monkeypatch.setattr(routing_layer, "use_grouped_mm", request.param == "grouped_mm")
    thresholds = dict.fromkeys(routing_layer.GROUPED_MIN_PAIRS, 0)
    monkeypatch.setattr(routing_layer, "GROUPED_MIN_PAIRS", thresholds)
    return request.param


@pytest.mark.usefixtures("mixture")
@pytest.mark.parametrize("method", TOKEN_METHODS)
def test_token_routing_logits_equal_the_per_token_reference(tiny_model, method):
    experts, batch = make_experts(tiny_model), batch_for(tiny_model)
    hooks = naive_routing_hooks(tiny_model, experts, method, top_k=2)
    expected = logits(tiny_model, batch)
    for hook in hooks:
        hook.remove()
    routed = build_routed_model(tiny_model, experts, method, top_k=2)
    # rtol: grouped_mm sums in another order (T5 logits reach ~1, misses ~1.1e-5 absolute).
    torch.testing.assert_close(logits(routed, batch), expected, atol=1e-5, rtol=1e-5)


def test_arrow_rows_are_the_top_right_singular_vectors_of_b_a():
    gen = torch.Generator().manual_seed(3)
    lora_A, lora_B = torch.randn(4, 20, generator=gen), torch.randn(16, 4, generator=gen)
    expected = torch.linalg.svd(lora_B @ lora_A).Vh[0]
    row = top_right_singular_vector(lora_A, lora_B)
    assert torch.allclose(row, expected, atol=1e-5) or torch.allclose(row, -expected, atol=1e-5)


@pytest.mark.usefixtures("mixture")
def test_merged_equals_the_base_with_the_mean_update_added_to_its_weights(tiny_model):
    experts, batch = make_experts(tiny_model, ranks=(4, 4, 4)), batch_for(tiny_model)
    merged_by_hand = copy.deepcopy(tiny_model)
    modules = dict(merged_by_hand.named_modules())
    with torch.no_grad():
        for path in experts[0].module_paths():
            updates = [e.lora_update(path) for e in experts]
            modules[path].weight += sum(s * b @ a for a, b, s in updates) / len(updates)
    routed = build_routed_model(tiny_model, experts, "merged")
    torch.testing.assert_close(
        logits(routed, batch), logits(merged_by_hand, batch), atol=1e-5, rtol=0
    )


def test_merged_update_has_rank_above_the_experts_rank(llama):
    experts = make_experts(llama, ranks=(2, 2, 2))
    routed = build_routed_model(llama, experts, "merged")
    layer = routed.get_submodule("model.layers.0.self_attn.q_proj")
    assert torch.linalg.matrix_rank(layer.lora_B[0] @ layer.lora_A[0]) == 6


def test_merged_refuses_experts_of_different_shapes_naming_them(llama):
    experts = make_experts(llama, ranks=(2, 4))
    with pytest.raises(
        ValueError,
        match=r"at model.layers.0.\w+.\w+ the experts' \(A, B\) shapes differ: \{'e0'.*'e1'",
    ):
        build_routed_model(llama, experts, "merged")


def test_merged_refuses_experts_adapting_different_modules(llama):
    experts = [
        random_expert(llama, name="attn", rank=2, seed=1, target_modules=["q_proj"]),
        random_expert(llama, name="mlp", rank=2, seed=2, target_modules=["up_proj"]),
    ]
    with pytest.raises(ValueError, match="'attn' and 'mlp' adapt different modules"):
        build_routed_model(llama, experts, "merged")


@pytest.mark.usefixtures("mixture")
def test_single_equals_peft_lora_forward_of_that_expert(tiny_model):
    experts, batch = make_experts(tiny_model), batch_for(tiny_model)
    peft_model = get_peft_model(copy.deepcopy(tiny_model), experts[3].lora_config)
    set_peft_model_state_dict(peft_model, experts[3].lora_weights)
    expected = logits(peft_model, batch)
    assert not torch.allclose(expected, logits(tiny_model, batch), atol=1e-3)
    routed = build_routed_model(tiny_model, experts, "single", expert="e3")
    torch.testing.assert_close(logits(routed, batch), expected, atol=1e-5, rtol=0)


def test_base_method_leaves_the_model_untouched(llama):
    batch, linears = batch_for(llama), [m for m in llama.modules() if isinstance(m, nn.Linear)]
    before = logits(llama, batch)
    routed = build_routed_model(llama, make_experts(llama), "base")
    assert routed is llama
    assert [m for m in routed.modules() if isinstance(m, nn.Linear)] == linears
    torch.testing.assert_close(logits(routed, batch), before, atol=0, rtol=0)


def test_routing_shares_the_base_weights_instead_of_copying_them(llama):
    weight = llama.get_submodule("model.layers.1.mlp.down_proj").weight
    routed = build_routed_model(llama, make_experts(llama), "phatgoose")
    layer = routed.get_submodule("model.layers.1.mlp.down_proj")
    assert isinstance(layer, RoutedLinear) and layer.base_layer.weight is weight


def test_unroute_restores_the_exact_base_outputs(tiny_model):
    batch = batch_for(tiny_model)
    before = logits(tiny_model, batch)
    routed = build_routed_model(tiny_model, make_experts(tiny_model), "arrow")
    assert not torch.allclose(logits(routed, batch), before, atol=1e-3)
    restored = unroute_model(routed)
    assert not any(isinstance(m, RoutedLinear) for m in restored.modules())
    torch.testing.assert_close(logits(restored, batch), before, atol=0, rtol=0)


def test_routing_a_routed_model_again_is_refused(llama):
    experts = make_experts(llama)
    build_routed_model(llama, experts, "phatgoose")
    with pytest.raises(RuntimeError, match=r"already routed .*unroute_model"):
        build_routed_model(llama, experts, "arrow")


@pytest.mark.usefixtures("mixture")
def test_generate_runs_on_a_routed_model(tiny_model, tokenizer):
    routed = build_routed_model(tiny_model, make_experts(tiny_model), "phatgoose")
    inputs = tokenizer(["abc", "hello"], return_tensors="pt", padding=True)
    out = routed.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[0] == 2 and out.shape[1] >= 4


@pytest.mark.usefixtures("mixture")
@pytest.mark.parametrize(("method", "top_k"), [("phatgoose", 1), ("spectr", 2)])
def test_unselected_experts_do_not_affect_the_output(llama, method, top_k):
    from phatgoose.routing import capture_routing

    batch = {"input_ids": torch.tensor([[5, 9]])}
    routed = build_routed_model(llama, make_experts(llama), method, top_k=top_k)
    with capture_routing(routed) as stats:
        before = logits(routed, batch)
    poisoned = 0
    for layer in routed.modules():
        if isinstance(layer, RoutedLinear):
            unused = stats.counts[layer.path] == 0
            layer.lora_A[unused] = float("nan")
            layer.lora_B[unused] = float("nan")
            poisoned += int(unused.sum())
    assert poisoned > 0
    torch.testing.assert_close(logits(routed, batch), before, atol=0, rtol=0)


def test_unknown_method_is_refused_with_the_choices(llama):
    with pytest.raises(ValueError, match=r"unknown routing method 'moe'.*'phatgoose'"):
        build_routed_model(llama, make_experts(llama), "moe")


def test_single_needs_the_name_of_one_of_the_experts(llama):
    with pytest.raises(ValueError, match=r"expert= one of \['e0', 'e1'"):
        build_routed_model(llama, make_experts(llama), "single", expert="nobody")


def test_average_activation_refuses_experts_without_activations(llama):
    experts = [e.with_average_activations(None) for e in make_experts(llama)]
    with pytest.raises(ValueError, match=r"experts \['e0', 'e1', 'e2', 'e3', 'e4'\] have none"):
        build_routed_model(llama, experts, "average_activation")


def test_an_expert_for_another_model_is_refused(llama):
    wider = random_expert(
        type(llama)(llama.config.__class__(**{**llama.config.to_dict(), "hidden_size": 64})),
        name="wide",
        rank=2,
        seed=0,
    )
    with pytest.raises(
        ValueError, match=r"expert 'wide' at model.layers.0.mlp.down_proj: update B \[64, 2\]"
    ):
        build_routed_model(llama, [wider], "phatgoose", top_k=1)


def test_top_k_above_the_number_of_experts_is_refused_naming_the_module(llama):
    with pytest.raises(ValueError, match=r"down_proj: top_k must be .* \(2\), got 3"):
        build_routed_model(llama, make_experts(llama, ranks=(2, 2)), "phatgoose", top_k=3)


def test_a_routed_model_cast_to_bfloat16_still_routes(llama):
    routed = build_routed_model(llama, make_experts(llama), "phatgoose").to(torch.bfloat16)
    assert torch.isfinite(logits(routed, batch_for(routed)).float()).all()


def test_a_refused_build_leaves_the_model_unrouted(llama):
    with pytest.raises(ValueError, match="top_k must be"):
        build_routed_model(llama, make_experts(llama, ranks=(2, 2)), "phatgoose", top_k=3)
    assert not any(isinstance(m, RoutedLinear) for m in llama.modules())


def test_top_k_of_every_expert_is_the_per_token_soft_merge(tiny_model):
    """top_k = N takes the all-experts path (two dense matmuls): per token, every expert
    weighed by that token's own softmax, as the per-token reference computes it."""
    experts, batch = make_experts(tiny_model), batch_for(tiny_model)
    hooks = naive_routing_hooks(tiny_model, experts, "phatgoose", top_k=len(experts))
    expected = logits(tiny_model, batch)
    for hook in hooks:
        hook.remove()
    routed = build_routed_model(tiny_model, experts, "phatgoose", top_k=len(experts))
    torch.testing.assert_close(logits(routed, batch), expected, atol=1e-5, rtol=1e-5)

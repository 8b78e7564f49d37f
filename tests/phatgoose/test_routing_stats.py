"""Routing statistics: which experts each module chose, counted per token and slot."""

import json

import torch

from phatgoose.routing import RoutedLinear, build_routed_model, capture_routing
from tests.phatgoose.experts import random_expert


def experts_for(model, count=4):
    return [random_expert(model, name=f"e{z}", rank=2, seed=z) for z in range(count)]


def padded_batch(tokenizer):
    # 5 + 2 = 7 real tokens; the second row has 3 padding positions.
    return dict(tokenizer(["hello", "hi"], return_tensors="pt", padding=True))


def test_counts_at_every_module_sum_to_real_tokens_times_k(llama, tokenizer):
    routed = build_routed_model(llama, experts_for(llama), "phatgoose", top_k=2)
    with torch.no_grad(), capture_routing(routed) as stats:
        routed(**padded_batch(tokenizer))
    assert len(stats.counts) == 14  # 7 linears in each of 2 layers
    assert {int(c.sum()) for c in stats.counts.values()} == {7 * 2}


def test_counts_equal_the_routers_own_top_k_choices(llama, tokenizer):
    routed = build_routed_model(llama, experts_for(llama), "arrow", top_k=2)
    layer = routed.get_submodule("model.layers.1.self_attn.v_proj")
    inputs = []
    hook = layer.register_forward_hook(lambda _m, args, _out: inputs.append(args[0]))
    batch = {"input_ids": torch.tensor([[5, 9, 11, 40]])}
    with torch.no_grad(), capture_routing(routed) as stats:
        routed(**batch)
    hook.remove()
    chosen, _ = layer.router(inputs[0])
    expected = torch.bincount(chosen.flatten(), minlength=4)
    assert stats.counts["model.layers.1.self_attn.v_proj"].tolist() == expected.tolist()


def test_encoder_counts_skip_padding_and_decoder_counts_every_token(t5, tokenizer):
    routed = build_routed_model(t5, experts_for(t5), "phatgoose", top_k=1)
    batch = padded_batch(tokenizer) | {"decoder_input_ids": torch.zeros(2, 3, dtype=torch.long)}
    with torch.no_grad(), capture_routing(routed) as stats:
        routed(**batch)
    assert int(stats.counts["encoder.block.0.layer.0.SelfAttention.q"].sum()) == 7
    assert int(stats.counts["decoder.block.1.layer.0.SelfAttention.q"].sum()) == 2 * 3


def test_frequencies_and_per_layer_give_shares_for_a_heatmap(llama, tokenizer):
    routed = build_routed_model(llama, experts_for(llama), "phatgoose", top_k=2)
    with torch.no_grad(), capture_routing(routed) as stats:
        routed(**padded_batch(tokenizer))
    path = "model.layers.0.mlp.up_proj"
    torch.testing.assert_close(stats.frequencies(path), stats.counts[path].double() / 14)
    labels, heatmap = stats.per_layer()
    assert labels == ["model.layers.0", "model.layers.1"]
    assert heatmap.shape == (4, 2)
    torch.testing.assert_close(heatmap.sum(dim=0), torch.ones(2, dtype=torch.float64))
    layer0 = sum(c for p, c in stats.counts.items() if p.startswith("model.layers.0."))
    torch.testing.assert_close(heatmap[:, 0], layer0.double() / layer0.sum())


def test_to_dict_is_json_with_expert_names_and_counts(llama, tokenizer):
    routed = build_routed_model(llama, experts_for(llama), "phatgoose", top_k=2)
    with torch.no_grad(), capture_routing(routed) as stats:
        routed(**padded_batch(tokenizer))
    data = json.loads(json.dumps(stats.to_dict()))
    assert data["experts"] == ["e0", "e1", "e2", "e3"] and data["top_k"] == 2
    assert sum(data["counts"]["model.layers.1.mlp.down_proj"]) == 14


def test_single_counts_one_selection_per_query_row(llama, tokenizer):
    routed = build_routed_model(llama, experts_for(llama), "single", expert="e2")
    with torch.no_grad(), capture_routing(routed) as stats:
        routed(**padded_batch(tokenizer))
    assert stats.counts["model.layers.0.self_attn.q_proj"].tolist() == [0, 0, 2, 0]


def test_merged_layers_choose_nothing_and_are_not_counted(llama, tokenizer):
    routed = build_routed_model(llama, experts_for(llama), "merged")
    with torch.no_grad(), capture_routing(routed) as stats:
        routed(**padded_batch(tokenizer))
    assert stats.counts == {}


def test_observers_are_removed_when_the_block_ends(llama, tokenizer):
    routed = build_routed_model(llama, experts_for(llama), "phatgoose")
    with capture_routing(routed):
        pass
    assert all(not m.observers for m in routed.modules() if isinstance(m, RoutedLinear))

"""Prompt-level routing (per-example PHATGOOSE, SMEAR-style merging) against references
computed by hand: one decision per example and module, made on the prompt, kept for the
answer's tokens, the cache's continuation and `generate`."""

import math

import pytest
import torch

from phatgoose.evaluation import score_choices
from phatgoose.models import cache_keyword, returned_cache
from phatgoose.routing import (
    build_routed_model,
    capture_routing,
    reorder_routing,
    unroute_model,
)
from protocol import PROMPT_METHODS, TOP_K_METHODS, method_spec
from tests.phatgoose.experts import random_expert
from tests.phatgoose.test_routing_model import by_hand_standardise, by_hand_standardise_row

RANKS = (2, 4, 4, 8, 3)


def make_experts(model, ranks=RANKS):
    return [random_expert(model, name=f"e{z}", rank=r, seed=40 + z) for z, r in enumerate(ranks)]


def padded_prompts(model):
    """Two prompts of different lengths, left-padded (causal) or right-padded (T5)."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(4, 60, (2, 7), generator=gen)
    mask = torch.ones(2, 7, dtype=torch.long)
    if model.config.is_encoder_decoder:
        mask[1, 5:] = 0
    else:
        mask[1, :2] = 0
    ids[mask == 0] = 0
    return ids, mask


def naive_decision(method, experts, path, tokens, top_k):
    """(expert indices, weights) from one example's prompt tokens `[t, n]`, by hand."""
    rows = torch.stack([by_hand_standardise_row(e.gates[path]) for e in experts])
    affinity = torch.stack([rows @ by_hand_standardise(t) for t in tokens]).mean(0)
    scale = math.sqrt(tokens.shape[-1])
    if method == "smear":
        return torch.arange(len(experts)), torch.softmax(affinity / scale, dim=0)
    chosen = affinity.argsort(descending=True)[:top_k]
    return chosen, torch.softmax(affinity[chosen] / scale, dim=0)


class NaivePromptRouting:
    """Forward hooks adding each example's update by hand: decided on a module's first call
    after `start()`, from the prompt's tokens (the mask's, the decoder's start token, or
    the encoder's states for cross-attention keys and values), kept after that. SMEAR's
    update is the merged `d x n` matrix itself, `sum_e w_e s_e B_e A_e`."""

    def __init__(self, model, experts, method, top_k):
        self.experts, self.method, self.top_k = experts, method, top_k
        self.mask = None
        self.decided = {}
        modules = dict(model.named_modules())
        self.hooks = [
            modules[path].register_forward_hook(self.hook(path, modules[path]))
            for path in experts[0].module_paths()
        ]

    def start(self, mask):
        self.mask, self.decided = mask, {}

    def prompt_tokens(self, path, u, b):
        cross = ".EncDecAttention.k" in path or ".EncDecAttention.v" in path
        if path.startswith("decoder.") and not cross:
            return u[b, :1]  # a decoder module: its start token
        return u[b][self.mask[b].bool()]

    def hook(self, path, linear):
        def add(_module, inputs, output):
            u = inputs[0]
            if path not in self.decided:
                merged = []
                for b in range(u.shape[0]):
                    chosen, weights = naive_decision(
                        self.method, self.experts, path, self.prompt_tokens(path, u, b), self.top_k
                    )
                    update = torch.zeros(linear.out_features, linear.in_features)
                    for z, w in zip(chosen.tolist(), weights, strict=True):
                        a, bb, scale = self.experts[z].lora_update(path)
                        update += w * scale * (bb @ a)
                    merged.append(update)
                self.decided[path] = merged
            extra = torch.stack(
                [u[b] @ self.decided[path][b].T for b in range(u.shape[0])]
            )  # fmt: skip
            return output + extra

        return add

    def remove(self):
        for hook in self.hooks:
            hook.remove()


def forward(model, ids, mask, **kwargs):
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            start = torch.zeros(ids.shape[0], 3, dtype=torch.long)
            start[:, 1:] = torch.tensor([[7, 9], [11, 13]])
            return model(input_ids=ids, attention_mask=mask, decoder_input_ids=start, **kwargs)
        return model(input_ids=ids, attention_mask=mask, **kwargs)


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_prompt_routing_equals_the_by_hand_reference(tiny_model, method):
    experts = make_experts(tiny_model)
    ids, mask = padded_prompts(tiny_model)
    naive = NaivePromptRouting(tiny_model, experts, method, top_k=2)
    naive.start(mask)
    expected = forward(tiny_model, ids, mask).logits
    naive.remove()
    routed = build_routed_model(tiny_model, experts, method, top_k=2)
    # The padding of row 1 is never part of its prompt, so its logits there are irrelevant.
    keep = mask.bool() if not tiny_model.config.is_encoder_decoder else slice(None)
    torch.testing.assert_close(
        forward(routed, ids, mask).logits[keep], expected[keep], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_a_causal_continuation_keeps_the_prompt_decision(llama, method):
    experts = make_experts(llama)
    ids, mask = padded_prompts(llama)
    answer = torch.tensor([[21, 22, 23], [31, 32, 33]])
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], dim=1)
    naive = NaivePromptRouting(llama, experts, method, top_k=2)
    naive.start(mask)
    with torch.no_grad():
        first = llama(input_ids=ids, attention_mask=mask, use_cache=True)
        expected = llama(
            input_ids=answer,
            attention_mask=full_mask,
            **{cache_keyword(llama): returned_cache(first)},
        ).logits
    naive.remove()
    routed = build_routed_model(llama, experts, method, top_k=2)
    with torch.no_grad():
        first = routed(input_ids=ids, attention_mask=mask, use_cache=True)
        got = routed(
            input_ids=answer,
            attention_mask=full_mask,
            **{cache_keyword(llama): returned_cache(first)},
        ).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_scores_do_not_depend_on_the_batch_an_example_is_scored_in(tiny_model, tokenizer, method):
    """Shared-prompt scoring reorders the cache per choice: the decisions follow the rows."""
    from phatgoose.data import Example

    examples = [
        Example(prompt="the cat sat on the", choices=["mat", "dog and the sun"], answer=0),
        Example(prompt="one two", choices=["three", "four five", "six"], answer=0),
        Example(prompt="a b c d e f g", choices=["h i", "j"], answer=1),
    ]
    routed = build_routed_model(tiny_model, make_experts(tiny_model), method, top_k=2)
    together = score_choices(routed, tokenizer, examples, batch_size=16, progress=False)
    alone = [score_choices(routed, tokenizer, [ex], progress=False)[0] for ex in examples]
    for got, expected in zip(together, alone, strict=True):
        assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_generate_routes_every_new_token_by_the_prompt(tiny_model, method):
    experts = make_experts(tiny_model)
    ids, mask = padded_prompts(tiny_model)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    naive = NaivePromptRouting(tiny_model, experts, method, top_k=2)
    naive.start(mask)
    with torch.no_grad():
        expected = tiny_model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    naive.remove()
    routed = build_routed_model(tiny_model, experts, method, top_k=2)
    with torch.no_grad():
        got = routed.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(got, expected)


def test_per_example_top_n_is_smear(tiny_model):
    experts = make_experts(tiny_model)
    ids, mask = padded_prompts(tiny_model)
    smear = forward(build_routed_model(tiny_model, experts, "smear"), ids, mask).logits
    unroute_model(tiny_model)
    every = build_routed_model(tiny_model, experts, "phatgoose_example", top_k=len(experts))
    torch.testing.assert_close(forward(every, ids, mask).logits, smear, atol=1e-5, rtol=1e-5)


def test_smear_merges_updates_not_factors(llama):
    """One merged update per example, `sum_e w_e s_e B_e A_e`: averaging A and B separately
    is another model (independently trained factors are not aligned)."""
    experts = make_experts(llama, ranks=(4, 4, 4, 4, 4))
    path = "model.layers.0.mlp.up_proj"
    routed = build_routed_model(llama, experts, "smear")
    layer = routed.get_submodule(path)
    u = torch.randn(1, 6, layer.in_features, generator=torch.Generator().manual_seed(1))
    routed._phatgoose_routing.prompt.begin(None)
    with torch.no_grad():
        update = layer(u) - layer.base_layer(u)
    _, chosen, weights = routed._phatgoose_routing.prompt.kept[path]
    w = torch.zeros(len(experts)).scatter(0, chosen[0, 0], weights[0, 0])
    factors = [e.lora_update(path) for e in experts]
    products = sum(w[z] * s * b @ a for z, (a, b, s) in enumerate(factors))
    averaged = sum(w[z] * s * b for z, (_, b, s) in enumerate(factors)) @ sum(
        w[z] * a for z, (a, _, _) in enumerate(factors)
    )
    torch.testing.assert_close(update, u @ products.T, atol=1e-5, rtol=1e-5)
    assert (u @ averaged.T - update).norm() > 0.5 * update.norm()


def test_per_example_routing_counts_once_per_row_and_smear_its_heaviest_expert(llama):
    experts = make_experts(llama)
    ids, mask = padded_prompts(llama)
    routed = build_routed_model(llama, experts, "phatgoose_example", top_k=2)
    with capture_routing(routed) as stats:
        forward(routed, ids, mask)
    path = "model.layers.0.self_attn.q_proj"
    assert stats.counts[path].sum() == 2 * 2  # rows x k, whatever the prompt's length
    unroute_model(routed)
    routed = build_routed_model(llama, experts, "smear")
    with capture_routing(routed) as stats:
        forward(routed, ids, mask)
    assert stats.counts[path].sum() == 2  # one per row: the expert weighed most


def test_a_reordered_batch_without_reorder_routing_is_a_clear_error(llama):
    routed = build_routed_model(llama, make_experts(llama), "phatgoose_example", top_k=2)
    ids, mask = padded_prompts(llama)
    with torch.no_grad():
        first = routed(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = returned_cache(first)
        cache.reorder_cache(torch.tensor([0, 1, 1]))
        grown = torch.cat([mask[[0, 1, 1]], torch.ones(3, 1, dtype=torch.long)], 1)
        more = {"attention_mask": grown, cache_keyword(routed): cache}
        with pytest.raises(ValueError, match="reorder_routing"):
            routed(input_ids=torch.tensor([[5], [6], [7]]), **more)
        reorder_routing(routed, torch.tensor([0, 1, 1]))
        routed(input_ids=torch.tensor([[5], [6], [7]]), **more)


def test_prompt_methods_take_the_gates_and_only_per_example_takes_top_k():
    assert PROMPT_METHODS == ("phatgoose_example", "smear")
    assert "phatgoose_example" in TOP_K_METHODS and "smear" not in TOP_K_METHODS
    for method in PROMPT_METHODS:
        assert [v.name for v in method_spec(method).needs] == ["gate"]
        assert not method_spec(method).per_token


def test_top_k_of_every_expert_still_counts_every_selection(llama):
    """Only the merge counts its heaviest expert: a router selecting all N counts all N."""
    experts = make_experts(llama, ranks=(2, 4))
    ids, mask = padded_prompts(llama)
    path = "model.layers.0.self_attn.q_proj"
    for method in ("phatgoose", "phatgoose_example"):
        routed = build_routed_model(llama, experts, method, top_k=2)
        with capture_routing(routed) as stats:
            forward(routed, ids, mask)
        assert stats.frequencies(path).tolist() == [0.5, 0.5], method
        unroute_model(routed)

"""Retrieval: the whole query goes to the owner of its most similar example."""

import copy

import pytest
import torch

from phatgoose.routing import build_routed_model, queries, routing_state, unroute_model
from tests.phatgoose.experts import random_expert

# Example embeddings by owner; the embedder below maps a text to its (a, b, c) counts.
BANKS = {
    "e0": [[1.0, 0.0, 0.0], [0.9, 0.1, 0.0]],
    "e1": [[0.0, 1.0, 0.0]],
    "e2": [[0.0, 0.0, 1.0], [0.1, 0.0, 0.95]],
}
TEXTS = ["ccca", "aab!", "bbbb"]  # nearest examples owned by e2, e0, e1
OWNERS = ["e2", "e0", "e1"]


def letter_counts(texts):
    return torch.tensor([[float(t.count(c)) for c in "abc"] for t in texts])


def retrieval_experts(model):
    return [
        random_expert(model, name=name, rank=2 + z, seed=z).with_retrieval_embeddings(
            torch.tensor(bank)
        )
        for z, (name, bank) in enumerate(BANKS.items())
    ]


def batch_for(model, tokenizer, texts=TEXTS):
    batch = dict(tokenizer(texts, return_tensors="pt", padding=True))
    if model.config.is_encoder_decoder:
        batch["decoder_input_ids"] = torch.tensor([[0, 7, 8]] * len(texts))
    return batch


def single_expert_logits(base, experts, name, batch):
    model = build_routed_model(copy.deepcopy(base), experts, "single", expert=name)
    with torch.no_grad():
        return model(**batch).logits


def test_each_query_goes_whole_to_the_owner_of_its_nearest_example(tiny_model, tokenizer):
    experts, batch = retrieval_experts(tiny_model), batch_for(tiny_model, tokenizer)
    expected = [single_expert_logits(tiny_model, experts, name, batch) for name in OWNERS]
    routed = build_routed_model(tiny_model, experts, "retrieval", embedder=letter_counts)
    with torch.no_grad(), queries(routed, TEXTS):
        got = routed(**batch).logits
    for row in range(len(TEXTS)):
        torch.testing.assert_close(got[row], expected[row][row], atol=1e-5, rtol=0)


def test_without_queries_the_input_ids_are_decoded_without_padding(tiny_model, tokenizer):
    texts = ["ccca", "b"]  # the second row is padded; "<pad>" must not reach the embedder
    seen = []

    def embedder(batch_texts):
        seen.extend(batch_texts)
        return letter_counts(batch_texts)

    routed = build_routed_model(
        tiny_model,
        retrieval_experts(tiny_model),
        "retrieval",
        embedder=embedder,
        tokenizer=tokenizer,
    )
    with torch.no_grad():
        routed(**batch_for(tiny_model, tokenizer, texts))
    assert seen == texts
    assert routing_state(routed).retrieval.current.tolist() == [2, 1]


def test_generate_keeps_each_rows_expert_while_decoding(tiny_model, tokenizer):
    experts = retrieval_experts(tiny_model)
    inputs = tokenizer(TEXTS, return_tensors="pt")
    settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    expected = []
    for row, name in enumerate(OWNERS):
        single = build_routed_model(copy.deepcopy(tiny_model), experts, "single", expert=name)
        expected.append(single.generate(**inputs, **settings)[row])
    routed = build_routed_model(
        tiny_model, experts, "retrieval", embedder=letter_counts, tokenizer=tokenizer
    )
    generated = routed.generate(**inputs, **settings)
    assert [g.tolist() for g in generated] == [e.tolist() for e in expected]


def test_queries_is_a_no_op_for_other_routers(llama, tokenizer):
    routed = build_routed_model(llama, retrieval_experts(llama), "phatgoose", top_k=1)
    batch = batch_for(llama, tokenizer)
    with torch.no_grad():
        plain = routed(**batch).logits
        with queries(routed, TEXTS):
            wrapped = routed(**batch).logits
    torch.testing.assert_close(wrapped, plain, atol=0, rtol=0)


def test_retrieval_without_texts_or_tokenizer_says_what_it_needs(llama, tokenizer):
    routed = build_routed_model(
        llama, retrieval_experts(llama), "retrieval", embedder=letter_counts
    )
    with pytest.raises(RuntimeError, match=r"needs the query text: wrap the forward in"):
        routed(**batch_for(llama, tokenizer))


def test_retrieval_refuses_experts_without_embeddings(llama):
    experts = retrieval_experts(llama)
    experts[1] = experts[1].with_retrieval_embeddings(None)
    with pytest.raises(ValueError, match=r"experts \['e1'\] shipped none"):
        build_routed_model(llama, experts, "retrieval", embedder=letter_counts)


def test_unroute_drops_the_retrieval_hook(llama, tokenizer):
    batch = batch_for(llama, tokenizer)
    with torch.no_grad():
        before = llama(**batch).logits
        routed = build_routed_model(
            llama, retrieval_experts(llama), "retrieval", embedder=letter_counts
        )
        base = unroute_model(routed)
        after = base(**batch).logits  # no query text needed any more
    torch.testing.assert_close(after, before, atol=0, rtol=0)

"""Runs the real MiniLM (shipped in a PyPI package, loads offline in a few seconds)."""

import pytest
import torch

from phatgoose.embeddings import EMBEDDING_DIM, embed_texts

SENTENCES = [
    "A cat is sitting on the mat.",
    "A kitten sits on a rug.",
    "Stock markets fell sharply after the announcement.",
]


@pytest.fixture(scope="module")
def embeddings() -> torch.Tensor:
    return embed_texts(SENTENCES)


def test_embeddings_have_one_384_dim_float32_row_per_text(embeddings):
    assert embeddings.shape == (3, EMBEDDING_DIM)
    assert embeddings.dtype == torch.float32


def test_embeddings_have_unit_norm(embeddings):
    assert embeddings.norm(dim=1) == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)


def test_paraphrases_are_closer_than_unrelated_sentences(embeddings):
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > 0.5
    assert similarity[0, 2] < 0.2
    assert similarity[1, 2] < 0.2


def test_embeddings_do_not_depend_on_batching(embeddings):
    one_by_one = torch.cat([embed_texts([s]) for s in SENTENCES])
    assert torch.allclose(one_by_one, embeddings, atol=1e-5)


def test_no_texts_give_an_empty_matrix():
    assert embed_texts([]).shape == (0, EMBEDDING_DIM)


def test_a_single_string_is_refused():
    with pytest.raises(TypeError, match="list of strings"):
        embed_texts("one sentence")

"""Runs the real MiniLM (shipped in a PyPI package, loads offline in a few seconds)."""

import pytest
import torch

from phatgoose.data import Example
from phatgoose.embeddings import EMBEDDING_DIM, embed_texts, embed_training_inputs

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


# --------------------------------------------- the retrieval baseline's contributor vectors
TRAINING = [Example(prompt=f"prompt {i}", target="t") for i in range(12)]


def axis_embedder(texts: list[str]) -> torch.Tensor:
    """Not normalised on purpose: `embed_training_inputs` must normalise."""
    return torch.tensor([[float(t.split()[1]) + 1.0, 3.0] for t in texts], dtype=torch.float64)


def test_training_inputs_are_a_seeded_sample_of_the_prompts_embedded_with_unit_norm():
    embeddings = embed_training_inputs(TRAINING, embedder=axis_embedder, max_examples=5, seed=1)
    again = embed_training_inputs(TRAINING, embedder=axis_embedder, max_examples=5, seed=1)
    other_seed = embed_training_inputs(TRAINING, embedder=axis_embedder, max_examples=5, seed=2)

    assert embeddings.shape == (5, 2) and embeddings.dtype == torch.float32
    assert embeddings.norm(dim=1) == pytest.approx([1.0] * 5, abs=1e-6)
    assert torch.equal(embeddings, again)
    assert not torch.equal(embeddings, other_seed)
    assert len({round(float(x), 6) for x in embeddings[:, 0]}) == 5  # five distinct prompts


def test_every_training_input_is_embedded_when_there_are_few():
    embeddings = embed_training_inputs(TRAINING[:3], embedder=axis_embedder, max_examples=5)
    expected = torch.nn.functional.normalize(axis_embedder(["prompt 0", "prompt 1", "prompt 2"]))
    assert torch.allclose(embeddings, expected.float())


def test_training_inputs_use_minilm_by_default(embeddings):
    examples = [Example(prompt=s, target="x") for s in SENTENCES]
    assert torch.allclose(embed_training_inputs(examples), embeddings, atol=1e-5)


def test_no_training_inputs_are_refused():
    with pytest.raises(ValueError, match="at least one training example"):
        embed_training_inputs([], embedder=axis_embedder)

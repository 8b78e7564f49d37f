"""The contributor pipeline (`phatgoose.pipeline`) on the tiny llama: LoRA, gates, vectors."""

import pytest
import torch

import phatgoose.embeddings
from phatgoose.data import Example
from phatgoose.expert import Expert
from phatgoose.pipeline import add_gates_and_vectors, train_contributor_expert
from phatgoose.training import TrainingConfig, compute_average_activations, expert_from_peft
from tests.phatgoose.experts import random_expert
from tests.tiny import tiny_llama, tiny_tokenizer

EXAMPLES = [Example(prompt=f"{c}{d} ->", target=f"{c}{c}".upper()) for c in "abcd" for d in "abc"]
CONFIG = TrainingConfig(
    r=2, lora_alpha=4, steps=3, batch_size=4, learning_rate=2e-2, max_length=24, gate_steps=2
)
MAX_VECTOR_EXAMPLES = 5


class RecordingEmbedder:
    """A cheap stand-in for MiniLM that remembers every text it embedded."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.texts.extend(texts)
        return torch.tensor([[len(t) + 1.0, t.count("a") + 1.0, 2.0] for t in texts])


@pytest.fixture(autouse=True)
def no_minilm(monkeypatch):
    """The pipeline must use the injected embedder: MiniLM is not even reachable."""

    def refuse(texts: list[str]) -> torch.Tensor:
        raise AssertionError("MiniLM was used although an embedder was given")

    monkeypatch.setattr(phatgoose.embeddings, "embed_texts", refuse)


def run(*, average_activation: bool, retrieval: bool, **kwargs) -> tuple[Expert, torch.nn.Module]:
    model = tiny_llama()
    expert = train_contributor_expert(
        model,
        tiny_tokenizer(),
        EXAMPLES,
        name="pipeline-test",
        config=CONFIG,
        average_activation=average_activation,
        retrieval=retrieval,
        max_vector_examples=MAX_VECTOR_EXAMPLES,
        progress=False,
        **kwargs,
    )
    return expert, model


def test_the_expert_has_a_trained_gate_for_every_adapted_module():
    expert, _ = run(average_activation=False, retrieval=False)

    assert len(expert.module_paths()) == 14  # 2 layers x 7 linears
    assert set(expert.gates) == set(expert.module_paths())
    assert all(gate.abs().max() > 0 for gate in expert.gates.values())  # moved from zero
    assert expert.manifest.training.steps == CONFIG.steps
    assert expert.manifest.training.gate_steps == CONFIG.gate_steps


def test_no_baseline_vectors_unless_asked_for():
    expert, _ = run(average_activation=False, retrieval=False)

    assert expert.average_activations is None
    assert expert.retrieval_embeddings is None
    assert not expert.manifest.has_average_activation
    assert not expert.manifest.has_retrieval_embeddings


def test_average_activations_are_the_base_models_mean_inputs_over_the_sampled_examples():
    expert, model = run(average_activation=True, retrieval=False)

    expected = compute_average_activations(
        model,
        tiny_tokenizer(),
        expert.module_paths(),
        EXAMPLES,
        max_examples=MAX_VECTOR_EXAMPLES,
        max_length=CONFIG.max_length,
        batch_size=CONFIG.batch_size,
        seed=CONFIG.seed,
    )
    assert expert.manifest.has_average_activation
    assert expert.retrieval_embeddings is None
    assert expert.average_activations is not None
    assert expert.average_activations.keys() == expected.keys()
    for path, activation in expected.items():
        assert torch.allclose(expert.average_activations[path], activation, atol=1e-6)


def test_retrieval_embeddings_come_from_the_injected_embedder():
    embedder = RecordingEmbedder()
    expert, _ = run(average_activation=False, retrieval=True, embedder=embedder)

    prompts = {ex.prompt for ex in EXAMPLES}
    assert len(embedder.texts) == MAX_VECTOR_EXAMPLES
    assert len(set(embedder.texts)) == MAX_VECTOR_EXAMPLES and set(embedder.texts) <= prompts
    assert expert.manifest.has_retrieval_embeddings
    assert expert.average_activations is None
    expected = torch.nn.functional.normalize(RecordingEmbedder()(embedder.texts), dim=-1)
    assert expert.retrieval_embeddings is not None
    assert torch.allclose(expert.retrieval_embeddings, expected)


def test_the_contributor_is_told_each_step_and_warned_about_retrieval_privacy():
    said: list[str] = []
    run(average_activation=True, retrieval=True, embedder=RecordingEmbedder(), say=said.append)

    expected = [
        "LoRA trained: 3 steps, final loss ",
        "gates trained: 2 steps, final loss ",
        f"average activations computed over {MAX_VECTOR_EXAMPLES} examples",
        "warning: retrieval embeddings are sentence embeddings of your private training inputs",
        f"retrieval embeddings computed for {MAX_VECTOR_EXAMPLES} inputs",
    ]
    assert len(said) == len(expected)
    assert all(line.startswith(start) for line, start in zip(said, expected, strict=True))


def test_timings_receive_the_seconds_of_each_step():
    timings: dict[str, float] = {}
    run(average_activation=True, retrieval=True, embedder=RecordingEmbedder(), timings=timings)

    assert list(timings) == ["lora_seconds", "gate_seconds", "vector_seconds"]
    assert all(seconds > 0 for seconds in timings.values())


def test_an_imported_adapter_gets_gates_and_counts_the_examples_they_saw(tmp_path):
    model = tiny_llama()
    lora_only = random_expert(model, name="imported", rank=2, seed=1)
    lora_only.with_gates({}, gate_steps=0).save(tmp_path)
    imported = expert_from_peft(tmp_path, name="imported", base_model=model)
    assert imported.manifest.training.examples == 0 and not imported.has_gates

    expert = add_gates_and_vectors(
        model,
        tiny_tokenizer(),
        imported,
        EXAMPLES,
        config=CONFIG,
        average_activation=False,
        retrieval=False,
        progress=False,
    )

    assert set(expert.gates) == set(expert.module_paths())
    assert expert.manifest.training.examples == len(EXAMPLES)
    for path in expert.module_paths():  # the LoRA itself is kept as it was
        a, b, scale = expert.lora_update(path)
        a0, b0, scale0 = lora_only.lora_update(path)
        assert torch.equal(a, a0) and torch.equal(b, b0) and scale == scale0

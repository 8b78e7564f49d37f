"""The contributor pipeline, defined once: LoRA, then gates, then the baselines' vectors.

What a contributor runs on its own data (METHOD.md): train a LoRA expert, freeze it and
train its PHATGOOSE gates, then, when asked, the contributor-side vectors of two baselines
(average activations, and the opt-in retrieval embeddings, which leak). The client's
`train` and `import-peft` commands, the Flower ClientApp and the zero-shot benchmark all go
through these two functions; only the embedder differs (the benchmark may inject its own).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from phatgoose.data import Example
from phatgoose.embeddings import Embedder, embed_training_inputs
from phatgoose.expert import Expert
from phatgoose.training import (
    PRIVACY_WARNING,
    TrainingConfig,
    compute_average_activations,
    train_expert,
    train_gates,
)
from protocol import MAX_RETRIEVAL_EXAMPLES, BaseModelIdentity

log = logging.getLogger(__name__)

Say = Callable[[str], None]


def train_contributor_expert(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    name: str,
    config: TrainingConfig,
    average_activation: bool,
    retrieval: bool,
    base_model: BaseModelIdentity | None = None,
    description: str = "",
    license: str = "Apache-2.0",
    max_vector_examples: int = MAX_RETRIEVAL_EXAMPLES,
    embedder: Embedder | None = None,
    progress: bool = True,
    say: Say = log.info,
    timings: dict[str, float] | None = None,
    resume_from: Expert | None = None,
) -> Expert:
    """A complete expert from the contributor's examples: LoRA, gates, optional vectors.

    `base_model` defaults to `model`'s name and fingerprint (see `train_expert`).
    `resume_from` continues an earlier version's LoRA (see `train_expert`).
    `timings`, when given, receives the seconds of each step: `lora_seconds`, then those of
    `add_gates_and_vectors`.
    """
    refuse_vectors_under_dp(config, average_activation=average_activation, retrieval=retrieval)
    started = time.perf_counter()
    expert = train_expert(
        model,
        tokenizer,
        examples,
        name=name,
        config=config,
        base_model=base_model,
        description=description,
        license=license,
        progress=progress,
        resume_from=resume_from,
    )
    if timings is not None:
        timings["lora_seconds"] = time.perf_counter() - started
    say(f"LoRA trained: {config.steps} steps, {_final_loss(expert.manifest.training.final_loss)}")
    return add_gates_and_vectors(
        model,
        tokenizer,
        expert,
        examples,
        config=config,
        average_activation=average_activation,
        retrieval=retrieval,
        max_vector_examples=max_vector_examples,
        embedder=embedder,
        progress=progress,
        say=say,
        timings=timings,
    )


def _final_loss(loss: float | None) -> str:
    return "no loss published (DP)" if loss is None else f"final loss {loss:.4f}"


def refuse_vectors_under_dp(
    config: TrainingConfig, *, average_activation: bool, retrieval: bool
) -> None:
    """Under DP, neither baseline vector may be asked for: nothing privatises them (an
    average of private activations, embeddings of private inputs), and shipping one would
    void the expert's guarantee. Checked before any training starts."""
    if config.dp is None:
        return
    for asked, what, flag in (
        (average_activation, "average activations", "--average-activation"),
        (retrieval, "retrieval embeddings", "--retrieval-embeddings"),
    ):
        if asked:
            raise ValueError(
                f"{what} cannot be shipped with a differentially private expert: they are "
                f"computed from the private data without noise; drop {flag} or --dp-epsilon"
            )


def add_gates_and_vectors(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    expert: Expert,
    examples: Sequence[Example],
    *,
    config: TrainingConfig,
    average_activation: bool,
    retrieval: bool,
    max_vector_examples: int = MAX_RETRIEVAL_EXAMPLES,
    embedder: Embedder | None = None,
    progress: bool = True,
    say: Say = log.info,
    timings: dict[str, float] | None = None,
) -> Expert:
    """A trained (or imported) LoRA expert made complete: its PHATGOOSE gates, then the
    average activations and the retrieval embeddings when asked for.

    Both vectors use up to `max_vector_examples` examples, a sample seeded by `config.seed`;
    the embeddings come from `embedder` (MiniLM by default). `timings`, when given, receives
    `gate_seconds` and `vector_seconds`.
    """
    refuse_vectors_under_dp(config, average_activation=average_activation, retrieval=retrieval)
    started = time.perf_counter()
    expert = train_gates(model, tokenizer, expert, examples, config=config, progress=progress)
    if timings is not None:
        timings["gate_seconds"] = time.perf_counter() - started
    training = expert.manifest.training
    say(f"gates trained: {training.gate_steps} steps, {_final_loss(training.final_gate_loss)}")
    if training.examples == 0:  # an imported adapter: count the data its gates saw
        training = training.model_copy(update={"examples": len(examples)})
        expert = replace(expert, manifest=expert.manifest.model_copy(update={"training": training}))

    started = time.perf_counter()
    if average_activation:
        activations = compute_average_activations(
            model,
            tokenizer,
            expert.module_paths(),
            examples,
            max_examples=max_vector_examples,
            max_length=config.max_length,
            batch_size=config.batch_size,
            seed=config.seed,
            precision=config.precision,
        )
        expert = expert.with_average_activations(activations)
        say(f"average activations computed over {min(len(examples), max_vector_examples)} examples")
    if retrieval:
        say(f"warning: {PRIVACY_WARNING}")
        embeddings = embed_training_inputs(
            examples, embedder=embedder, max_examples=max_vector_examples, seed=config.seed
        )
        expert = expert.with_retrieval_embeddings(embeddings)
        say(f"retrieval embeddings computed for {embeddings.shape[0]} inputs")
    if timings is not None:
        timings["vector_seconds"] = time.perf_counter() - started
    return expert

"""The contributor's training service, shared by `phatgoose client train` and the ClientApp.

Everything happens on the contributor's machine: the data is read here, the base model is
loaded here, and what comes out is an `Expert` (parameters, router vectors, manifest). The
data itself never leaves this module.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from phatgoose import pipeline
from phatgoose.data import Example, load_examples
from phatgoose.expert import Expert
from phatgoose.models import DEFAULT_BASE_MODEL, load_base_model, model_fingerprint
from phatgoose.pipeline import Say
from phatgoose.training import TrainingConfig, expert_from_peft
from protocol import BaseModelIdentity

log = logging.getLogger(__name__)

# Defaults sized for a contributor on a CPU (BENCHMARK.md's reference settings: r=8,
# alpha=16, 80 steps of batch 8 at lr 1e-3, 192 tokens, 16 gate steps).
CPU_DEFAULTS = TrainingConfig(
    r=8,
    lora_alpha=16.0,
    learning_rate=1e-3,
    steps=80,
    batch_size=8,
    max_length=192,
    gate_steps=16,
)

BaseModel = tuple[PreTrainedModel, PreTrainedTokenizerBase]


@dataclass(frozen=True)
class ContributorOptions:
    """What a contributor decides besides the hyper-parameters."""

    description: str = ""
    license: str = "Apache-2.0"
    max_examples: int | None = None  # a seeded sample of the data when it holds more
    average_activation: bool = False
    retrieval_embeddings: bool = False  # opt-in: embeddings of private inputs leak
    progress: bool = True


def read_training_data(
    data: str | Path | Sequence[Example], *, max_examples: int | None = None, seed: int = 0
) -> list[Example]:
    """Examples from a JSONL file or a BIG-bench task file (or given as is), sampled with
    `seed` down to `max_examples` when there are more."""
    examples = list(data) if not isinstance(data, str | Path) else load_examples(data)
    if max_examples is not None and 0 < max_examples < len(examples):
        examples = random.Random(seed).sample(examples, max_examples)
    return examples


def base_identity(model: PreTrainedModel, base: str) -> BaseModelIdentity:
    """The manifest's base model: the name it was loaded by and its weights' fingerprint."""
    return BaseModelIdentity(name=base, fingerprint=model_fingerprint(model))


def train_contributor_expert(
    data: str | Path | Sequence[Example],
    name: str,
    *,
    base: str = DEFAULT_BASE_MODEL,
    config: TrainingConfig = CPU_DEFAULTS,
    options: ContributorOptions | None = None,
    base_model: BaseModel | None = None,
    say: Say = log.info,
    resume_from: Expert | None = None,
) -> Expert:
    """The contributor's data read and the base model loaded, then the pipeline (LoRA, gates,
    the optional baseline vectors: `phatgoose.pipeline.train_contributor_expert`).

    `base` names the base model (`smollm2-135m` or a local Hugging Face directory);
    `base_model` may hand over an already loaded `(model, tokenizer)` for it.
    `resume_from`: an earlier version whose LoRA training continues (its rank, alpha and
    target modules are kept; `config`'s are ignored).
    """
    options = options or ContributorOptions()
    examples = read_training_data(data, max_examples=options.max_examples, seed=config.seed)
    say(f"{len(examples)} training examples")
    model, tokenizer = base_model or _load(base, say)
    return pipeline.train_contributor_expert(
        model,
        tokenizer,
        examples,
        name=name,
        config=config,
        average_activation=options.average_activation,
        retrieval=options.retrieval_embeddings,
        base_model=base_identity(model, base),
        description=options.description,
        license=options.license,
        progress=options.progress,
        say=say,
        resume_from=resume_from,
    )


def import_peft_expert(
    adapter_dir: str | Path,
    data: str | Path | Sequence[Example],
    name: str,
    *,
    base: str = DEFAULT_BASE_MODEL,
    config: TrainingConfig = CPU_DEFAULTS,
    options: ContributorOptions | None = None,
    base_model: BaseModel | None = None,
    say: Say = log.info,
) -> Expert:
    """An existing PEFT LoRA adapter made into an expert: only its gates are trained."""
    options = options or ContributorOptions()
    examples = read_training_data(data, max_examples=options.max_examples, seed=config.seed)
    say(f"{len(examples)} training examples")
    model, tokenizer = base_model or _load(base, say)
    expert = expert_from_peft(
        adapter_dir,
        name=name,
        base_model=base_identity(model, base),
        description=options.description,
        license=options.license,
    )
    say(f"adapter read: {len(expert.module_paths())} modules, rank {expert.rank}")
    return pipeline.add_gates_and_vectors(
        model,
        tokenizer,
        expert,
        examples,
        config=config,
        average_activation=options.average_activation,
        retrieval=options.retrieval_embeddings,
        progress=options.progress,
        say=say,
    )


def _load(base: str, say: Say) -> BaseModel:
    say(f"loading base model {base}")
    return load_base_model(base)

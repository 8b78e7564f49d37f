"""The zero-shot benchmark (../shared/BENCHMARK.md): train one expert per held-in task,
then score every method of METHOD.md on the held-out tasks (up to `n_eval_held_out`
examples each: they need no training pool) and on the held-in tasks' evaluation splits,
with rank classification. Every method is compared with the base and PHATGOOSE example by
example, and every expert alone with the base on its own task (its own-task gain).

Methods: base, merged, arrow, spectr, phatgoose_example (per-example PHATGOOSE), smear
(SMEAR-style merging), ties, dare, average_activation, retrieval, phatgoose (zero-shot; the
methods with hyper-parameters at their defaults, protocol.methods), plus the references
oracle (per task, the best single expert), best_individual (the single expert with the
best mean over every evaluation task) and multitask (one LoRA on the pooled training data,
which the setting forbids). Oracle and best_individual are selected with the evaluation
labels: they are upper bounds, never zero-shot results.

Multitask budget: the same number of optimiser steps as all contributors together
(`steps * number of experts`, batch unchanged), so it sees as many training examples as
the experts did in total. Gate steps are not counted (multitask has no router).

Trained experts are cached in a coordinator catalog (`benchmarks.catalog`): the expert
`bench/<task>` whose manifest carries the cache key, which hashes the task, the base
model's weight fingerprint, the data split and every training hyper-parameter; a re-run
with the same settings trains nothing. Packages under `<cache>/<task>-<key>` (the cache
before the catalog; still the cache when no catalog is given) are read too and registered
into the catalog when found. With `publish`, the results become releases and finished
evaluation jobs on that catalog's leaderboard.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from benchmarks.machine import cpu_model, load_average, machine_info
from phatgoose.bigbench import HELD_IN_TASKS, HELD_OUT_TASKS, load_bigbench_task
from phatgoose.data import Example
from phatgoose.embeddings import Embedder
from phatgoose.evaluation import TaskResult, evaluate_task, paired_outcomes
from phatgoose.expert import Expert
from phatgoose.models import DEFAULT_BASE_MODEL, load_base_model, model_fingerprint
from phatgoose.paired import paired_difference, paired_mean_difference
from phatgoose.pipeline import Say, train_contributor_expert
from phatgoose.precision import ComputePrecision, Precision, resolve_precision
from phatgoose.routing import build_routed_model, routing_state, unroute_model
from phatgoose.training import TrainingConfig, train_expert, train_gates
from protocol import (
    METHOD_SPECS,
    ROUTER_NUMERICS,
    BaseModelIdentity,
    RoutingMethod,
    is_method,
    method_spec,
    resolve_params,
    slug,
)

if TYPE_CHECKING:
    from benchmarks.catalog import BenchmarkCatalog

log = logging.getLogger(__name__)

# Evaluation order. The routing methods are protocol's, all but "single": here
# "single_experts" stands for the references oracle and best_individual, which are selected
# from every single expert's results.
PRIORITY = (
    "base", "phatgoose", "merged", "single_experts", "arrow", "spectr", "phatgoose_example",
    "smear", "ties", "dare", "average_activation", "retrieval", "multitask",
)  # fmt: skip
# The report's columns: zero-shot routers first (what the benchmark is about), then the
# references (not zero-shot, or outside the setting).
ROUTED_METHODS: tuple[RoutingMethod, ...] = tuple(m for m in PRIORITY if is_method(m))
REFERENCE_METHODS = ("oracle", "best_individual", "multitask")
METHODS: tuple[str, ...] = (*ROUTED_METHODS, *REFERENCE_METHODS)
CACHE_FORMAT = 1  # bump when the way a cached expert is produced changes
# Every method is compared example by example with these (phatgoose.paired), when both ran.
PAIRED_REFERENCES = ("base", "phatgoose")
PAIRED_SETTINGS: dict[str, Any] = {"resamples": 10_000, "confidence": 0.95, "seed": 0}


# ----------------------------------------------------------------------------- settings
@dataclass
class ZeroShotConfig:
    """Everything that decides the benchmark's numbers (recorded in the result file).

    Training hyper-parameters go to `phatgoose.training.TrainingConfig` unchanged;
    `eval_max_length` defaults to `max_length` (training and scoring see the same window).
    The multitask LoRA gets the experts' total budget in training sequences: with
    `multitask_batch_size` (default `batch_size`), `multitask_steps` defaults to
    `steps * len(held_in) * batch_size / multitask_batch_size` (rounded up).
    """

    held_in: list[str] = field(default_factory=lambda: list(HELD_IN_TASKS))
    held_out: list[str] = field(default_factory=lambda: list(HELD_OUT_TASKS))
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    base_model: str = DEFAULT_BASE_MODEL
    # A held-in task's first `n_eval` examples (seeded shuffle) are its evaluation split, the
    # rest its training pool. A held-out task has no training pool: up to `n_eval_held_out`
    # of its examples are scored (all of a smaller task), the first of the same shuffle.
    n_eval: int = 100
    n_eval_held_out: int = 300
    split_seed: int = 0
    max_train_examples: int | None = None
    # LoRA and gates (TrainingConfig)
    r: int = 16
    lora_alpha: float = 32.0
    steps: int = 1000
    batch_size: int = 8
    learning_rate: float = 5e-3
    warmup_ratio: float = 0.06
    max_length: int = 256
    gate_steps: int | None = None
    gate_learning_rate: float | None = None
    validation_fraction: float = 0.1
    max_validation_examples: int = 200
    eval_every: int | None = None
    seed: int = 0
    multitask_steps: int | None = None
    multitask_batch_size: int | None = None
    # contributor vectors of the baselines
    max_vector_examples: int = 1000
    # inference
    top_k: int = 2
    eval_batch_size: int = 16
    eval_max_length: int | None = None
    # Score only the first `eval_limit` examples of each evaluation split (None: all). The
    # split itself (and so every training pool and cached expert) stays as `n_eval` made it.
    eval_limit: int | None = None
    # Score every single expert on the held-out tasks too (oracle and best_individual there).
    # False scores them on the held-in tasks only, a third of the single experts' cost when
    # held-out tasks have 300 examples: oracle and best_individual are then reported, and
    # best_individual chosen, on the held-in tasks alone.
    single_experts_on_held_out: bool = True
    # Compute precision of training and scoring (phatgoose.precision). `run_zero_shot`
    # resolves `auto` on its device first, so caches are keyed by what actually ran.
    precision: Precision = "auto"
    # Per method with hyper-parameters, the settings to choose among on the held-in tasks'
    # evaluation splits only (the best held-in mean wins, the first on a tie); held-out
    # tasks are then scored with the choice alone. One candidate fixes the parameters; a
    # method not listed runs with its defaults (protocol.methods).
    param_candidates: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {"spectr": [dict(c) for c in SPECTR_CANDIDATES]}
    )

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; expected some of {list(METHODS)}")
        both = sorted(set(self.held_in) & set(self.held_out))
        if both:
            raise ValueError(f"tasks both held-in and held-out: {both}")
        if not self.held_in and any(m != "base" for m in self.methods):
            raise ValueError("every method but 'base' needs at least one held-in task (expert)")
        if not self.held_in and not self.held_out:
            raise ValueError("no tasks: give held-in and/or held-out tasks")
        if self.n_eval < 1:
            raise ValueError(f"n_eval must be >= 1, got {self.n_eval}")
        if self.n_eval_held_out < 1:
            raise ValueError(f"n_eval_held_out must be >= 1, got {self.n_eval_held_out}")
        if self.multitask_batch_size is not None and self.multitask_batch_size < 1:
            raise ValueError(
                f"multitask_batch_size must be None or >= 1, got {self.multitask_batch_size}"
            )
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError(f"eval_limit must be None or >= 1, got {self.eval_limit}")
        for method, candidates in self.param_candidates.items():
            if not is_method(method) or not method_spec(method).params:
                with_params = [m for m in METHOD_SPECS if METHOD_SPECS[m].params]
                raise ValueError(
                    f"param_candidates: {method!r} is not a method with parameters; "
                    f"expected one of {with_params}"
                )
            if not candidates:
                raise ValueError(f"param_candidates[{method!r}]: give at least one setting")
            for candidate in candidates:
                try:
                    resolve_params(method, candidate)
                except ValueError as error:
                    raise ValueError(f"param_candidates[{method!r}]: {error}") from None
        self.training_config()  # validates the hyper-parameters

    def training_config(
        self, steps: int | None = None, batch_size: int | None = None
    ) -> TrainingConfig:
        return TrainingConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            learning_rate=self.learning_rate,
            warmup_ratio=self.warmup_ratio,
            steps=steps or self.steps,
            batch_size=batch_size or self.batch_size,
            max_length=self.max_length,
            validation_fraction=self.validation_fraction,
            max_validation_examples=self.max_validation_examples,
            eval_every=self.eval_every,
            gate_steps=self.gate_steps,
            gate_learning_rate=self.gate_learning_rate,
            seed=self.seed,
            precision=self.precision,
        )

    @property
    def resolved_multitask_batch_size(self) -> int:
        return self.multitask_batch_size or self.batch_size

    @property
    def resolved_multitask_steps(self) -> int:
        sequences = self.steps * max(1, len(self.held_in)) * self.batch_size
        return self.multitask_steps or -(-sequences // self.resolved_multitask_batch_size)

    @property
    def resolved_eval_max_length(self) -> int:
        return self.eval_max_length or self.max_length


# SpectR's score and weighting (protocol.methods), the authors' choice first: chosen on the
# held-in evaluation splits (ZeroShotConfig.param_candidates), never on held-out tasks.
SPECTR_CANDIDATES: tuple[dict[str, str], ...] = tuple(
    {"score": score, "weighting": weighting}
    for score in ("input", "spectrum")
    for weighting in ("uniform", "softmax")
)


# BENCHMARK.md's reference training settings (r = 8, 80 LoRA steps of batch 8, 16 gate steps)
# over its whole suite: every held-in expert, every held-out task (up to 300 examples each),
# every method. Estimated at about 8 hours on 2 idle cores in bfloat16, resumable through
# the caches (docs/benchmarks.md, "The full cpu preset: what it costs").
CPU_PRESET: dict[str, Any] = {
    "held_in": list(HELD_IN_TASKS),
    "held_out": list(HELD_OUT_TASKS),
    "n_eval": 80,
    "n_eval_held_out": 300,
    "max_train_examples": 2000,
    "r": 8,
    "lora_alpha": 16.0,
    "steps": 80,
    "batch_size": 8,
    "learning_rate": 1e-3,
    "max_length": 192,
    "gate_steps": 16,
    "gate_learning_rate": 1e-3,
    "eval_every": 20,
    "max_validation_examples": 64,
    # A mean activation is well estimated from 200 examples (10-35 thousand tokens); 1000
    # cost a quarter of each expert's CPU time.
    "max_vector_examples": 200,
    "top_k": 2,
}
# The cpu preset before the full suite, which made benchmarks/results/zero-shot-cpu*.json
# (64 minutes on 2 idle cores in bfloat16, measured): the four held-in tasks of
# BENCHMARK.md's reference table and six held-out BIG-bench Lite tasks with short prompts,
# 80 examples each (the first 80 of the same shuffle as the full preset's 300).
CPU_4_PRESET: dict[str, Any] = {
    **CPU_PRESET,
    "held_in": ["sports_understanding", "navigate", "hyperbaton", "temporal_sequences"],
    "held_out": [
        "code_line_description",
        "emoji_movie",
        "hindu_knowledge",
        "known_unknowns",
        "strategyqa",
        "winowhy",
    ],
    "n_eval_held_out": 80,
}
# What fits ~1.5 h on a 2-core machine shared with other jobs (about one effective core):
# the three short-prompt tasks of BENCHMARK.md's reference table plus social_iqa, half the
# reference's steps, 40 evaluation examples per task, five short held-out tasks.
CPU_SMALL_PRESET: dict[str, Any] = {
    **CPU_PRESET,
    "held_in": ["sports_understanding", "navigate", "hyperbaton", "social_iqa"],
    "held_out": ["code_line_description", "emoji_movie", "known_unknowns", "strategyqa", "winowhy"],
    "n_eval": 40,
    "n_eval_held_out": 40,
    "steps": 40,
    "gate_steps": 8,
    "max_length": 128,
    "max_validation_examples": 32,
}
# Every held-in expert at r = 16 with the paper's optimiser settings (TrainingConfig's
# defaults: 1000 steps of batch 8, lr 5e-3, 6% warm-up); for a machine with a GPU.
PAPER_PRESET: dict[str, Any] = {
    "held_in": list(HELD_IN_TASKS),
    "held_out": list(HELD_OUT_TASKS),
    "n_eval": 200,
    "r": 16,
    "lora_alpha": 32.0,
    "steps": 1000,
    "batch_size": 8,
    "learning_rate": 5e-3,
    "max_length": 512,
    "eval_batch_size": 32,
    # The multitask budget (12 experts x 1000 steps x 8 sequences) in 3000 steps of 32: on a
    # GPU, 12000 sequential steps of 8 would take longer than everything else together.
    "multitask_batch_size": 32,
}
# A few minutes: checks the whole pipeline on real data, says nothing about quality.
SMOKE_PRESET: dict[str, Any] = {
    **CPU_PRESET,
    "held_in": ["sports_understanding", "navigate"],
    "held_out": ["strategyqa", "known_unknowns"],
    "n_eval": 16,
    "n_eval_held_out": 16,
    "max_train_examples": 200,
    "steps": 8,
    "gate_steps": 2,
    "eval_every": 4,
    "max_validation_examples": 8,
    "max_vector_examples": 64,
}
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": CPU_PRESET,
    "cpu-4": CPU_4_PRESET,
    "cpu-small": CPU_SMALL_PRESET,
    "paper": PAPER_PRESET,
    "smoke": SMOKE_PRESET,
}


def with_resolved_precision(
    config: ZeroShotConfig, device: str | torch.device
) -> tuple[ZeroShotConfig, ComputePrecision]:
    """`config` with its precision resolved on `device` (`auto` becomes what this machine
    computes in, so expert and score caches are keyed by what ran), and the decision."""
    compute = resolve_precision(config.precision, device)
    return dataclasses.replace(config, precision=compute.name), compute


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: the first CUDA GPU when there is one, else the CPU; otherwise a torch device
    name (`cpu`, `cuda`, `cuda:1`), checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r}: expected auto, cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU")
    return device


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> ZeroShotConfig:
    """A preset, then a JSON or TOML file's keys, then command-line overrides (None skipped)."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
        values.update(PRESETS[preset])
    if config_file is not None:
        values.update(_read_config_file(Path(config_file)))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in dataclasses.fields(ZeroShotConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(known)}")
    return ZeroShotConfig(**values)


def _read_config_file(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        data = tomllib.loads(text)
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"{path}: a config file is .json or .toml")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table/object of settings")
    return data


# --------------------------------------------------------------------------------- data
@dataclass
class BenchmarkTask:
    name: str
    held_in: bool
    evaluation: list[Example]
    training: list[Example]


def load_tasks(config: ZeroShotConfig, tasks_dir: Path | None = None) -> list[BenchmarkTask]:
    """Every task's evaluation examples: a held-in task's `n_eval` evaluation split (it
    keeps its capped training pool), a held-out task's first `n_eval_held_out` examples of
    the same seeded shuffle (it has no training pool)."""
    tasks = []
    for name in config.held_in:
        split = load_bigbench_task(
            name, n_eval=config.n_eval, seed=config.split_seed, tasks_dir=tasks_dir
        )
        training = split.training
        cap = config.max_train_examples
        if cap is not None and len(training) > cap:
            training = random.Random(config.split_seed).sample(training, cap)
        if not training:
            raise ValueError(
                f"held-in task {name!r} has no training examples left after the "
                f"{config.n_eval} evaluation examples; lower n_eval"
            )
        tasks.append(BenchmarkTask(split.name, True, split.evaluation, training))
    for name in config.held_out:
        # n_eval=0: every example in the "training" half, in the split's seeded order.
        split = load_bigbench_task(name, n_eval=0, seed=config.split_seed, tasks_dir=tasks_dir)
        evaluation = split.training[: config.n_eval_held_out]
        tasks.append(BenchmarkTask(split.name, False, evaluation, []))
    return tasks


def expert_name(task: str) -> str:
    """A valid expert name for a task (`parent/subtask` -> `parent-subtask`)."""
    return slug(task)


# ------------------------------------------------------------------------ expert cache
def cache_key(task: str, fingerprint: str, config: ZeroShotConfig, training: TrainingConfig) -> str:
    """Hash of what decides an expert: task, base weights, data split, hyper-parameters."""
    identity = {
        "format": CACHE_FORMAT,
        "task": task,
        "base": fingerprint,
        "n_eval": config.n_eval,
        "split_seed": config.split_seed,
        "max_train_examples": config.max_train_examples,
        "max_vector_examples": config.max_vector_examples,
        "training": dataclasses.asdict(training),
    }
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _cached_or_trained(
    directory: Path,
    train: Callable[[], tuple[Expert, dict[str, float]]],
    cached_only: bool = False,
    *,
    catalog: BenchmarkCatalog | None = None,
    name: str = "",
    key: str = "",
    fingerprint: str = "",
    registrable: Callable[[Expert], Expert | None] | None = None,
) -> tuple[Expert, dict[str, Any]]:
    """The expert from the catalog (by `name` and cache `key`), else the package at
    `directory` (registered into the catalog when found there), else trained: registered
    into the catalog, or saved at `directory` atomically when there is no catalog (or the
    catalog refuses it). `registrable` makes an expert the catalog accepts (gates for the
    multitask LoRA), or returns None when that needs training and `cached_only` forbids it.
    """
    if catalog is not None:
        ref = catalog.find(name, key, fingerprint)
        if ref is not None:
            return catalog.load(ref), {"cached": True, "source": "catalog", "ref": ref}
    timings_file = directory / "benchmark-timings.json"
    if (directory / "expert.json").is_file():
        timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
        expert = Expert.load(directory)
        info: dict[str, Any] = {"cached": True, "source": "directory", **timings}
        if catalog is not None:
            expert, registered = _register(catalog, expert, key, registrable)
            info.update(registered)
        return expert, info
    if cached_only:
        where = f"in the catalog {catalog.data_dir} nor " if catalog is not None else ""
        raise NotCached(f"no cached expert {name} (key {key}) {where}at {directory}")
    expert, timings = train()
    info = {"cached": False, "source": "trained", **timings}
    if catalog is not None:
        expert, registered = _register(catalog, expert, key, registrable)
        info.update(registered)
        if registered["ref"] is not None:
            return expert, info
    _save_package(expert, timings, directory)  # nothing trained is lost
    return expert, info


def _register(
    catalog: BenchmarkCatalog,
    expert: Expert,
    key: str,
    registrable: Callable[[Expert], Expert | None] | None,
) -> tuple[Expert, dict[str, Any]]:
    """Register `expert` into the catalog: (the expert as registered, {"ref": ... or None,
    "catalog": why not}). A refusal is reported, not raised: the expert stays usable."""
    from coordinator.core.errors import CoordinatorError
    from protocol.validation import PackageRejected

    candidate = registrable(expert) if registrable is not None else expert
    if candidate is None:
        why = "not registered: it has no gates (a run without --cached-only trains them)"
        return expert, {"ref": None, "catalog": why}
    try:
        return candidate, {"ref": catalog.register(candidate, key)}
    except (CoordinatorError, PackageRejected) as error:
        log.warning("the catalog refused expert %s (key %s): %s", expert.name, key, error)
        return candidate, {"ref": None, "catalog": f"not registered: {error}"}


def _save_package(expert: Expert, timings: dict[str, float], directory: Path) -> None:
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        expert.save(tmp)
        (tmp / "benchmark-timings.json").write_text(json.dumps(timings))
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def task_expert(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: BenchmarkTask,
    config: ZeroShotConfig,
    cache_dir: Path,
    *,
    base: BaseModelIdentity,
    embedder: Embedder | None = None,
    progress: bool = True,
    cached_only: bool = False,
    catalog: BenchmarkCatalog | None = None,
) -> tuple[Expert, dict[str, Any]]:
    """The task's expert with gates, average activations and retrieval embeddings (cached)."""
    training_config = config.training_config()
    key = cache_key(task.name, base.fingerprint, config, training_config)

    def train() -> tuple[Expert, dict[str, float]]:
        timings: dict[str, float] = {}
        expert = train_contributor_expert(
            model, tokenizer, task.training, name=expert_name(task.name),
            config=training_config, base_model=base,
            description=f"BIG-bench {task.name} (benchmark expert)",
            average_activation=True, retrieval=True,
            max_vector_examples=config.max_vector_examples, embedder=embedder,
            progress=progress, timings=timings,
        )  # fmt: skip
        return expert, timings

    name = expert_name(task.name)
    expert, info = _cached_or_trained(
        cache_dir / f"{name}-{key}", train, cached_only,
        catalog=catalog, name=name, key=key, fingerprint=base.fingerprint,
    )  # fmt: skip
    return expert, {**info, "key": key}


def multitask_expert(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[BenchmarkTask],
    config: ZeroShotConfig,
    cache_dir: Path,
    *,
    base: BaseModelIdentity,
    progress: bool = True,
    cached_only: bool = False,
    catalog: BenchmarkCatalog | None = None,
) -> tuple[Expert, dict[str, Any]]:
    """One LoRA on the union of the held-in training pools. It is not routed, but the
    catalog only accepts experts with gates: before registering, gates are trained on the
    pooled data with the experts' gate settings (not counted in the multitask budget)."""
    training_config = config.training_config(
        steps=config.resolved_multitask_steps, batch_size=config.resolved_multitask_batch_size
    )
    held_in = [t for t in tasks if t.held_in]
    names = "+".join(sorted(t.name for t in held_in))
    key = cache_key("multitask:" + names, base.fingerprint, config, training_config)
    pooled = [ex for t in held_in for ex in t.training]

    def train() -> tuple[Expert, dict[str, float]]:
        started = time.perf_counter()
        expert = train_expert(
            model, tokenizer, pooled, name="multitask", config=training_config,
            base_model=base, description=f"multitask LoRA over {names}", progress=progress,
        )  # fmt: skip
        return expert, {"lora_seconds": time.perf_counter() - started}

    def registrable(expert: Expert) -> Expert | None:
        if expert.has_gates:
            return expert
        if cached_only:
            return None
        return train_gates(
            model, tokenizer, expert, pooled, config=config.training_config(), progress=progress
        )

    expert, info = _cached_or_trained(
        cache_dir / f"multitask-{key}", train, cached_only,
        catalog=catalog, name="multitask", key=key, fingerprint=base.fingerprint,
        registrable=registrable,
    )  # fmt: skip
    return expert, {**info, "key": key}


# ------------------------------------------------------------------- selection rules
def oracle_choice(single: dict[str, dict[str, TaskResult]], tasks: Sequence[str]) -> dict[str, str]:
    """Per task, the expert whose single-expert accuracy is highest (ties: first expert)."""
    if not single:
        raise ValueError("oracle needs at least one single-expert result")
    names = list(single)
    return {
        task: max(names, key=lambda e: (single[e][task].accuracy, -names.index(e)))
        for task in tasks
    }


def best_individual_choice(single: dict[str, dict[str, TaskResult]], tasks: Sequence[str]) -> str:
    """The expert with the best mean accuracy over `tasks` (ties: first expert)."""
    if not single or not tasks:
        raise ValueError("best individual needs single-expert results and tasks")
    names = list(single)

    def mean(e: str) -> float:
        return sum(single[e][t].accuracy for t in tasks) / len(tasks)

    return max(names, key=lambda e: (mean(e), -names.index(e)))


# --------------------------------------------------------------------------- summaries
def summarise(
    results: dict[str, TaskResult], held_in: Sequence[str], held_out: Sequence[str]
) -> dict[str, Any]:
    """Per-task results, the held-in and held-out means (with stderr) and the cost."""

    def mean(tasks: Sequence[str]) -> dict[str, float] | None:
        present = [results[t] for t in tasks if t in results]
        if not present:
            return None
        return {
            "accuracy": sum(r.accuracy for r in present) / len(present),
            # independent tasks: stderr of the mean of means
            "stderr": math.sqrt(sum(r.stderr**2 for r in present)) / len(present),
            "tasks": len(present),
        }

    seconds = sum(r.seconds for r in results.values())
    tokens = sum(r.scored_tokens for r in results.values())
    return {
        "tasks": {t: r.to_dict() for t, r in results.items()},
        "held_in_mean": mean(held_in),
        "held_out_mean": mean(held_out),
        "seconds": seconds,
        "scored_tokens": tokens,
        "seconds_per_1k_scored_tokens": 1000 * seconds / tokens if tokens else None,
    }


def add_paired_differences(record: dict[str, Any]) -> None:
    """Give every method in `record["methods"]` its paired differences against each of
    `PAIRED_REFERENCES` that ran (not itself): `methods[m]["paired"][reference]` holds
    `tasks` (per task) and `held_in_mean`, `held_out_mean` (tasks as strata; None without
    such tasks), each a `PairedDifference.to_dict()` of accuracy(m) - accuracy(reference).
    Comparisons already there are kept, so it can run after every method."""
    methods = record.get("methods", {})
    held_in = [t for t, info in record["tasks"].items() if info["held_in"]]
    held_out = [t for t, info in record["tasks"].items() if not info["held_in"]]
    for method, summary in methods.items():
        for reference in PAIRED_REFERENCES:
            if reference == method or reference not in methods:
                continue
            if reference in summary.get("paired", {}):
                continue
            compared = _paired(summary["tasks"], methods[reference]["tasks"], held_in, held_out)
            summary.setdefault("paired", {})[reference] = compared


def add_own_task_gains(record: dict[str, Any]) -> None:
    """`record["own_task_gains"]`: per held-in expert scored alone, its accuracy on its own
    task's evaluation split against the base model's, with the paired difference (expert -
    base). Does nothing until both the base and the single experts ran; recomputed from
    them each time (it is cheap), so it can run after every method."""
    base = record.get("methods", {}).get("base", {}).get("tasks", {})
    single = record.get("single_experts", {})
    gains: dict[str, Any] = {}
    for expert in record.get("experts", []):
        own = single.get(expert["name"], {}).get("tasks", {}).get(expert["task"])
        reference = base.get(expert["task"])
        if own is None or reference is None:
            continue
        a, b = paired_outcomes(TaskResult(**own), TaskResult(**reference))
        gains[expert["name"]] = {
            "task": expert["task"],
            "n": own["n"],
            "expert": own["accuracy"],
            "base": reference["accuracy"],
            "paired": paired_difference(a, b, **PAIRED_SETTINGS).to_dict(),
        }
    if gains:
        record["own_task_gains"] = gains


def _paired(
    results: dict[str, dict[str, Any]],
    reference: dict[str, dict[str, Any]],
    held_in: Sequence[str],
    held_out: Sequence[str],
) -> dict[str, Any]:
    """accuracy(results) - accuracy(reference) per task and for the group means."""
    outcomes = {
        task: paired_outcomes(TaskResult(**results[task]), TaskResult(**reference[task]))
        for task in results
        if task in reference
    }

    def mean(tasks: Sequence[str]) -> dict[str, float | int | bool] | None:
        present = {t: outcomes[t] for t in tasks if t in outcomes}
        return paired_mean_difference(present, **PAIRED_SETTINGS).to_dict() if present else None

    return {
        "tasks": {
            task: paired_difference(a, b, **PAIRED_SETTINGS).to_dict()
            for task, (a, b) in outcomes.items()
        },
        "held_in_mean": mean(held_in),
        "held_out_mean": mean(held_out),
    }


# ---------------------------------------------------------------------------- runner
class NotCached(LookupError):
    """`cached_only` was asked for and something is not in the cache yet."""


class EvaluationCache:
    """Per (model configuration, task) results on disk, so an interrupted or repeated run
    scores nothing twice. `identity` names the configuration: the method, the cache keys
    of the experts it uses, k, and what decides the scored examples (a held-out task's
    also names `n_eval_held_out`; a held-in task's identity is what it was before held-out
    tasks had their own count, so its cached results stay valid)."""

    def __init__(
        self,
        directory: Path,
        config: ZeroShotConfig,
        fingerprint: str,
        held_out: Iterable[str] | None = None,
    ) -> None:
        """`held_out`: the held-out tasks' names as loaded (`BenchmarkTask.name`; default
        `config.held_out`)."""
        self.directory = directory
        self.held_out = {
            task: {"held_out_examples": config.n_eval_held_out}
            for task in (config.held_out if held_out is None else held_out)
        }
        self.common = {
            "format": CACHE_FORMAT,
            "base": fingerprint,
            "n_eval": config.n_eval,
            "split_seed": config.split_seed,
            "eval_limit": config.eval_limit,
            "eval_max_length": config.resolved_eval_max_length,
            "precision": config.precision,
        }

    def path(self, identity: dict[str, Any], task: str) -> Path:
        examples = self.held_out.get(task, {})
        blob = json.dumps(
            {**self.common, **examples, **identity, "task": task}, sort_keys=True
        ).encode()
        return self.directory / f"{hashlib.sha256(blob).hexdigest()[:20]}.json"

    def get(self, identity: dict[str, Any], task: str) -> TaskResult | None:
        path = self.path(identity, task)
        if not path.is_file():
            return None
        result = TaskResult(**json.loads(path.read_text()))
        # Results cached before per-example outcomes were kept are misses: scored again, the
        # new result replaces them at the same path. Bumping CACHE_FORMAT instead would
        # also change every expert's cache key and retrain them all.
        return result if result.has_outcomes else None

    def put(self, identity: dict[str, Any], result: TaskResult) -> None:
        path = self.path(identity, result.task)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result.to_dict()))
        tmp.replace(path)


def evaluate_all(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[BenchmarkTask],
    config: ZeroShotConfig,
    bar: Any = None,
    *,
    cache: EvaluationCache | None = None,
    identity: dict[str, Any] | None = None,
    prepare: Callable[[], object] | None = None,
    cached_only: bool = False,
) -> dict[str, TaskResult]:
    """Every task's result; cached ones are read, the rest scored (after `prepare()`, once),
    or with `cached_only`, `NotCached` is raised."""
    results = {}
    prepared = False
    for task in tasks:
        if not task.evaluation:
            continue
        cached = cache.get(identity or {}, task.name) if cache is not None else None
        if cached is not None:
            results[task.name] = cached
        elif cached_only:
            raise NotCached(f"no cached result for task {task.name!r}")
        else:
            if prepare is not None and not prepared:
                prepare()
                prepared = True
            examples = task.evaluation[: config.eval_limit]
            results[task.name] = evaluate_task(
                model, tokenizer, examples, task=task.name,
                batch_size=config.eval_batch_size, max_length=config.resolved_eval_max_length,
                progress=False, precision=config.precision,
            )  # fmt: skip
            if cache is not None:
                cache.put(identity or {}, results[task.name])
        if bar is not None:
            bar.update(1)
    return results


def method_identity(
    method: str, params: dict[str, Any], expert_keys: Sequence[str], top_k: int
) -> dict[str, Any]:
    """What names a routed method's scores in the evaluation cache: the method, the cache
    keys of its experts in order, k, the token routers' numerics and the method's
    parameters. The scaling curve (benchmarks/scaling.py) names its pools the same way, so
    a pool of every expert reuses the zero-shot run's scores."""
    if method == "base":
        return {"method": "base"}
    identity: dict[str, Any] = {"method": method, "experts": list(expert_keys), "top_k": top_k}
    spec = method_spec(method)
    if spec.standardises_rows:
        # Scores cached under other router numerics are another experiment.
        identity["router_numerics"] = ROUTER_NUMERICS
    if spec.params:
        identity["params"] = params
    return identity


def evaluate_routed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[BenchmarkTask],
    config: ZeroShotConfig,
    route: Callable[[], object],
    *,
    cache: EvaluationCache,
    identity: dict[str, Any],
    bar: Any = None,
    cached_only: bool = False,
) -> dict[str, TaskResult]:
    """Every task's result for the model routed by `route()`: cached results are read, the
    rest scored with the routing built once (only when something is not cached) and always
    undone afterwards."""
    try:
        return evaluate_all(
            model, tokenizer, tasks, config, bar,
            cache=cache, identity=identity, prepare=route, cached_only=cached_only,
        )  # fmt: skip
    finally:
        if routing_state(model) is not None:
            unroute_model(model)


def run_zero_shot(
    config: ZeroShotConfig,
    *,
    cache_dir: Path,
    output: Path | None = None,
    tasks_dir: Path | None = None,
    base_model: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None,
    embedder: Embedder | None = None,
    progress: bool = True,
    say: Say = log.info,
    train_only: bool = False,
    cached_only: bool = False,
    catalog: BenchmarkCatalog | None = None,
    publish: bool = False,
    device: str | torch.device = "cpu",
    single_experts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Train (or load) the experts, evaluate every method, and return the result record.

    Everything runs on `device` (see `resolve_device`); on CUDA, float32 matrix products
    use TF32 (`torch.set_float32_matmul_precision("high")`, recorded in the result).

    With a `catalog`, experts are looked up in and registered into it (`cache_dir` is read
    as a fallback and keeps the evaluation results); with `publish` too, the results go
    onto its leaderboard at the end (`record["leaderboard"]`; not with `train_only`).

    `train_only` trains and caches what the methods need (the task experts, and the
    multitask LoRA when asked for) and evaluates nothing: several such runs can fill the
    cache in parallel before one evaluation run. `cached_only` trains and scores
    nothing: it reports what the cache holds and lists the other methods under `not_run`
    (the experts themselves must be cached).

    With `output`, the record is also written there after every method, so an interrupted
    run keeps what it measured. `embedder` replaces MiniLM (retrieval) in tests.

    `single_experts` (held-in task names) scores only their experts alone, for oracle and
    best_individual, which need them all and are left out of such a run: the `--jobs`
    runner splits that work between processes with it (benchmarks/parallel.py).
    """
    started = time.perf_counter()
    record: dict[str, Any] = {
        "benchmark": "zero-shot",
        "machine": machine_info(),
        "config": dataclasses.asdict(config),
        "multitask_steps": config.resolved_multitask_steps,
        "complete": False,
    }

    def save() -> None:
        record["elapsed_seconds"] = time.perf_counter() - started
        record["machine"]["load_average_end"] = load_average()
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(record_json(record))

    tasks = load_tasks(config, tasks_dir)
    held_in = [t.name for t in tasks if t.held_in]
    held_out = [t.name for t in tasks if not t.held_in]
    record["tasks"] = {
        t.name: {
            "held_in": t.held_in,
            "n_eval": len(t.evaluation),
            "n_scored": len(t.evaluation[: config.eval_limit]),
            "n_train": len(t.training),
            # each scored example's number of answer choices, in order (the coordinator keeps
            # them beside the outcomes: benchmarks.catalog.publish)
            "choices": [len(ex.choices) for ex in t.evaluation[: config.eval_limit]],
        }
        for t in tasks
    }
    say(f"{len(held_in)} held-in tasks, {len(held_out)} held-out tasks")

    model, tokenizer = base_model or load_base_model(config.base_model)
    base = BaseModelIdentity(name=config.base_model, fingerprint=model_fingerprint(model))
    device = torch.device(device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    model.to(device)  # type: ignore[arg-type]  # transformers types its wrapped .to oddly
    record["device"] = {
        "device": str(device),
        "name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    # Resolved once, on this device: every expert, cache key and score below says what ran.
    config, compute = with_resolved_precision(config, device)
    record["precision"] = compute.record()
    say(f"computing in {compute.name} ({compute.reason})")
    if publish and catalog is None:
        raise ValueError("publish needs a catalog (a coordinator data directory)")
    if catalog is not None:  # experts can only be registered over a registered base model
        catalog.ensure_base_model(model, config.base_model)

    methods = [m for m in METHODS if m in config.methods]
    if "oracle" in methods or "best_individual" in methods:
        methods.append("single_experts")
    needs_experts = any(m != "base" and m != "multitask" for m in methods)
    experts: list[Expert] = []
    record["experts"] = []
    if needs_experts:
        for task in tqdm([t for t in tasks if t.held_in], desc="experts", disable=not progress):
            expert, info = task_expert(
                model, tokenizer, task, config, cache_dir,
                base=base, embedder=embedder, progress=progress, cached_only=cached_only,
                catalog=catalog,
            )  # fmt: skip
            experts.append(expert)
            record["experts"].append(
                {
                    "name": expert.name,
                    "task": task.name,
                    "train_examples": len(task.training),
                    **info,
                }
            )
            say(f"expert {expert.name}: {'from cache' if info['cached'] else 'trained'}")
        save()

    if train_only:
        if "multitask" in methods:
            _, info = multitask_expert(
                model, tokenizer, tasks, config, cache_dir,
                base=base, progress=progress, catalog=catalog,
            )  # fmt: skip
            record["multitask"] = {
                "steps": config.resolved_multitask_steps,
                "batch_size": config.resolved_multitask_batch_size,
                **info,
            }
        record["complete"] = True
        save()
        return record

    record["methods"] = {}
    record["single_experts"] = {}
    record["not_run"] = {}
    record["paired_statistics"] = {
        **PAIRED_SETTINGS,
        "references": list(PAIRED_REFERENCES),
        "interval": "percentile bootstrap of examples within each task; tasks as strata",
        "p_value": "exact two-sided McNemar; for a mean, on the discordant examples pooled",
    }
    cache = EvaluationCache(cache_dir / "evaluations", config, base.fingerprint, held_out)
    expert_keys = [e["key"] for e in record["experts"]]
    expert_tasks = [e["task"] for e in record["experts"]]
    unknown_singles = sorted(set(single_experts or ()) - set(expert_tasks))
    if unknown_singles:
        raise ValueError(
            f"single_experts {unknown_singles} are not held-in tasks with an expert in this "
            f"run; expected some of {expert_tasks}"
        )
    alone = {
        e.name
        for e, task in zip(experts, expert_tasks, strict=True)
        if single_experts is None or task in single_experts
    }
    # Tasks every single expert is scored on (oracle and best_individual pick from them).
    single_tasks = [t for t in tasks if t.held_in or config.single_experts_on_held_out]
    singles_needed = any(m in methods for m in ("oracle", "best_individual"))
    total = (
        len(tasks) * len([m for m in methods if m in ROUTED_METHODS or m == "multitask"])
        + (len(alone) * len(single_tasks) if singles_needed else 0)
        + sum(
            # choosing parameters scores each candidate on the held-in tasks
            len(candidates) * len(held_in)
            for method, candidates in config.param_candidates.items()
            if method in methods and len(candidates) > 1
        )
    )
    bar = tqdm(total=total, desc="evaluating (method x task)", disable=not progress)

    def score(
        label: str,
        identity: dict[str, Any],
        route: Callable[[], object],
        task_list: Sequence[BenchmarkTask] | None = None,
    ) -> dict[str, TaskResult]:
        """`evaluate_routed` on `task_list` (every task by default), shown on the bar."""
        bar.set_postfix_str(label)
        return evaluate_routed(
            model, tokenizer, tasks if task_list is None else task_list, config, route,
            cache=cache, identity=identity, bar=bar, cached_only=cached_only,
        )  # fmt: skip

    def identity_of(method: str, params: dict[str, Any]) -> dict[str, Any]:
        return method_identity(method, params, expert_keys, config.top_k)

    def route(method: str, params: dict[str, Any]) -> Callable[[], object]:
        return functools.partial(
            build_routed_model, model, experts, method, config.top_k,
            embedder=embedder, tokenizer=tokenizer, params=params,
        )  # fmt: skip

    def choose_params(method: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The method's parameters and how they were chosen (None: one setting, no choice):
        each candidate scored on the held-in tasks only, the best held-in mean kept."""
        candidates = [resolve_params(method, c) for c in config.param_candidates.get(method, [{}])]
        held_in_tasks = [t for t in tasks if t.name in held_in]
        if len(candidates) == 1 or not held_in_tasks:
            return candidates[0], None
        scored: list[dict[str, Any]] = []
        for params in candidates:
            results = score(
                f"{method} {params} (held-in)", identity_of(method, params),
                route(method, params), task_list=held_in_tasks,
            )  # fmt: skip
            mean = sum(r.accuracy for r in results.values()) / len(results)
            scored.append({"params": params, "held_in_mean": mean})
        best = max(range(len(scored)), key=lambda i: (scored[i]["held_in_mean"], -i))
        selection = {
            "on": "held-in evaluation splits only",
            "tasks": [t.name for t in held_in_tasks],
            "candidates": scored,
            "chosen": scored[best]["params"],
        }
        return scored[best]["params"], selection

    def _evaluate_method(method: str) -> None:
        if method in ROUTED_METHODS:
            spec = method_spec(method)
            params, selection = choose_params(method) if spec.params else ({}, None)
            results = score(method, identity_of(method, params), route(method, params))
            record["methods"][method] = summarise(results, held_in, held_out)
            if spec.params:  # what the catalog's release records too
                record["methods"][method]["params"] = params
            if selection is not None:
                record["methods"][method]["selection"] = selection
        elif method == "single_experts":
            single: dict[str, dict[str, TaskResult]] = {}
            for expert, key in zip(experts, expert_keys, strict=True):
                if expert.name not in alone:
                    continue
                single[expert.name] = score(
                    f"single {expert.name}",
                    {"method": "single", "expert": key},
                    functools.partial(
                        build_routed_model, model, experts, "single", expert=expert.name
                    ),
                    task_list=single_tasks,
                )
                record["single_experts"][expert.name] = summarise(
                    single[expert.name], held_in, held_out
                )
            if len(alone) < len(experts):
                return  # a share of the single experts: the selections need them all
            chosen_on = [t.name for t in single_tasks]
            if "oracle" in methods:
                choice = oracle_choice(single, chosen_on)
                oracle = {t: single[choice[t]][t] for t in chosen_on}
                record["methods"]["oracle"] = {
                    **summarise(oracle, held_in, held_out),
                    "choice": choice,
                }
            if "best_individual" in methods:
                best = best_individual_choice(single, chosen_on)
                record["methods"]["best_individual"] = {
                    **summarise(single[best], held_in, held_out),
                    "choice": best,
                    "chosen_on": chosen_on,
                }
        elif method == "multitask":
            bar.set_postfix_str("training multitask")
            expert, info = multitask_expert(
                model, tokenizer, tasks, config, cache_dir,
                base=base, progress=progress, cached_only=cached_only, catalog=catalog,
            )  # fmt: skip
            record["multitask"] = {
                "steps": config.resolved_multitask_steps,
                "batch_size": config.resolved_multitask_batch_size,
                **info,
            }
            results = score(
                "multitask",
                {"method": "single", "expert": info["key"]},
                functools.partial(
                    build_routed_model, model, [expert], "single", expert=expert.name
                ),
            )
            record["methods"]["multitask"] = summarise(results, held_in, held_out)

    # Most informative first, so a run cut short still compares PHATGOOSE with the
    # base model, merged experts and the oracle.
    for method in [m for m in PRIORITY if m in methods]:
        try:
            _evaluate_method(method)
        except NotCached as missing:
            record["not_run"][method] = f"not in the cache ({missing})"
            say(f"{method}: not run ({missing})")
        add_paired_differences(record)
        add_own_task_gains(record)
        if method in record["methods"]:
            say(f"{method}: {_means_text(record['methods'][method])}")
        save()
    bar.close()
    record["complete"] = not record["not_run"]
    if publish and catalog is not None:
        from benchmarks.catalog import publish as publish_results

        record["leaderboard"] = publish_results(catalog, record)
        say(
            "published to the leaderboard: "
            + ", ".join(f"{m} (release #{n})" for m, n in record["leaderboard"]["releases"].items())
        )
        for method, why in record["leaderboard"]["skipped"].items():
            say(f"not on the leaderboard: {method} ({why})")
    save()
    return record


def _means_text(summary: dict[str, Any]) -> str:
    parts = []
    for key, label in (("held_in_mean", "held-in"), ("held_out_mean", "held-out")):
        if summary.get(key):
            text = f"{label} {summary[key]['accuracy']:.3f}"
            vs_base = summary.get("paired", {}).get("base", {}).get(key)
            if vs_base:
                text += f" ({paired_text(vs_base)} points vs base)"
            parts.append(text)
    return ", ".join(parts) or "no tasks"


def record_json(record: dict[str, Any]) -> str:
    """The record as indented JSON, with each list of numbers or booleans (per-example
    outcomes above all) on one line instead of one line per element."""
    text = json.dumps(record, indent=2)
    return _SCALAR_LIST.sub(lambda m: "[" + re.sub(r",\n\s*", ", ", m[1]) + "]", text) + "\n"


# A list that json.dumps(indent=...) spread over lines, holding only numbers, booleans and
# nulls. Its elements are separated by real newlines, which a JSON string never contains, so
# brackets inside strings never match.
_SCALAR = r"(?:-?(?:\d[\d.eE+-]*|Infinity)|NaN|true|false|null)"
_SCALAR_LIST = re.compile(rf"\[\n\s*({_SCALAR}(?:,\n\s*{_SCALAR})*)\n\s*\]")


# --------------------------------------------------------------------------- reports
def markdown_table(record: dict[str, Any]) -> str:
    """Accuracy ± stderr per task (rows) and method (columns), means and cost."""
    methods = [m for m in METHODS if m in record.get("methods", {})]
    tasks = record["tasks"]
    header = "| task | n | " + " | ".join(methods) + " |"
    lines = [header, "|" + "---|" * (len(methods) + 2)]
    for name, info in tasks.items():
        cells = []
        for m in methods:
            result = record["methods"][m]["tasks"].get(name)
            cells.append(
                "" if result is None else f"{result['accuracy']:.2f} ± {result['stderr']:.2f}"
            )
        label = f"{name} (held-in)" if info["held_in"] else name
        lines.append(f"| {label} | {info['n_scored']} | " + " | ".join(cells) + " |")
    for key, label in (
        ("held_in_mean", "**held-in mean**"),
        ("held_out_mean", "**held-out mean**"),
    ):
        cells = []
        for m in methods:
            mean = record["methods"][m].get(key)
            cells.append(
                "" if mean is None else f"**{mean['accuracy']:.3f}** ± {mean['stderr']:.3f}"
            )
        lines.append(f"| {label} | | " + " | ".join(cells) + " |")
    cost = []
    for m in methods:
        value = record["methods"][m].get("seconds_per_1k_scored_tokens")
        cost.append("" if value is None else f"{value:.2f}")
    lines.append("| s / 1000 scored tokens | | " + " | ".join(cost) + " |")
    choices = []
    for method, why in record.get("not_run", {}).items():
        choices.append(f"Not run: {method} ({why}).")
    if "oracle" in record["methods"]:
        picks = record["methods"]["oracle"]["choice"]
        choices.append("Oracle picks: " + ", ".join(f"{t} -> {e}" for t, e in picks.items()) + ".")
    if "best_individual" in record["methods"]:
        best = record["methods"]["best_individual"]
        held_in_only = best.get("chosen_on") is not None and all(
            tasks[t]["held_in"] for t in best["chosen_on"]
        )
        where = " (single experts scored and chosen on held-in tasks only)" if held_in_only else ""
        choices.append(f"Best individual: {best['choice']}{where}.")
    text = "\n".join(lines) + ("\n\n" + " ".join(choices) if choices else "") + "\n"
    for reference in PAIRED_REFERENCES:
        table = paired_table(record, reference)
        if table:
            text += "\n" + table
    gains = own_task_gain_table(record)
    if gains:
        text += "\n" + gains
    return text


def own_task_gain_table(record: dict[str, Any]) -> str:
    """Each held-in expert alone on its own task against the base model, paired ("" before
    both ran)."""
    gains = record.get("own_task_gains")
    if not gains:
        return ""
    confidence = record.get("paired_statistics", PAIRED_SETTINGS)["confidence"]
    lines = [
        "Own-task gain per expert: the expert alone on its own task's evaluation split against "
        f"the base model; the difference in accuracy points with its {confidence:.0%} paired "
        "bootstrap interval and the McNemar p-value; ▲/▼ where the interval excludes 0.",
        "",
        "| expert | task | n | base | expert | expert - base | p |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, gain in gains.items():
        paired = gain["paired"]
        lines.append(
            f"| {name} | {gain['task']} | {gain['n']} | {gain['base']:.3f} | "
            f"{gain['expert']:.3f} | {paired_text(paired)} | {paired['p_value']:.2g} |"
        )
    better = sum(1 for g in gains.values() if g["paired"]["significant"] and g["paired"]["low"] > 0)
    lines += [
        "",
        f"{better} of {len(gains)} experts beat the base on their own task (interval above 0).",
    ]
    return "\n".join(lines) + "\n"


def paired_text(difference: dict[str, Any]) -> str:
    """A `PairedDifference.to_dict()` in accuracy points: `+2.4 [-0.3, +5.1]`, marked ▲ or
    ▼ only where the interval excludes 0."""
    points = {k: 100 * difference[k] for k in ("delta", "low", "high")}
    text = f"{points['delta']:+.1f} [{points['low']:+.1f}, {points['high']:+.1f}]"
    if difference["significant"]:
        text += " ▲" if difference["low"] > 0 else " ▼"
    return text


def paired_table(record: dict[str, Any], reference: str) -> str:
    """Every method's paired difference from `reference` per task and for the means, in
    accuracy points ("" when no method was compared with it)."""
    methods = [
        m for m in METHODS if reference in record.get("methods", {}).get(m, {}).get("paired", {})
    ]
    if not methods:
        return ""
    settings = record.get("paired_statistics", PAIRED_SETTINGS)
    lines = [
        f"Paired difference from {reference} (accuracy points, method - {reference}) with its "
        f"{settings['confidence']:.0%} bootstrap interval; ▲/▼ where the interval excludes 0; "
        "means with the McNemar p-value of their pooled discordant examples.",
        "",
        "| task | " + " | ".join(methods) + " |",
        "|" + "---|" * (len(methods) + 1),
    ]
    for name, info in record["tasks"].items():
        cells = []
        for m in methods:
            difference = record["methods"][m]["paired"][reference]["tasks"].get(name)
            cells.append("" if difference is None else paired_text(difference))
        label = f"{name} (held-in)" if info["held_in"] else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for key, label in (("held_in_mean", "held-in mean"), ("held_out_mean", "held-out mean")):
        cells = []
        for m in methods:
            difference = record["methods"][m]["paired"][reference][key]
            cells.append(
                ""
                if difference is None
                else f"**{paired_text(difference)}** p={difference['p_value']:.2g}"
            )
        lines.append(f"| **{label}** | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_means(record: dict[str, Any], path: Path) -> Path:
    """Bar chart: held-in and held-out mean accuracy per method, with standard errors; beside
    it, when the base ran, every method's paired mean difference from the base with its
    bootstrap interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if m in record.get("methods", {})]
    compared = [m for m in methods if "base" in record["methods"][m].get("paired", {})]
    panels = 2 if compared else 1
    fig, axes = plt.subplots(
        1, panels, figsize=(panels * max(6.0, 1.1 * len(methods)), 4.0), squeeze=False
    )
    ax = axes[0][0]
    width = 0.38
    for offset, key, label in (
        (-width / 2, "held_in_mean", "held-in"),
        (width / 2, "held_out_mean", "held-out"),
    ):
        xs, ys, errs = [], [], []
        for i, m in enumerate(methods):
            mean = record["methods"][m].get(key)
            if mean is not None:
                xs.append(i + offset)
                ys.append(mean["accuracy"])
                errs.append(mean["stderr"])
        if xs:
            ax.bar(xs, ys, width, yerr=errs, capsize=3, label=label)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=30, ha="right")
    ax.set_ylabel("mean accuracy (rank classification)")
    machine = record.get("machine", {})
    ax.set_title(f"Zero-shot benchmark, {machine.get('date', '')[:10]}", fontsize=10)
    ax.set_ylim(0, 1)
    ax.legend()
    if compared:
        _plot_paired(axes[0][1], record, compared, "base")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_paired(ax: Any, record: dict[str, Any], methods: Sequence[str], reference: str) -> None:
    """Held-in and held-out mean differences from `reference` (points) with their intervals."""
    width = 0.38
    for offset, key, label in (
        (-width / 2, "held_in_mean", "held-in"),
        (width / 2, "held_out_mean", "held-out"),
    ):
        xs, ys, below, above = [], [], [], []
        for i, m in enumerate(methods):
            difference = record["methods"][m]["paired"][reference][key]
            if difference is not None:
                xs.append(i + offset)
                ys.append(100 * difference["delta"])
                below.append(100 * (difference["delta"] - difference["low"]))
                above.append(100 * (difference["high"] - difference["delta"]))
        if xs:
            ax.errorbar(xs, ys, yerr=[below, above], fmt="o", capsize=3, label=label)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=30, ha="right")
    ax.set_xlim(-0.6, len(methods) - 0.4)
    confidence = record.get("paired_statistics", PAIRED_SETTINGS)["confidence"]
    ax.set_ylabel(f"mean difference from {reference} (points)")
    ax.set_title(
        f"Paired difference from {reference}, {confidence:.0%} bootstrap interval", fontsize=10
    )
    ax.legend()

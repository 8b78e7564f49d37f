"""Routing cost: what routing over N experts adds to a forward pass, against the base model.

Configurations (random experts of rank r on every target linear; only shapes matter here):
- `base`: the model alone;
- `lora`: one PEFT LoRA adapter;
- `phatgoose`: the platform's `RoutedLinear` + PHATGOOSE router, top-k of N;
- `spectr`: the same experts and layer with SpectR's router (`SpectralRouter` over the
  random factors' right singular vectors), top-k of N;
- `smear`: the same experts and layer, SMEAR-style: per example, every expert's update
  merged with weights from the prompt (`PromptRouter`, decided once per sequence);
- `dense`: the same router, every expert computed and masked (`dense_reference`, a
  reference implementation that lives in benchmarks/ only; float32 only);
- `arrow_peft`: PEFT's own Arrow (`ArrowConfig`), top-k of N adapters.
Each in every requested compute precision (`phatgoose.precision`: float32 and bfloat16 by
default; `compute_in` around the timed forwards, entered once, so its bfloat16 copies of
the frozen matrices are made before timing), the base model in the same precision.

How it is measured (see docs/benchmarks.md):
- each configuration runs in a fresh process (spawned), so its memory is its own; one that
  runs past `config_timeout_s` is stopped and reported as not finished;
- latency: median over `repeats` forwards after `warmup` forwards, batch x seq random
  tokens, `use_cache=False`, logits for the last position only (as rank classification
  and generation need); no gradients;
- one token (cached generation): median over `decode_repeats` forwards of one token per
  sequence after the `seq_len`-token prompt is in the KV cache (cropped back after each);
- the base model is timed in the same process, interleaved forward by forward with the
  configuration (adapters switched off / routed linears swapped out between forwards), so
  the ratio to the base is robust to other load on the machine;
- memory: the process's peak resident set (`getrusage` max RSS), and the extra over the
  peak reached by the base model's own forwards in that process; this sees every
  allocation, torch's included;
- floor: arithmetic per token, base FLOPs (2 n d per linear, attention at the causal mean
  context, the LM head on one position per sequence; for one cached token, attention over
  the whole context and the head on that token) + per routed module 2 N n (affinity; SpectR
  scores against all N r singular vectors: 2 N r n) + 2 k r (n + d) (the k selected
  low-rank products; SMEAR-style: 2 N r (n + d), every expert's, and no per-token
  affinity); `measured_over_floor` =
  (latency ratio) / (floor ratio).
Also, per precision: the time of one gate-training step against one LoRA step (same
batch), the per-expert totals with gates at a tenth of the LoRA steps, and the bfloat16 /
float32 speed-ups of the base, LoRA and PHATGOOSE forwards and of both training steps.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import logging
import math
import multiprocessing
import resource
import statistics
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from benchmarks.dense_reference import DenseRoutedLinear
from benchmarks.machine import load_average, machine_info
from phatgoose.data import Example
from phatgoose.models import (
    DEFAULT_BASE_MODEL,
    default_target_modules,
    linear_module_paths,
    load_base_model,
)
from phatgoose.precision import PRECISIONS, compute_in, resolve_precision
from phatgoose.routing.layer import RoutedLinear
from phatgoose.routing.model import install_prompt_hooks
from phatgoose.routing.routers import PromptDecisions, PromptRouter, SpectralRouter, TokenRouter
from phatgoose.routing.rows import spectral_basis
from phatgoose.training import TrainingConfig, train_expert, train_gates

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("lora", "phatgoose", "spectr", "smear", "dense", "arrow_peft")
DEFAULT_IMPLEMENTATIONS = IMPLEMENTATIONS  # every one, as the CLI default
# Top-k routers over random experts in the platform's routed linear, by router.
ROUTED_IMPLEMENTATIONS = ("phatgoose", "spectr", "smear")
# The dense reference keeps its own stacks, which `compute_in` does not copy to bfloat16
# (autocast would recast every expert's factors on every forward): float32 only.
FLOAT32_ONLY = ("dense",)
ModelFactory = Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]]


@dataclass
class RoutingCostConfig:
    base_model: str = DEFAULT_BASE_MODEL
    batch_size: int = 4
    seq_len: int = 128
    repeats: int = 5
    warmup: int = 1
    n_experts: list[int] = field(default_factory=lambda: [8, 32, 166, 512])
    implementations: list[str] = field(default_factory=lambda: list(DEFAULT_IMPLEMENTATIONS))
    # Compute precisions (`phatgoose.precision`), each resolved and recorded; `auto` is
    # this machine's choice.
    precisions: list[str] = field(default_factory=lambda: ["float32", "bfloat16"])
    decode: bool = True  # also time one token per sequence with the prompt in the KV cache
    decode_repeats: int = 20
    rank: int = 16
    top_k: int = 2
    threads: int | None = None
    # A configuration whose expert weights would need more than this share of the
    # machine's available memory is skipped (and reported as skipped).
    memory_fraction: float = 0.6
    # The dense reference and PEFT's Arrow compute all N experts: above this N they are
    # skipped (reported as such) to keep the run's time bounded. None: no limit.
    reference_max_n: int | None = 166
    train_steps: int = 3  # timed steps of LoRA and of gate training (after one warm-up step)
    paper_lora_steps: int = 1000  # for the per-expert totals (gates: a tenth)
    # A configuration's process still running after this many seconds is stopped and
    # reported as not finished (PEFT's Arrow at large N). None: no limit.
    config_timeout_s: float | None = 3600.0
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [i for i in self.implementations if i not in IMPLEMENTATIONS]
        if unknown:
            raise ValueError(f"unknown implementations {unknown}; expected {list(IMPLEMENTATIONS)}")
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown or not self.precisions:
            raise ValueError(f"precisions must be among {list(PRECISIONS)}, got {self.precisions}")
        if any(n < self.top_k for n in self.n_experts):
            raise ValueError(f"every N must be >= top_k={self.top_k}, got {self.n_experts}")
        if self.repeats < 1 or self.warmup < 0 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError("repeats >= 1, warmup >= 0, batch_size >= 1, seq_len >= 2")
        if self.decode_repeats < 1:
            raise ValueError("decode_repeats >= 1")


# --------------------------------------------------------------------------- arithmetic
@dataclass(frozen=True)
class Shapes:
    """What the FLOP floor needs: target linears `(n, d)` and the attention/head sizes."""

    linears: list[tuple[int, int]]
    layers: int
    attention_width: int  # heads x head_dim
    hidden: int
    vocab: int

    @classmethod
    def of(cls, model: nn.Module) -> Shapes:
        modules = dict(model.named_modules())
        linears = [
            (modules[p].in_features, modules[p].out_features) for p in linear_module_paths(model)
        ]
        config: Any = model.config  # a transformers config (the model is typed nn.Module)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            linears=linears,
            layers=config.num_hidden_layers,
            attention_width=heads * head_dim,
            hidden=config.hidden_size,
            vocab=config.vocab_size,
        )

    def base_flops(self, seq_len: int) -> float:
        """Per token: linears, attention scores and values at the causal mean context, and
        the LM head on one position per sequence."""
        linears = sum(2 * n * d for n, d in self.linears)
        context = (seq_len + 1) / 2
        attention = self.layers * 2 * 2 * context * self.attention_width
        head = 2 * self.hidden * self.vocab / seq_len
        return linears + attention + head

    def decode_flops(self, context: int) -> float:
        """Per generated token with `context` positions cached: linears, attention over the
        whole context, and the LM head on that token."""
        linears = sum(2 * n * d for n, d in self.linears)
        attention = self.layers * 2 * 2 * (context + 1) * self.attention_width
        return linears + attention + 2 * self.hidden * self.vocab

    def extra_flops(self, implementation: str, n_experts: int, rank: int, top_k: int) -> float:
        """Per token, what a configuration adds to the base at its arithmetic minimum."""
        if implementation == "base":
            return 0.0
        if implementation == "lora":
            return sum(2 * rank * (n + d) for n, d in self.linears)
        if implementation == "spectr":
            # Scores against every expert's r right singular vectors, then the k products.
            return sum(
                2 * n_experts * rank * n + 2 * top_k * rank * (n + d) for n, d in self.linears
            )
        if implementation == "smear":
            # Every expert's product for every token. The affinities are computed once per
            # example (2 N n), which spread over a prompt's tokens is left out.
            return sum(2 * n_experts * rank * (n + d) for n, d in self.linears)
        # Routing floor (phatgoose, and Arrow's sparse minimum): affinities + k products.
        return sum(2 * n_experts * n + 2 * top_k * rank * (n + d) for n, d in self.linears)

    def dense_flops(self, n_experts: int, rank: int) -> float:
        """Per token, what computing all N experts adds (the dense reference's arithmetic)."""
        return sum(2 * n_experts * n + 2 * n_experts * rank * (n + d) for n, d in self.linears)

    def expert_bytes(self, rank: int) -> int:
        """float32 bytes of one expert's A and B over every target linear."""
        return sum(4 * rank * (n + d) for n, d in self.linears)

    def spectral_bytes(self, rank: int) -> int:
        """float32 bytes of one expert's SpectR router rows (r x n) over every target linear."""
        return sum(4 * rank * n for n, _ in self.linears)


# ---------------------------------------------------------------------- configurations
def random_routed_layers(
    model: nn.Module,
    n_experts: int,
    rank: int,
    top_k: int,
    seed: int,
    *,
    router: str = "phatgoose",
    decisions: PromptDecisions | None = None,
) -> dict[str, RoutedLinear]:
    """Random experts as the platform's routed linears (not installed yet).

    Built directly as stacked tensors (no Expert objects, no copies): `A [N, r, n]`,
    `B [N, d, r]` (a transposed view of `[N, r, d]`, so the dense reference can flatten
    it without copying), gate rows `[N, n]`; every expert's weights are distinct.
    `router`: "phatgoose" (a `TokenRouter` over the gate rows) or "spectr" (a
    `SpectralRouter`, uniform weights, over the factors' right singular vectors; the same
    experts as "phatgoose" for the same seed) or "smear" (a `PromptRouter` merging every
    expert, deciding through `decisions`, whose hooks the caller installs).
    """
    if router not in ROUTED_IMPLEMENTATIONS:
        raise ValueError(f"router must be one of {list(ROUTED_IMPLEMENTATIONS)}, got {router!r}")
    if (router == "smear") != (decisions is not None):
        raise ValueError("decisions= is for router 'smear', and it needs them")
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    layers = {}
    for path in linear_module_paths(model):
        base = modules[path]
        n, d = base.in_features, base.out_features
        lora_a = torch.randn(n_experts, rank, n, generator=generator) / math.sqrt(n)
        lora_b = torch.randn(n_experts, rank, d, generator=generator) / (4 * math.sqrt(rank))
        rows = torch.randn(n_experts, n, generator=generator)  # drawn for both: same experts
        lora_b = lora_b.transpose(1, 2)
        chooser: nn.Module
        if router == "spectr":
            chooser = SpectralRouter(spectral_basis(lora_a, lora_b), top_k)
        elif decisions is not None:
            chooser = PromptRouter(rows, None, decisions, path=path)
        else:
            chooser = TokenRouter(rows, top_k)
        layers[path] = RoutedLinear(base, lora_a, lora_b, chooser, path=path)
    return layers


@contextmanager
def swapped(model: nn.Module, layers: Mapping[str, nn.Module]) -> Iterator[None]:
    """Within the block, `layers` replace the model's modules at their paths."""
    originals = {path: model.get_submodule(path) for path in layers}
    for path, layer in layers.items():
        _set(model, path, layer)
    try:
        yield
    finally:
        for path, layer in originals.items():
            _set(model, path, layer)


@contextmanager
def prompt_routed(
    model: nn.Module, layers: Mapping[str, nn.Module], decisions: PromptDecisions
) -> Iterator[None]:
    """`swapped`, for prompt-level routers: each new sequence (a forward without a filled
    cache) decides again, as in a model `build_routed_model` routed."""
    with swapped(model, layers):
        hooks = install_prompt_hooks(model, decisions)
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def peft_lora_config(targets: list[str], rank: int, **kwargs: Any) -> Any:
    from peft import LoraConfig

    # init_lora_weights=False: random A and B (PEFT's default B = 0 would make no difference
    # to the cost, but random weights make the adapters real).
    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=targets,
        init_lora_weights=False,
        **kwargs,
    )


@dataclass
class Prepared:
    """A configuration ready to time: the model to call and how to run it as the base."""

    model: nn.Module
    configured: Callable[[], AbstractContextManager[Any]]  # the configuration switched on
    as_base: Callable[[], AbstractContextManager[Any]]  # the same model as the base model
    # Modules swapped into `model` only while configured: `compute_in` must see them too.
    outside: nn.Module | None = None


def prepare(
    model: PreTrainedModel, implementation: str, n_experts: int, config: RoutingCostConfig
) -> Prepared:
    if implementation == "base":
        return Prepared(model, nullcontext, nullcontext)
    if implementation in (*ROUTED_IMPLEMENTATIONS, "dense"):
        router = implementation if implementation in ROUTED_IMPLEMENTATIONS else "phatgoose"
        decisions = PromptDecisions() if router == "smear" else None
        routed = random_routed_layers(
            model, n_experts, config.rank, config.top_k, config.seed, router=router,
            decisions=decisions,
        )  # fmt: skip
        layers: Mapping[str, nn.Module] = routed
        if implementation == "dense":
            layers = {path: DenseRoutedLinear(layer) for path, layer in routed.items()}
        configured = functools.partial(swapped, model, layers)
        if decisions is not None:
            configured = functools.partial(prompt_routed, model, layers, decisions)
        return Prepared(model, configured, nullcontext, outside=nn.ModuleList(layers.values()))
    from peft import get_peft_model

    targets = default_target_modules(model)  # before PEFT wraps the linears
    if implementation == "lora":
        peft_model = get_peft_model(model, peft_lora_config(targets, config.rank))
        return Prepared(peft_model, nullcontext, peft_model.disable_adapter)
    if implementation == "arrow_peft":
        from peft import ArrowConfig

        # What `peft.create_arrow_model` does, with adapters made in memory instead of
        # loaded from N directories: N task adapters, then the "arrow_router" adapter.
        peft_model = get_peft_model(
            model, peft_lora_config(targets, config.rank), adapter_name="task_0"
        )
        add_task_adapters(peft_model, n_experts, targets, config.rank)
        arrow = ArrowConfig(top_k=config.top_k, rng_seed=config.seed)
        arrow.task_adapter_names = [f"task_{i}" for i in range(n_experts)]
        arrow.gks_adapter_names = []
        peft_model.add_adapter(
            "arrow_router", peft_lora_config(targets, config.rank, arrow_config=arrow)
        )
        peft_model.set_adapter("arrow_router")
        return Prepared(peft_model, nullcontext, peft_model.disable_adapter)
    raise ValueError(f"unknown implementation {implementation!r}")


def add_task_adapters(peft_model: Any, n_experts: int, targets: list[str], rank: int) -> None:
    """Adapters `task_1 .. task_{N-1}` beside `task_0`, as `PeftModel.add_adapter` adds
    them, in the same order (so with the same weights), in O(N) instead of O(N^2).

    `add_adapter` walks every module of a tree that grows with each adapter: N = 8 took
    7.7 s, N = 32 66 s, and N = 166 would take about 30 minutes on one core before the
    first forward. For a LoRA layer that exists already, its injection comes down to
    `LoraLayer.update_layer`, which this calls directly, once per layer and adapter.
    """
    from peft.tuners.lora import LoraLayer

    lora_layers = [
        (path, module)
        for path, module in peft_model.base_model.model.named_modules()
        if isinstance(module, LoraLayer)
    ]
    for i in range(1, n_experts):
        name = f"task_{i}"
        lora_config = peft_lora_config(targets, rank)
        peft_model.peft_config[name] = lora_config
        for path, layer in lora_layers:
            layer.update_layer(
                name, rank, lora_alpha=lora_config.lora_alpha, target_name=path, config=lora_config
            )


# --------------------------------------------------------------------------- measuring
def max_rss_mb() -> float:
    """Peak resident set of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def available_memory_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def measure_configuration(
    implementation: str,
    n_experts: int,
    precision_name: str,
    config: RoutingCostConfig,
    model_factory: ModelFactory,
) -> dict[str, Any]:
    """Latency of one configuration and of the base model, interleaved, plus memory, in
    one compute precision; with `config.decode`, also per token of cached generation."""
    if config.threads:
        torch.set_num_threads(config.threads)
    precision = resolve_precision(precision_name)
    torch.manual_seed(config.seed)
    model, _ = model_factory()
    model.eval()
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (config.batch_size, config.seq_len))
    attention_mask = torch.ones_like(input_ids)

    def forward(target: nn.Module) -> float:
        start = time.perf_counter()
        target(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            logits_to_keep=1,
        )
        return time.perf_counter() - start

    with torch.no_grad(), compute_in(precision, model):
        for _ in range(max(1, config.warmup)):
            forward(model)
    rss_base = max_rss_mb()
    started = time.perf_counter()
    prepared = prepare(model, implementation, n_experts, config)
    build_seconds = time.perf_counter() - started

    outside = prepared.outside if prepared.outside is not None else nn.Module()
    with torch.no_grad(), compute_in(precision, prepared.model), compute_in(precision, outside):
        with prepared.configured():
            for _ in range(config.warmup):
                forward(prepared.model)
        base_times, times = [], []
        for _ in range(config.repeats):
            with prepared.as_base():
                base_times.append(forward(prepared.model))
            with prepared.configured():
                times.append(forward(prepared.model))
        decode = decode_times(prepared, input_ids, config) if config.decode else None
    latency, base_latency = statistics.median(times), statistics.median(base_times)
    tokens = config.batch_size * config.seq_len
    result = {
        "implementation": implementation,
        "n_experts": n_experts if implementation not in ("base", "lora") else None,
        "precision": precision.name,
        "precision_record": precision.record(),
        "latency_s": latency,
        "base_latency_s": base_latency,
        "ratio_to_base": latency / base_latency,
        "tokens_per_s": tokens / latency,
        "times_s": times,
        "base_times_s": base_times,
        "build_s": build_seconds,
        "peak_rss_mb": max_rss_mb(),
        "extra_rss_mb": max_rss_mb() - rss_base,
        "status": "ok",
    }
    if decode is not None:
        decode_base, decode_configured = decode
        result.update(
            decode_latency_s=statistics.median(decode_configured),
            decode_base_latency_s=statistics.median(decode_base),
            decode_ratio_to_base=statistics.median(decode_configured)
            / statistics.median(decode_base),
            decode_times_s=decode_configured,
            decode_base_times_s=decode_base,
        )
    return result


def decode_times(
    prepared: Prepared, input_ids: torch.Tensor, config: RoutingCostConfig
) -> tuple[list[float], list[float]]:
    """Seconds per forward of one new token per sequence with the prompt in the KV cache,
    for the base model and the configuration, interleaved. Each has its own prompt cache
    (routed key/value projections fill it differently), cropped back after every step."""
    from transformers import DynamicCache

    next_token = input_ids[:, -1:]
    caches = {}
    for name, switch in (("base", prepared.as_base), ("configured", prepared.configured)):
        with switch():
            cache = DynamicCache()
            prepared.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
            caches[name] = cache

    def step(name: str) -> float:
        cache = caches[name]
        start = time.perf_counter()
        prepared.model(input_ids=next_token, cache=cache, use_cache=True, logits_to_keep=1)
        seconds = time.perf_counter() - start
        cache.crop(-1)  # back to the prompt
        return seconds

    times: dict[str, list[float]] = {"base": [], "configured": []}
    for repeat in range(config.decode_repeats + 1):  # the first round warms up
        for name, switch in (("base", prepared.as_base), ("configured", prepared.configured)):
            with switch():
                seconds = step(name)
            if repeat:
                times[name].append(seconds)
    return times["base"], times["configured"]


def measure_training_steps(
    config: RoutingCostConfig, model_factory: ModelFactory, precision_name: str = "float32"
) -> dict[str, Any]:
    """Seconds per LoRA step and per gate step (same batch) in one compute precision, and
    per-expert totals."""
    if config.threads:
        torch.set_num_threads(config.threads)
    precision = resolve_precision(precision_name)
    model, tokenizer = model_factory()
    generator = torch.Generator().manual_seed(config.seed)
    vocab = min(model.config.vocab_size, len(tokenizer))
    examples = []
    for _ in range(4 * config.batch_size):
        ids = torch.randint(0, vocab, (config.seq_len,), generator=generator).tolist()
        prompt = tokenizer.decode(ids)
        assert isinstance(prompt, str)  # one sequence of ids decodes to one text
        examples.append(Example(prompt=prompt, target="yes"))

    def settings(steps: int) -> TrainingConfig:
        return TrainingConfig(
            r=config.rank,
            lora_alpha=2.0 * config.rank,
            steps=steps,
            gate_steps=steps,
            batch_size=config.batch_size,
            max_length=config.seq_len,
            validation_fraction=0.0,
            seed=config.seed,
            precision=precision.name,
        )

    def timed_lora(steps: int) -> tuple[float, Any]:
        start = time.perf_counter()
        expert = train_expert(
            model, tokenizer, examples, name="timing", config=settings(steps), progress=False
        )
        return time.perf_counter() - start, expert

    _, expert = timed_lora(1)  # warm-up
    lora_seconds, expert = timed_lora(config.train_steps)
    train_gates(model, tokenizer, expert, examples, config=settings(1), progress=False)
    start = time.perf_counter()
    train_gates(
        model, tokenizer, expert, examples, config=settings(config.train_steps), progress=False
    )
    gate_seconds = time.perf_counter() - start
    lora_step = lora_seconds / config.train_steps
    gate_step = gate_seconds / config.train_steps
    lora_steps = config.paper_lora_steps
    gate_steps = math.ceil(lora_steps / 10)
    return {
        "precision": precision.name,
        "precision_record": precision.record(),
        "batch": [config.batch_size, config.seq_len],
        "rank": config.rank,
        "timed_steps": config.train_steps,
        "lora_step_s": lora_step,
        "gate_step_s": gate_step,
        "gate_over_lora_step": gate_step / lora_step,
        "lora_steps": lora_steps,
        "gate_steps": gate_steps,
        "lora_total_s": lora_step * lora_steps,
        "gate_total_s": gate_step * gate_steps,
        "gate_over_lora_total": gate_step * gate_steps / (lora_step * lora_steps),
        "status": "ok",
    }


Task = tuple[str, int, str]  # (implementation or "training", N, precision)


def _worker(task: Task, config: RoutingCostConfig, factory: ModelFactory, queue: Any) -> None:
    try:
        implementation, n, precision = task
        if implementation == "training":
            result = measure_training_steps(config, factory, precision)
        else:
            result = measure_configuration(implementation, n, precision, config, factory)
    except BaseException as error:  # report any failure (MemoryError included) to the parent
        result = {
            "status": "failed",
            "error": f"{type(error).__name__}: {error}",
            "trace": traceback.format_exc(limit=3),
        }
    queue.put(result)


def _run_isolated(task: Task, config: RoutingCostConfig, factory: ModelFactory) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_worker, args=(task, config, factory, queue))
    timeout = config.config_timeout_s
    deadline = None if timeout is None else time.monotonic() + timeout
    process.start()
    result = None
    while result is None:
        # Wake at the deadline, not only every 5 s: a short limit must stop a fast worker.
        wait = 5.0 if deadline is None else max(0.0, min(5.0, deadline - time.monotonic()))
        try:
            result = queue.get(timeout=wait)
        except Exception:  # queue.Empty: is the worker still alive, and within its time?
            if not process.is_alive():
                result = {
                    "status": "failed",
                    "error": f"worker exited with code {process.exitcode} "
                    "(killed, e.g. out of memory?)",
                }
            elif deadline is not None and time.monotonic() >= deadline:
                process.terminate()
                result = {
                    "status": "not finished",
                    "error": f"stopped after {timeout:.0f} s (config_timeout_s) "
                    "before its timed forwards were done",
                }
    process.join()
    return result


def _run_in_process(task: Task, config: RoutingCostConfig, factory: ModelFactory) -> dict[str, Any]:
    queue: list[dict[str, Any]] = []

    class _ListQueue:
        def put(self, item: dict[str, Any]) -> None:
            queue.append(item)

    _worker(task, config, factory, _ListQueue())
    gc.collect()
    return queue[0]


# ------------------------------------------------------------------------------ runner
def default_factory(name: str) -> ModelFactory:
    return functools.partial(load_base_model, name)


def run_routing_cost(
    config: RoutingCostConfig,
    *,
    model_factory: ModelFactory | None = None,
    isolate: bool = True,
    training: bool = True,
    output: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure every configuration in every precision; returns (and writes to `output`)
    the result record.

    `isolate=False` runs everything in this process (for tests: memory figures then
    include earlier configurations).
    """
    factory = model_factory or default_factory(config.base_model)
    model, _ = factory()
    shapes = Shapes.of(model)
    del model
    gc.collect()
    base_flops = shapes.base_flops(config.seq_len)
    decode_flops = shapes.decode_flops(config.seq_len)
    # `auto` is decided here, once, and recorded; a precision asked for twice runs once.
    resolved = {name: resolve_precision(name) for name in config.precisions}
    precisions = list(dict.fromkeys(p.name for p in resolved.values()))
    record: dict[str, Any] = {
        "benchmark": "routing-cost",
        "machine": machine_info(),
        "config": dataclasses.asdict(config),
        "precisions": {name: p.record() for name, p in resolved.items()},
        "isolated_processes": isolate,
        "shapes": {
            "target_linears": len(shapes.linears),
            "base_flops_per_token": base_flops,
            "decode_flops_per_token": decode_flops,
            "expert_mb": shapes.expert_bytes(config.rank) / 2**20,
        },
        "results": [],
        "training": {},
    }

    tasks: list[Task] = []
    for precision in precisions:
        tasks.append(("base", 0, precision))
        if "lora" in config.implementations:
            tasks.append(("lora", 1, precision))
        for n in config.n_experts:
            tasks += [(i, n, precision) for i in config.implementations if i != "lora"]
        if training:
            tasks.append(("training", 0, precision))
    run = _run_isolated if isolate else _run_in_process

    def save() -> None:
        record["machine"]["load_average_end"] = load_average()
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(record, indent=2) + "\n")

    bar = tqdm(tasks, desc="routing cost", disable=not progress)
    for implementation, n, precision in bar:
        bar.set_postfix_str(f"{implementation} N={n} {precision}")
        if implementation == "training":
            record["training"][precision] = run((implementation, n, precision), config, factory)
            save()
            continue
        result: dict[str, Any] = {
            "implementation": implementation,
            "n_experts": n if implementation not in ("base", "lora") else None,
            "precision": precision,
        }
        skipped = skip_reason(implementation, n, precision, config, shapes)
        if skipped:
            result.update(status="skipped", error=skipped)
        else:
            result.update(run((implementation, n, precision), config, factory))
            result["load_average"] = load_average()
        result["expert_weights_mb"] = _weights_mb(implementation, n, config, shapes)
        extra = shapes.extra_flops(implementation, n, config.rank, config.top_k)
        result["floor_ratio"] = 1 + extra / base_flops
        if config.decode:
            result["decode_floor_ratio"] = 1 + extra / decode_flops
        if implementation == "dense":
            result["dense_flops_ratio"] = 1 + shapes.dense_flops(n, config.rank) / base_flops
        if result.get("status") == "ok":
            result["measured_over_floor"] = result["ratio_to_base"] / result["floor_ratio"]
            if "decode_ratio_to_base" in result:
                result["decode_measured_over_floor"] = (
                    result["decode_ratio_to_base"] / result["decode_floor_ratio"]
                )
        record["results"].append(result)
        save()

    record["growth"] = {
        precision: growth([r for r in record["results"] if r["precision"] == precision], config)
        for precision in precisions
    }
    record["speedups"] = bf16_speedups(record)
    save()
    return record


def _weights_mb(implementation: str, n: int, config: RoutingCostConfig, shapes: Shapes) -> float:
    if implementation in ("base", "lora"):
        return 0.0
    per_expert = shapes.expert_bytes(config.rank)
    if implementation == "spectr":
        per_expert += shapes.spectral_bytes(config.rank)  # the router's rows, beside A and B
    return n * per_expert / 2**20


def skip_reason(
    implementation: str, n: int, precision: str, config: RoutingCostConfig, shapes: Shapes
) -> str | None:
    """Why a configuration is not measured (reported as skipped), or None."""
    if implementation in FLOAT32_ONLY and precision != "float32":
        return "the dense reference runs in float32 only"
    if (
        implementation in ("dense", "arrow_peft")
        and config.reference_max_n is not None
        and n > config.reference_max_n
    ):
        return f"N above reference_max_n={config.reference_max_n} (computes all N)"
    # bfloat16 keeps the float32 stacks and adds half-size copies while it runs.
    weights_mb = _weights_mb(implementation, n, config, shapes)
    weights_mb *= 1.5 if precision == "bfloat16" else 1.0
    available = available_memory_mb()
    if available is not None and weights_mb > config.memory_fraction * available:
        return (
            f"expert weights need {weights_mb:.0f} MB; {available:.0f} MB available "
            f"(limit {config.memory_fraction:.0%})"
        )
    return None


def growth(results: list[dict[str, Any]], config: RoutingCostConfig) -> dict[str, Any]:
    """Per implementation, ratio at the largest N over ratio at the smallest (and the floor's)."""
    if len(config.n_experts) < 2:
        return {}
    low, high = min(config.n_experts), max(config.n_experts)
    out = {}
    for implementation in ("phatgoose", "spectr", "smear", "dense", "arrow_peft"):
        rows = {r["n_experts"]: r for r in results if r["implementation"] == implementation}
        a, b = rows.get(low), rows.get(high)
        if a and b and a.get("status") == "ok" and b.get("status") == "ok":
            out[implementation] = {
                "from": low,
                "to": high,
                "measured": b["ratio_to_base"] / a["ratio_to_base"],
                "floor": b["floor_ratio"] / a["floor_ratio"],
            }
    return out


def bf16_speedups(record: dict[str, Any]) -> dict[str, Any]:
    """float32 seconds over bfloat16 seconds, for every forward measured in both (the base
    model from its own configuration) and for the LoRA and gate training steps."""
    by_key: dict[tuple[str, int | None], dict[str, dict[str, Any]]] = {}
    for r in record["results"]:
        if r.get("status") == "ok":
            by_key.setdefault((r["implementation"], r["n_experts"]), {})[r["precision"]] = r
    forwards = []
    for (implementation, n), both in by_key.items():
        if "float32" in both and "bfloat16" in both:
            fp32, bf16 = both["float32"], both["bfloat16"]
            row: dict[str, Any] = {
                "implementation": implementation,
                "n_experts": n,
                "forward": fp32["latency_s"] / bf16["latency_s"],
            }
            if "decode_latency_s" in fp32 and "decode_latency_s" in bf16:
                row["one_token"] = fp32["decode_latency_s"] / bf16["decode_latency_s"]
            forwards.append(row)
    out: dict[str, Any] = {"forwards": forwards}
    training = record.get("training", {})
    fp32_steps, bf16_steps = training.get("float32", {}), training.get("bfloat16", {})
    if fp32_steps.get("status") == "ok" and bf16_steps.get("status") == "ok":
        out["lora_step"] = fp32_steps["lora_step_s"] / bf16_steps["lora_step_s"]
        out["gate_step"] = fp32_steps["gate_step_s"] / bf16_steps["gate_step_s"]
    return out


# ----------------------------------------------------------------------------- reports
def markdown_table(record: dict[str, Any]) -> str:
    """The results as markdown: one row per configuration and precision (with one token
    of cached generation when measured), the training steps, and the bfloat16 speed-ups."""
    lines = [
        "| precision | implementation | N | latency (s) | ratio to base | floor ratio "
        "| measured / floor | 1 token: ratio | 1 token: floor | 1 token: measured / floor "
        "| tokens/s | peak RSS (MB) | extra RSS (MB) | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["results"]:

        def fmt(key: str, spec: str, row: dict[str, Any] = r) -> str:
            value = row.get(key)
            return "" if value is None else format(value, spec)

        lines.append(
            f"| {r.get('precision', '')} | {r['implementation']} | {r.get('n_experts') or ''} "
            f"| {fmt('latency_s', '.3f')} | {fmt('ratio_to_base', '.2f')} "
            f"| {fmt('floor_ratio', '.3f')} | {fmt('measured_over_floor', '.2f')} "
            f"| {fmt('decode_ratio_to_base', '.2f')} | {fmt('decode_floor_ratio', '.3f')} "
            f"| {fmt('decode_measured_over_floor', '.2f')} | {fmt('tokens_per_s', '.0f')} "
            f"| {fmt('peak_rss_mb', '.0f')} | {fmt('extra_rss_mb', '.0f')} | {r.get('status')}"
            + (f": {r['error']}" if r.get("error") else "")
            + " |"
        )
    training = {p: t for p, t in record.get("training", {}).items() if t.get("status") == "ok"}
    if training:
        lines += [
            "",
            "| precision | step | seconds per step | steps per expert | seconds per expert |",
            "|---|---|---|---|---|",
        ]
        for precision, t in training.items():
            lines += [
                f"| {precision} | LoRA | {t['lora_step_s']:.2f} | {t['lora_steps']} "
                f"| {t['lora_total_s']:.0f} |",
                f"| {precision} | gates | {t['gate_step_s']:.2f} | {t['gate_steps']} "
                f"| {t['gate_total_s']:.0f} |",
            ]
        lines.append("")
        lines += [
            f"{precision}: gate step / LoRA step {t['gate_over_lora_step']:.2f}; per expert "
            f"(gates at a tenth of the steps): {t['gate_over_lora_total']:.3f}."
            for precision, t in training.items()
        ]
    for precision, t in record.get("training", {}).items():
        if t.get("status") != "ok":
            lines += ["", f"{precision} training steps: {t.get('status')}: {t.get('error')}"]
    speedups = record.get("speedups", {})
    if speedups.get("forwards") or "lora_step" in speedups:
        lines += [
            "",
            "bfloat16 speed-up (float32 seconds / bfloat16 seconds):",
            "",
            "| what | N | forward | 1 token |",
            "|---|---|---|---|",
        ]
        for row in speedups.get("forwards", []):
            one = row.get("one_token")
            lines.append(
                f"| {row['implementation']} | {row['n_experts'] or ''} | {row['forward']:.2f} "
                f"| {'' if one is None else format(one, '.2f')} |"
            )
        for step in ("lora_step", "gate_step"):
            if step in speedups:
                lines.append(f"| {step.replace('_', ' ')} | | {speedups[step]:.2f} | |")
    return "\n".join(lines) + "\n"


def plot(record: dict[str, Any], path: Path) -> Path:
    """Latency ratio to the base model (same precision) against N, per implementation and
    precision, with the floors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    results = record["results"]
    precisions = list(dict.fromkeys(r.get("precision", "float32") for r in results))
    for precision, line in zip(precisions, ("-", "--"), strict=False):
        for implementation, marker in (
            ("phatgoose", "o"),
            ("spectr", "D"),
            ("smear", "v"),
            ("dense", "s"),
            ("arrow_peft", "^"),
        ):
            rows = [
                r
                for r in results
                if r["implementation"] == implementation
                and r.get("precision", "float32") == precision
                and r.get("status") == "ok"
            ]
            if rows:
                ax.plot(
                    [r["n_experts"] for r in rows],
                    [r["ratio_to_base"] for r in rows],
                    marker + line,
                    label=f"{implementation} ({precision})",
                )
    for implementation, style, label in (
        ("phatgoose", "k:", "floor (top-k routing)"),
        ("spectr", "k-.", "floor (SpectR: N r n scoring)"),
        ("smear", "k--", "floor (SMEAR-style: all N products)"),
    ):
        floor_rows = sorted(
            {
                r["n_experts"]: r
                for r in results
                if r["implementation"] == implementation and "floor_ratio" in r
            }.values(),
            key=lambda r: r["n_experts"],
        )
        if floor_rows:
            ax.plot(
                [r["n_experts"] for r in floor_rows],
                [r["floor_ratio"] for r in floor_rows],
                style,
                label=label,
            )
    for precision, line in zip(precisions, ("-", "--"), strict=False):
        lora = [
            r
            for r in results
            if r["implementation"] == "lora"
            and r.get("precision", "float32") == precision
            and r.get("status") == "ok"
        ]
        if lora:
            ax.axhline(
                lora[0]["ratio_to_base"],
                color="grey",
                lw=0.8,
                ls=line,
                label=f"one LoRA, PEFT ({precision})",
            )
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of experts N")
    ax.set_ylabel("forward latency / base model (same precision)")
    config = record["config"]
    ax.set_title(
        f"Routing cost, batch {config['batch_size']} x {config['seq_len']} tokens, "
        f"r={config['rank']}, top-{config['top_k']}",
        fontsize=10,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

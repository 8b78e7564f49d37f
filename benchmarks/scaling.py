"""The scaling curve (issue 17): does a bigger pool of experts help on held-out tasks?

The PHATGOOSE paper leaves open whether routing among more experts keeps helping. Here, from
a zero-shot run's settings and caches: the held-out mean accuracy of `phatgoose` and
`merged` over pools of 2, 4, 8 and all of the run's experts (for each size below all,
`pools_per_size` seeded random pools; the full pool once), each with its paired difference
from the base model on the same examples (`phatgoose.paired`: examples resampled within
each task, tasks as strata; McNemar's p-value on the pooled discordant examples).

Nothing is trained and nothing is scored another way: the experts come from the zero-shot
benchmark's expert cache (`task_expert`, cached only), and every score goes through the
zero-shot module's `evaluate_routed` and evaluation cache under `method_identity` of the
same method over the same experts. So the full pool and the base reuse the zero-shot run's
own held-out scores, and a pool that a smaller zero-shot run used is not scored twice.
Only held-out tasks are scored: the question is zero-shot generalisation.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from benchmarks.machine import cpu_model, load_average, machine_info
from benchmarks.zero_shot import (
    PAIRED_SETTINGS,
    EvaluationCache,
    NotCached,
    ZeroShotConfig,
    evaluate_routed,
    load_tasks,
    method_identity,
    paired_text,
    record_json,
    task_expert,
    with_resolved_precision,
)
from phatgoose.embeddings import Embedder
from phatgoose.evaluation import TaskResult, paired_outcomes
from phatgoose.expert import Expert
from phatgoose.models import load_base_model, model_fingerprint
from phatgoose.paired import paired_mean_difference
from phatgoose.pipeline import Say
from phatgoose.routing import build_routed_model
from protocol import BaseModelIdentity, is_method, method_spec

if TYPE_CHECKING:
    from benchmarks.catalog import BenchmarkCatalog

DEFAULT_SIZES = (2, 4, 8)  # the full pool is always added
DEFAULT_METHODS = ("phatgoose", "merged")
POOLS_PER_SIZE = 3


@dataclasses.dataclass(frozen=True)
class Pool:
    """Experts routed together: their held-in tasks, in the run's held-in order."""

    size: int
    experts: tuple[str, ...]


def draw_pools(
    experts: Sequence[str], sizes: Sequence[int], per_size: int, seed: int
) -> list[Pool]:
    """For each size below `len(experts)`, `per_size` distinct pools drawn at random (one
    `random.Random(seed)` for all sizes, in the order given), or every pool of that size
    when there are no more than `per_size`; then the full pool once. Sizes at or above
    the number of experts are the full pool. Members keep the order of `experts`, so a
    pool's cache identity does not depend on the draw."""
    if not experts:
        raise ValueError("the scaling curve needs experts; the configuration has none held in")
    if per_size < 1:
        raise ValueError(f"pools per size must be >= 1, got {per_size}")
    bad = [s for s in sizes if s < 1]
    if bad:
        raise ValueError(f"pool sizes must be >= 1, got {bad}")
    rng = random.Random(seed)
    n = len(experts)
    pools: list[Pool] = []
    for size in dict.fromkeys(s for s in sizes if s < n):
        if math.comb(n, size) <= per_size:
            chosen = [frozenset(c) for c in itertools.combinations(range(n), size)]
        else:
            chosen = []
            while len(chosen) < per_size:
                members = frozenset(rng.sample(range(n), size))
                if members not in chosen:
                    chosen.append(members)
        pools += [Pool(size, tuple(experts[i] for i in sorted(c))) for c in chosen]
    pools.append(Pool(n, tuple(experts)))
    return pools


def run_scaling(
    config: ZeroShotConfig,
    *,
    cache_dir: Path,
    catalog: BenchmarkCatalog | None = None,
    tasks_dir: Path | None = None,
    base_model: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None,
    embedder: Embedder | None = None,
    sizes: Sequence[int] = DEFAULT_SIZES,
    pools_per_size: int = POOLS_PER_SIZE,
    seed: int = 0,
    methods: Sequence[str] = DEFAULT_METHODS,
    device: str | torch.device = "cpu",
    output: Path | None = None,
    progress: bool = True,
    say: Say = print,
) -> dict[str, Any]:
    """Score every pool with every method on the held-out tasks (cached scores are read)
    and return the record; with `output`, it is written there after every pool.

    `config`, `cache_dir` and `catalog` are the zero-shot run's: its experts must be cached
    (`NotCached` otherwise, naming the command that trains them). `methods` are routing
    methods over experts without hyper-parameters (a method whose parameters the zero-shot
    run chooses on held-in tasks would need that choice per pool)."""
    for method in methods:
        if not is_method(method) or not method_spec(method).takes_experts:
            raise ValueError(f"{method!r} is not a routing method over experts")
        if method_spec(method).params:
            raise ValueError(
                f"{method!r} has hyper-parameters; the scaling curve takes methods without "
                "(phatgoose, merged, arrow, phatgoose_example, smear, average_activation, "
                "retrieval)"
            )
    started = time.perf_counter()
    tasks = load_tasks(config, tasks_dir)
    held_in = [t for t in tasks if t.held_in]
    held_out = [t for t in tasks if not t.held_in]
    if not held_out:
        raise ValueError("the scaling curve scores held-out tasks; the configuration has none")
    pools = draw_pools([t.name for t in held_in], sizes, pools_per_size, seed)
    selecting = [m for m in methods if method_spec(m).takes_top_k]
    too_small = sorted({p.size for p in pools if p.size < config.top_k})
    if selecting and too_small:
        raise ValueError(
            f"pool sizes {too_small} are below top_k={config.top_k}, which {selecting} "
            "select per token or example; give sizes of at least top_k"
        )

    model, tokenizer = base_model or load_base_model(config.base_model)
    base = BaseModelIdentity(name=config.base_model, fingerprint=model_fingerprint(model))
    device = torch.device(device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as the zero-shot run
    model.to(device)  # type: ignore[arg-type]  # transformers types its wrapped .to oddly
    # The zero-shot run's precision, resolved the same way: the same cached experts and scores.
    config, compute = with_resolved_precision(config, device)
    record: dict[str, Any] = {
        "benchmark": "zero-shot-scaling",
        "machine": machine_info(),
        "config": dataclasses.asdict(config),
        "precision": compute.record(),
        "device": {
            "device": str(device),
            "name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        },
        "methods": list(methods),
        "sizes": sorted({p.size for p in pools}),
        "pools_per_size": pools_per_size,
        "seed": seed,
        "tasks": {t.name: len(t.evaluation[: config.eval_limit]) for t in held_out},
        "paired_statistics": {
            **PAIRED_SETTINGS,
            "interval": "percentile bootstrap of examples within each task; tasks as strata",
            "p_value": "exact two-sided McNemar on the discordant examples pooled",
        },
        "pools": [],
    }

    def save() -> None:
        record["elapsed_seconds"] = time.perf_counter() - started
        record["machine"]["load_average_end"] = load_average()
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(record_json(record))

    experts: dict[str, Expert] = {}
    keys: dict[str, str] = {}
    for task in held_in:
        try:
            expert, info = task_expert(
                model, tokenizer, task, config, cache_dir,
                base=base, progress=False, cached_only=True, catalog=catalog,
            )  # fmt: skip
        except NotCached as missing:
            raise NotCached(
                f"{missing}; the scaling curve never trains: train the zero-shot run's "
                "experts first (phatgoose bench zero-shot --train-only with the same preset, "
                "config, --catalog and --cache-dir)"
            ) from None
        experts[task.name], keys[task.name] = expert, info["key"]
    cache = EvaluationCache(
        cache_dir / "evaluations", config, base.fingerprint, [t.name for t in held_out]
    )
    bar = tqdm(
        total=len(held_out) * (1 + len(pools) * len(methods)),
        desc="scoring (pool x method x held-out task)",
        disable=not progress,
    )

    def score(method: str, pool: Sequence[str]) -> dict[str, TaskResult]:
        members = [experts[name] for name in pool]
        route = functools.partial(
            build_routed_model, model, members, method, config.top_k,
            embedder=embedder, tokenizer=tokenizer,
        )  # fmt: skip
        identity = method_identity(method, {}, [keys[name] for name in pool], config.top_k)
        bar.set_postfix_str(f"{method} over {len(pool)}")
        return evaluate_routed(
            model, tokenizer, held_out, config, route, cache=cache, identity=identity, bar=bar
        )

    base_results = score("base", [])
    record["base"] = _summary(base_results, None)
    say(f"base: held-out mean {record['base']['held_out_mean']:.3f}")
    for pool in pools:
        entry: dict[str, Any] = {"size": pool.size, "experts": list(pool.experts), "methods": {}}
        for method in methods:
            entry["methods"][method] = _summary(score(method, pool.experts), base_results)
            say(
                f"{method} over {pool.size} ({', '.join(pool.experts)}): "
                f"{_line(entry['methods'][method])}"
            )
        record["pools"].append(entry)
        record["by_size"] = by_size(record)
        save()
    bar.close()
    save()
    return record


def _summary(results: dict[str, TaskResult], base: dict[str, TaskResult] | None) -> dict[str, Any]:
    """Held-out mean and per-task accuracies, and the paired difference from the base (the
    mean over tasks of the per-task differences, tasks as strata)."""
    summary: dict[str, Any] = {
        "held_out_mean": sum(r.accuracy for r in results.values()) / len(results),
        "tasks": {t: r.accuracy for t, r in results.items()},
    }
    if base is not None:
        outcomes = {t: paired_outcomes(r, base[t]) for t, r in results.items()}
        summary["vs_base"] = paired_mean_difference(outcomes, **PAIRED_SETTINGS).to_dict()
    return summary


def _line(summary: dict[str, Any]) -> str:
    return (
        f"held-out mean {summary['held_out_mean']:.3f}, "
        f"{paired_text(summary['vs_base'])} points vs base"
    )


def by_size(record: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per method and pool size: the pools' mean held-out accuracy, and the mean, lowest
    and highest of their paired differences from the base."""
    result: dict[str, list[dict[str, Any]]] = {}
    for method in record["methods"]:
        rows = []
        for size in sorted({p["size"] for p in record["pools"]}):
            summaries = [p["methods"][method] for p in record["pools"] if p["size"] == size]
            deltas = [s["vs_base"]["delta"] for s in summaries]
            rows.append(
                {
                    "size": size,
                    "pools": len(summaries),
                    "mean_accuracy": sum(s["held_out_mean"] for s in summaries) / len(summaries),
                    "mean_delta": sum(deltas) / len(deltas),
                    "min_delta": min(deltas),
                    "max_delta": max(deltas),
                    "significant_pools": sum(bool(s["vs_base"]["significant"]) for s in summaries),
                }
            )
        result[method] = rows
    return result


# --------------------------------------------------------------------------- reports
def markdown(record: dict[str, Any]) -> str:
    """Every pool's held-out mean and paired difference from the base, then per size."""
    methods = record["methods"]
    confidence = record["paired_statistics"]["confidence"]
    n = sum(record["tasks"].values())
    lines = [
        f"Held-out mean accuracy over {len(record['tasks'])} held-out tasks ({n} examples), "
        f"base model {record['base']['held_out_mean']:.3f}. Each cell: the mean, then its "
        f"paired difference from the base in accuracy points with its {confidence:.0%} "
        "bootstrap interval (tasks as strata); ▲/▼ where the interval excludes 0.",
        "",
        "| experts | pool | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for pool in record["pools"]:
        cells = [
            f"{pool['methods'][m]['held_out_mean']:.3f}, "
            f"{paired_text(pool['methods'][m]['vs_base'])}"
            for m in methods
        ]
        members = ", ".join(pool["experts"])
        lines.append(f"| {pool['size']} | {members} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per pool size: the pools' mean held-out accuracy; the mean of their differences "
        "from the base (lowest to highest) and how many pools' intervals exclude 0.",
        "",
        "| experts | pools | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    sizes = record["by_size"][methods[0]]
    for i, row in enumerate(sizes):
        cells = []
        for m in methods:
            s = record["by_size"][m][i]
            cells.append(
                f"{s['mean_accuracy']:.3f}, {100 * s['mean_delta']:+.1f} "
                f"({100 * s['min_delta']:+.1f} to {100 * s['max_delta']:+.1f}), "
                f"{s['significant_pools']} of {s['pools']}"
            )
        lines.append(f"| {row['size']} | {row['pools']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(record: dict[str, Any], path: Path) -> Path:
    """Paired held-out mean difference from the base against pool size: every pool with its
    interval (a little apart within a size), and a line through each size's mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    sizes = record["sizes"]
    methods = record["methods"]
    for m_index, method in enumerate(methods):
        color = f"C{m_index}"
        for size in sizes:
            pools = [p for p in record["pools"] if p["size"] == size]
            for p_index, pool in enumerate(pools):
                # log2 positions: a small offset per method and pool keeps the bars apart
                offset = 0.06 * (m_index - (len(methods) - 1) / 2) + 0.025 * (
                    p_index - (len(pools) - 1) / 2
                )
                x = 2 ** (math.log2(size) + offset)
                d = pool["methods"][method]["vs_base"]
                ax.errorbar(
                    x, 100 * d["delta"],
                    yerr=[[100 * (d["delta"] - d["low"])], [100 * (d["high"] - d["delta"])]],
                    fmt="o", color=color, alpha=0.6, capsize=2, markersize=4,
                )  # fmt: skip
        rows = record["by_size"][method]
        ax.plot(
            [r["size"] for r in rows], [100 * r["mean_delta"] for r in rows],
            "-", color=color, label=f"{method} (mean of the pools)",
        )  # fmt: skip
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.set_xlabel("experts in the pool")
    confidence = record["paired_statistics"]["confidence"]
    ax.set_ylabel("held-out mean - base (points)")
    ax.set_title(
        f"Pool size, paired difference from the base ({confidence:.0%} bootstrap interval)",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(record: dict[str, Any], output: Path) -> None:
    """The record as JSON at `output`, with its Markdown tables and plot beside it."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(record_json(record))
    output.with_suffix(".md").write_text(markdown(record))
    plot(record, output.with_suffix(".png"))

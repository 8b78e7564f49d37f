"""Micro-benchmark of one routed linear: where a PHATGOOSE layer's time goes.

Times, for one SmolLM2-sized linear and T tokens, each part of the routed forward (base
matmul, standardise + affinity, top-k + softmax, the selected-only expert mixture) and
alternative ways of computing the mixture, all on the same inputs, interleaved repeat by
repeat. Used to decide what to change in `phatgoose/routing/layer.py`; run with
`python -m benchmarks.routed_linear_micro --help`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Annotated

import torch
import torch.nn.functional as F
import typer
from torch import Tensor

from phatgoose.routing.layer import RoutedLinear
from phatgoose.routing.routers import TokenRouter, standardise

app = typer.Typer(add_completion=False)


def mixture_current(layer: RoutedLinear, u: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """The platform's dispatch (`RoutedLinear.selected_update`): grouped_mm where experts
    have many pairs each and it applies, else the embedding bags."""
    return layer.selected_update(u, indices, weights)


def mixture_grouped_mm(layer: RoutedLinear, u: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """Pairs sorted by expert through two `F.grouped_mm` calls (`RoutedLinear.grouped_update`;
    torch >= 2.8, CPU, every stride a multiple of 16 bytes), whatever the pairs per expert."""
    out = torch.zeros(u.shape[0], layer.out_features, dtype=u.dtype, device=u.device)
    return layer.grouped_update(u, indices, weights, out)


def mixture_pairs(layer: RoutedLinear, u: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """Every pair reads its expert's factor rows through two embedding bags
    (`RoutedLinear.pair_update`), whatever the pairs per expert."""
    return layer.pair_update(u, indices, weights)


def mixture_loop_v1(layer: RoutedLinear, u: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """The first implementation (before the padded batched path): one Python iteration per
    expert present, the weight applied to the d-wide output. Kept to measure against."""
    k = indices.shape[-1]
    out = torch.zeros(u.shape[0], layer.out_features, dtype=u.dtype, device=u.device)
    flat_expert = indices.reshape(-1)
    order = flat_expert.argsort(stable=True)
    counts = torch.bincount(flat_expert, minlength=layer.num_experts).tolist()
    flat_weight = weights.reshape(-1).to(u.dtype)
    start = 0
    for z, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]
        start += count
        tokens = pairs // k
        hidden = u[tokens] @ layer.lora_A[z].T  # [count, r]
        delta = (hidden @ layer.lora_B[z].T) * flat_weight[pairs, None]
        out.index_add_(0, tokens, delta)
    return out


METHODS: dict[str, Callable[[RoutedLinear, Tensor, Tensor, Tensor], Tensor]] = {
    **({"grouped_mm": mixture_grouped_mm} if hasattr(F, "grouped_mm") else {}),
    "current": mixture_current,
    "pairs": mixture_pairs,
    "loop_v1": mixture_loop_v1,
}


def _dtype(name: str) -> torch.dtype:
    if name not in ("float32", "bfloat16"):
        raise typer.BadParameter(f"dtype must be float32 or bfloat16, got {name!r}")
    return torch.float32 if name == "float32" else torch.bfloat16


def cast_layer(layer: RoutedLinear, dtype: torch.dtype) -> None:
    """The base weight and the stacked factors in `dtype` (what `compute_in` swaps in for
    bfloat16), the factors keeping their layout."""
    layer.base_layer.to(dtype)
    layer.register_buffer("lora_A", layer.lora_A.to(dtype), persistent=False)
    layer.register_buffer("lora_B", layer.lora_B.to(dtype), persistent=False)


def as_selected_update(
    mixture: Callable[[RoutedLinear, Tensor, Tensor, Tensor], Tensor],
) -> Callable[..., Tensor]:
    """A mixture in the place of `RoutedLinear.selected_update`, which adds into `out`."""

    def selected_update(
        self: RoutedLinear, u: Tensor, indices: Tensor, weights: Tensor, out: Tensor | None = None
    ) -> Tensor:
        update = mixture(self, u, indices, weights)
        return update if out is None else out.add_(update.to(out.dtype))

    return selected_update


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@app.command("layer")
def layer_command(
    tokens: Annotated[int, typer.Option(help="Tokens T (batch x sequence).")] = 512,
    n_in: Annotated[int, typer.Option(help="Input width n.")] = 576,
    d_out: Annotated[int, typer.Option(help="Output width d.")] = 1536,
    experts: Annotated[str, typer.Option(help="N values, comma-separated.")] = "8,32,166,512",
    rank: Annotated[int, typer.Option(help="Expert rank r.")] = 16,
    top_k: Annotated[int, typer.Option(help="k.")] = 2,
    repeats: Annotated[int, typer.Option(help="Timed repeats (median).")] = 20,
    skew: Annotated[
        float,
        typer.Option(
            help="0: random gate rows; >0: rows share a common direction (skewed routing)."
        ),
    ] = 0.0,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 1,
    dtype: Annotated[
        str, typer.Option(help="Dtype of the base weight and factors: float32 or bfloat16.")
    ] = "float32",
) -> None:
    """Per-part and per-implementation times (ms) of one routed linear, as JSON lines."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    compute = _dtype(dtype)
    base = torch.nn.Linear(n_in, d_out, bias=False)
    u32 = torch.randn(tokens, n_in)
    u = u32.to(compute)
    for n_experts in [int(x) for x in experts.split(",")]:
        rows = torch.randn(n_experts, n_in) + skew * torch.randn(1, n_in)
        lora_a = torch.randn(n_experts, rank, n_in) / math.sqrt(n_in)
        lora_b = torch.randn(n_experts, d_out, rank) / rank
        base.float()
        layer = RoutedLinear(base, lora_a, lora_b, TokenRouter(rows, top_k))
        with torch.no_grad():
            indices, weights = layer.router(u32)  # the router decides in float32
            reference = mixture_loop_v1(layer, u32, indices, weights)
            cast_layer(layer, compute)
            tolerance = 1e-4 if compute == torch.float32 else 3e-2 * reference.abs().max().item()
            for fn in METHODS.values():
                torch.testing.assert_close(
                    fn(layer, u, indices, weights).float(), reference, rtol=0, atol=tolerance
                )
            parts: dict[str, list[float]] = {}
            steps: dict[str, Callable[[], object]] = {
                "base_matmul": functools.partial(base, u),
                "router": functools.partial(layer.router, u),
                "routed_forward": functools.partial(layer, u),
                **{
                    f"mixture_{n}": functools.partial(f, layer, u, indices, weights)
                    for n, f in METHODS.items()
                },
            }
            for _ in range(repeats):
                for name, step in steps.items():
                    parts.setdefault(name, []).append(_time(step))
        counts = torch.bincount(indices.reshape(-1), minlength=n_experts)
        summary = {name: 1000 * statistics.median(ts) for name, ts in parts.items()}
        typer.echo(
            json.dumps(
                {
                    "N": n_experts,
                    "T": tokens,
                    "dtype": dtype,
                    "experts_present": int((counts > 0).sum()),
                    "max_tokens_per_expert": int(counts.max()),
                    "ms": {k: round(v, 3) for k, v in summary.items()},
                }
            )
        )


@app.command("crossover")
def crossover_command(
    experts: Annotated[int, typer.Option(help="N.")] = 8,
    pairs_per_expert: Annotated[
        str, typer.Option(help="Mean (token, slot) pairs per expert, comma-separated.")
    ] = "8,16,32,64,128,256",
    shapes: Annotated[
        str, typer.Option(help="Linears n x d, comma-separated (SmolLM2's attention and MLP).")
    ] = "576x576,576x1536,1536x576",
    rank: Annotated[int, typer.Option(help="Expert rank r.")] = 16,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16.")] = "float32",
    threads: Annotated[int, typer.Option(help="torch threads.")] = 1,
) -> None:
    """grouped_mm against the embedding bags as the pairs per expert grow (what
    `layer.GROUPED_MIN_PAIRS` is set from): the best of 5 rounds, ms, as JSON lines."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    compute = _dtype(dtype)
    for shape in shapes.split(","):
        n, d = (int(x) for x in shape.split("x"))
        lora_a = torch.randn(experts, rank, n) / math.sqrt(n)
        lora_b = torch.randn(experts, d, rank) / rank
        layer = RoutedLinear(
            torch.nn.Linear(n, d), lora_a, lora_b, TokenRouter(torch.randn(experts, n), 2)
        )
        cast_layer(layer, compute)
        ms = {}
        for per_expert in [int(x) for x in pairs_per_expert.split(",")]:
            tokens = max(1, per_expert * experts // 2)  # k = 2 pairs per token
            u = torch.randn(tokens, n)
            with torch.no_grad():
                indices, weights = layer.router(u)
                x = u.to(compute)
                repeats = max(2, 2000 // tokens)
                ms[per_expert] = {
                    name: round(
                        1000 * _best(functools.partial(fn, layer, x, indices, weights), repeats), 3
                    )
                    for name, fn in (("grouped_mm", mixture_grouped_mm), ("pairs", mixture_pairs))
                }
        typer.echo(json.dumps({"N": experts, "n": n, "d": d, "dtype": dtype, "ms": ms}))


def _best(fn: Callable[[], object], repeats: int, rounds: int = 5) -> float:
    """Seconds per call, the best of `rounds` rounds of `repeats` calls (least disturbed by
    other load)."""
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def _route_each(routers: list[TokenRouter], u: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Each router on its own: what `shared_routing` is measured against."""
    return [router(u) for router in routers]


def shared_routing(routers: list[TokenRouter], u: Tensor) -> list[tuple[Tensor, Tensor]]:
    """PROPOSAL, measured, not adopted: routers of sibling linears reading one input (q, k,
    v) standardise it once and route with one GEMM against their concatenated rows, one
    top-k and one softmax over `[..., siblings, N]`. The bare computation, without the
    bookkeeping a model needs to hand each sibling its result (see docs/routing.md)."""
    rows = torch.cat([r.rows for r in routers])
    affinity = (standardise(u.float()) @ rows.T).unflatten(-1, (len(routers), -1))
    top = affinity.topk(routers[0].top_k, dim=-1)
    weights = torch.softmax(top.values / math.sqrt(u.shape[-1]), dim=-1)
    return [(top.indices[..., i, :], weights[..., i, :]) for i in range(len(routers))]


@app.command("routers")
def routers_command(
    tokens: Annotated[int, typer.Option(help="Tokens T (batch x sequence).")] = 128,
    n_in: Annotated[int, typer.Option(help="Input width n.")] = 576,
    siblings: Annotated[int, typer.Option(help="Routers reading one input (q, k, v: 3).")] = 3,
    experts: Annotated[str, typer.Option(help="N values, comma-separated.")] = "8,166,512",
    top_k: Annotated[int, typer.Option(help="k.")] = 2,
    repeats: Annotated[int, typer.Option(help="Timed repeats (median).")] = 50,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 1,
) -> None:
    """Routing of sibling linears that read one input: each `TokenRouter` on its own
    against `shared_routing`, interleaved; ms as JSON lines."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    u = torch.randn(tokens, n_in)
    for n_experts in [int(x) for x in experts.split(",")]:
        routers = [TokenRouter(torch.randn(n_experts, n_in), top_k) for _ in range(siblings)]
        times: dict[str, list[float]] = {"alone": [], "shared": []}
        with torch.no_grad():
            for router, (indices, _) in zip(routers, shared_routing(routers, u), strict=True):
                assert torch.equal(router(u)[0], indices)
            for _ in range(repeats):
                times["alone"].append(_time(functools.partial(_route_each, routers, u)))
                times["shared"].append(_time(functools.partial(shared_routing, routers, u)))
        ms = {name: round(1000 * statistics.median(ts), 3) for name, ts in times.items()}
        typer.echo(json.dumps({"N": n_experts, "T": tokens, "siblings": siblings, "ms": ms}))


# Whole-model variants: which mixture `selected_update` runs (None: the platform's).
MODEL_VARIANTS: dict[str, Callable[..., Tensor] | None] = {
    "loop_v1": mixture_loop_v1,  # the first implementation
    "grouped_mm": mixture_grouped_mm,  # grouped_mm whatever the pairs per expert
    "pairs": mixture_pairs,  # the embedding bags whatever the pairs per expert
    "current": None,  # the platform's dispatch
}


@app.command("model")
def model_command(
    experts: Annotated[str, typer.Option(help="N values, comma-separated.")] = "8,166,512",
    batch_size: Annotated[int, typer.Option(help="Sequences.")] = 4,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 128,
    rank: Annotated[int, typer.Option(help="Expert rank r.")] = 16,
    top_k: Annotated[int, typer.Option(help="k.")] = 2,
    repeats: Annotated[int, typer.Option(help="Timed repeats (median).")] = 5,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 1,
    variants: Annotated[
        str, typer.Option(help=f"Comma-separated, of {', '.join(MODEL_VARIANTS)}.")
    ] = "pairs,grouped_mm,current",
) -> None:
    """Whole-model forward (SmolLM2-135M, random experts on every linear): the base model
    and each variant, interleaved forward by forward; seconds and ratios as JSON lines."""
    from benchmarks.routing_cost import random_routed_layers, swapped
    from phatgoose.models import load_base_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, _ = load_base_model()
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len))
    names = [v for v in variants.split(",") if v]
    unknown = set(names) - set(MODEL_VARIANTS)
    if unknown:
        raise typer.BadParameter(f"unknown variants {sorted(unknown)}")

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    current = RoutedLinear.selected_update
    for n_experts in [int(x) for x in experts.split(",")]:
        layers = random_routed_layers(model, n_experts, rank, top_k, seed=0)
        times: dict[str, list[float]] = {name: [] for name in ["base", *names]}
        for repeat in range(repeats + 1):  # the first round warms up
            measured = {"base": _time(forward)}
            with swapped(model, layers):
                for name in names:
                    mixture = MODEL_VARIANTS[name]
                    if mixture is not None:
                        RoutedLinear.selected_update = as_selected_update(mixture)  # type: ignore[method-assign]
                    try:
                        measured[name] = _time(forward)
                    finally:
                        RoutedLinear.selected_update = current  # type: ignore[method-assign]
            if repeat:
                for name, seconds in measured.items():
                    times[name].append(seconds)
        median = {name: statistics.median(ts) for name, ts in times.items()}
        typer.echo(
            json.dumps(
                {
                    "N": n_experts,
                    "tokens": batch_size * seq_len,
                    "seconds": {k: round(v, 3) for k, v in median.items()},
                    "ratio_to_base": {
                        k: round(v / median["base"], 3) for k, v in median.items() if k != "base"
                    },
                    "load_average": list(os.getloadavg()),
                }
            )
        )
        del layers


if __name__ == "__main__":
    app()

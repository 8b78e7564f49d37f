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

from phatgoose.routing.layer import RoutedLinear, TokenRouter

app = typer.Typer(add_completion=False)


def mixture_current(layer: RoutedLinear, u: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """The platform's implementation (`RoutedLinear.selected_update`)."""
    return layer.selected_update(u, indices, weights)


def mixture_grouped_mm(layer: RoutedLinear, u: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """A proposal: pairs sorted by expert through `F.grouped_mm` (torch >= 2.8; every
    size a multiple of 16 bytes), two calls, no padding, no Python loop, no host sync."""
    k = indices.shape[-1]
    flat_expert = indices.reshape(-1)
    order = flat_expert.argsort(stable=True)
    ends = torch.bincount(flat_expert, minlength=layer.num_experts).cumsum(0).to(torch.int32)
    rows = order // k
    hidden = F.grouped_mm(u[rows], layer.lora_A.transpose(1, 2), offs=ends)  # [pairs, r]
    hidden = hidden * weights.reshape(-1)[order, None].to(u.dtype)
    delta = F.grouped_mm(hidden, layer.lora_B.transpose(1, 2), offs=ends)  # [pairs, d]
    out = torch.zeros(u.shape[0], layer.out_features, dtype=u.dtype, device=u.device)
    return out.index_add_(0, rows, delta)


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


def mixture_gather(layer: RoutedLinear, u: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """Every (token, slot) pair gathers its expert's factors (materialises T k r (n + d))."""
    a = layer.lora_A[indices]  # [T, k, r, n]
    b = layer.lora_B[indices]  # [T, k, d, r]
    hidden = torch.einsum("tn,tkrn->tkr", u, a)
    return torch.einsum("tkr,tkdr,tk->td", hidden, b, weights.to(u.dtype))


METHODS: dict[str, Callable[[RoutedLinear, Tensor, Tensor, Tensor], Tensor]] = {
    **({"grouped_mm": mixture_grouped_mm} if hasattr(F, "grouped_mm") else {}),
    "current": mixture_current,
    "loop_v1": mixture_loop_v1,
    "gather": mixture_gather,
}


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
) -> None:
    """Per-part and per-implementation times (ms) of one routed linear, as JSON lines."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = torch.nn.Linear(n_in, d_out, bias=False)
    u = torch.randn(tokens, n_in)
    for n_experts in [int(x) for x in experts.split(",")]:
        rows = torch.randn(n_experts, n_in) + skew * torch.randn(1, n_in)
        lora_a = torch.randn(n_experts, rank, n_in) / math.sqrt(n_in)
        lora_b = torch.randn(n_experts, d_out, rank) / rank
        layer = RoutedLinear(base, lora_a, lora_b, TokenRouter(rows, top_k))
        with torch.no_grad():
            indices, weights = layer.router(u)
            reference = mixture_loop_v1(layer, u, indices, weights)
            for fn in METHODS.values():
                torch.testing.assert_close(
                    fn(layer, u, indices, weights), reference, rtol=1e-4, atol=1e-4
                )
            parts: dict[str, list[float]] = {}
            steps: dict[str, Callable[[], object]] = {
                "base_matmul": lambda: base(u),
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
                    "experts_present": int((counts > 0).sum()),
                    "max_tokens_per_expert": int(counts.max()),
                    "ms": {k: round(v, 3) for k, v in summary.items()},
                }
            )
        )


@app.command("model")
def model_command(
    experts: Annotated[str, typer.Option(help="N values, comma-separated.")] = "8,166,512",
    batch_size: Annotated[int, typer.Option(help="Sequences.")] = 4,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 128,
    rank: Annotated[int, typer.Option(help="Expert rank r.")] = 16,
    top_k: Annotated[int, typer.Option(help="k.")] = 2,
    repeats: Annotated[int, typer.Option(help="Timed repeats (median).")] = 5,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 1,
) -> None:
    """Whole-model forward (SmolLM2-135M, random experts on every linear): base, the first
    loop implementation and the current one, interleaved; seconds and ratios as JSON lines."""
    from benchmarks.routing_cost import random_routed_layers, swapped
    from phatgoose.models import load_base_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, _ = load_base_model()
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len))

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    current = RoutedLinear.selected_update
    for n_experts in [int(x) for x in experts.split(",")]:
        layers = random_routed_layers(model, n_experts, rank, top_k, seed=0)
        times: dict[str, list[float]] = {"base": [], "loop_v1": [], "current": []}
        for repeat in range(repeats + 1):  # the first round warms up
            measured = {"base": _time(forward)}
            with swapped(model, layers):
                RoutedLinear.selected_update = mixture_loop_v1  # type: ignore[method-assign]
                try:
                    measured["loop_v1"] = _time(forward)
                finally:
                    RoutedLinear.selected_update = current  # type: ignore[method-assign]
                measured["current"] = _time(forward)
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

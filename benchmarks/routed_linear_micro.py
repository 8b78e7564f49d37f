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
import statistics
import time
from collections.abc import Callable
from typing import Annotated

import torch
import typer
from torch import Tensor

from phatgoose.routing.layer import RoutedLinear, TokenRouter

app = typer.Typer(add_completion=False)


def mixture_loop(layer: RoutedLinear, u: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    return layer.selected_update(u, indices, weights)


def mixture_padded_bmm(layer: RoutedLinear, u: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """Pairs grouped by expert into a padded [E, C, n] block; two bmm; one index_add."""
    k = indices.shape[-1]
    flat_expert = indices.reshape(-1)
    order = flat_expert.argsort(stable=True)
    counts = torch.bincount(flat_expert, minlength=layer.num_experts)
    present = counts.nonzero().squeeze(1)
    present_counts = counts[present]
    width = int(present_counts.max())
    # slot of each sorted pair inside its expert's row
    starts = torch.cumsum(present_counts, 0) - present_counts
    row = torch.repeat_interleave(torch.arange(len(present)), present_counts)
    col = torch.arange(order.numel()) - starts[row]
    tokens = order // k
    block = u.new_zeros(len(present), width, u.shape[-1])
    block[row, col] = u[tokens]
    hidden = torch.bmm(block, layer.lora_A[present].transpose(1, 2))  # [E, C, r]
    delta = torch.bmm(hidden, layer.lora_B[present].transpose(1, 2))  # [E, C, d]
    delta = delta[row, col] * weights.reshape(-1)[order, None].to(u.dtype)
    out = u.new_zeros(u.shape[0], layer.out_features)
    out.index_add_(0, tokens, delta)
    return out


def mixture_padded_scatter(
    layer: RoutedLinear, u: Tensor, indices: Tensor, weights: Tensor
) -> Tensor:
    """Padded [E, C] blocks of token ids and weights (pads: a zero row, weight 0); the
    weight multiplies the r-wide hidden; one index_add of the whole block, pads included."""
    tokens_n, k = indices.shape
    flat_expert = indices.reshape(-1)
    order = flat_expert.argsort(stable=True)
    counts = torch.bincount(flat_expert, minlength=layer.num_experts)
    present = counts.nonzero().squeeze(1)
    all_present = len(present) == layer.num_experts
    present_counts = counts if all_present else counts[present]
    width = int(present_counts.max())
    starts = torch.cumsum(present_counts, 0) - present_counts
    row = torch.repeat_interleave(torch.arange(len(present_counts)), present_counts)
    col = torch.arange(order.numel()) - starts[row]
    token_block = torch.full((len(present_counts), width), tokens_n)
    token_block[row, col] = order // k
    weight_block = u.new_zeros(len(present_counts), width, 1)
    weight_block[row, col, 0] = weights.reshape(-1)[order].to(u.dtype)
    u_ext = torch.cat([u, u.new_zeros(1, u.shape[-1])])
    lora_a = layer.lora_A if all_present else layer.lora_A[present]
    lora_b = layer.lora_B if all_present else layer.lora_B[present]
    hidden = torch.bmm(u_ext[token_block], lora_a.transpose(1, 2)) * weight_block
    delta = torch.bmm(hidden, lora_b.transpose(1, 2))
    out = u.new_zeros(tokens_n + 1, layer.out_features)
    out.index_add_(0, token_block.reshape(-1), delta.reshape(-1, delta.shape[-1]))
    return out[:tokens_n]


def mixture_loop_weighted_hidden(
    layer: RoutedLinear, u: Tensor, indices: Tensor, weights: Tensor
) -> Tensor:
    """The loop, with the weight applied to the r-wide hidden instead of the d-wide delta."""
    k = indices.shape[-1]
    out = torch.zeros(u.shape[0], layer.out_features, dtype=u.dtype)
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
        hidden = (u[tokens] @ layer.lora_A[z].T) * flat_weight[pairs, None]
        out.index_add_(0, tokens, hidden @ layer.lora_B[z].T)
    return out


def mixture_gather(layer: RoutedLinear, u: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """Every (token, slot) pair gathers its expert's factors (materialises T k r (n + d))."""
    a = layer.lora_A[indices]  # [T, k, r, n]
    b = layer.lora_B[indices]  # [T, k, d, r]
    hidden = torch.einsum("tn,tkrn->tkr", u, a)
    return torch.einsum("tkr,tkdr,tk->td", hidden, b, weights.to(u.dtype))


METHODS: dict[str, Callable[[RoutedLinear, Tensor, Tensor, Tensor], Tensor]] = {
    "loop": mixture_loop,
    "padded_bmm": mixture_padded_bmm,
    "padded_scatter": mixture_padded_scatter,
    "loop_weighted_hidden": mixture_loop_weighted_hidden,
    "gather": mixture_gather,
}


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@app.command()
def main(
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
            reference = mixture_loop(layer, u, indices, weights)
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


if __name__ == "__main__":
    app()

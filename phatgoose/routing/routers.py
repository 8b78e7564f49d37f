"""The routing math: who is chosen for a token, and with what weight.

A router maps a module's input `u [..., n]` to `(indices [..., k], weights [..., k])`: the
stacked experts of one `RoutedLinear` that the token uses and their mixture weights. How
the layer then computes the selected updates is `layer.py`'s business.
- `TokenRouter`: PHATGOOSE and average activation (standardised affinity, top-k,
  softmax with 1/sqrt(n));
- `ArrowRouter`: Arrow (|e_z^T u|, top-k, softmax);
- `SpectralRouter`: SpectR (||V_z^T u|| or ||S_z V_z^T u||, top-k, uniform 1/k or softmax);
- `FixedRouter`: one expert per batch row (single, merged, retrieval);
- `GateRouter`: gate training, the one expert weighted by a trainable sigmoid gate.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phatgoose.precision import autocast_off
from protocol import ROUTER_NUMERICS, method_spec

# LayerNorm's default: biased variance, eps added under the square root.
STANDARDISE_EPS = 1e-5


def standardise(x: Tensor) -> Tensor:
    """A token's x_bar = (x - mean(x)) / sqrt(var(x) + eps) over the last dim: LayerNorm, no
    affine. eps scales every affinity of a token by the same factor, so it can never change
    which experts a token chooses; module inputs have variances far above it."""
    return F.layer_norm(x, (x.shape[-1],), eps=STANDARDISE_EPS)


def standardise_rows(rows: Tensor, numerics: int = ROUTER_NUMERICS) -> Tensor:
    """Router rows (one gate or average activation per expert) standardised over the last
    dim, by the rule of `numerics` (protocol.ROUTER_NUMERICS says what each version is).

    Version 2 divides by the row's own standard deviation and nothing else, so `v` and
    `c * v` give the same row for any c > 0: how long or fast a contributor trained its
    gates cannot decide routing. A constant row (an untrained, all-zero gate) becomes zeros.
    Version 1, LayerNorm's eps, is kept to reproduce releases made with it.
    """
    if numerics == 1:
        return standardise(rows.float())
    if numerics != ROUTER_NUMERICS:
        raise ValueError(
            f"router numerics {numerics} is not supported: this library has 1 to {ROUTER_NUMERICS}"
        )
    exact = rows.double()  # computed once per build: float64 keeps tiny rows exact
    centred = exact - exact.mean(-1, keepdim=True)
    std = centred.pow(2).mean(-1, keepdim=True).sqrt()
    return torch.where(std > 0, centred / std.clamp_min(1e-300), 0.0).float()


class TokenRouter(nn.Module):
    """PHATGOOSE (and average activation): per token, top-k of standardised affinities.

    affinity = u_bar @ v_bar.T; weights = softmax(affinity_topk / sqrt(n)).
    """

    rows: Tensor

    def __init__(self, rows: Tensor, top_k: int, *, numerics: int = ROUTER_NUMERICS) -> None:
        super().__init__()
        _check_top_k(top_k, rows.shape[0])
        self.top_k = top_k
        self.numerics = numerics
        # Rows are fixed after build: standardise them once, not on every forward.
        self.register_buffer("rows", standardise_rows(rows, numerics), persistent=False)

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        with autocast_off(u.device.type):  # routing decides in float32
            affinity = standardise(u.float()) @ self.rows.float().T
            top_k = affinity.topk(self.top_k, dim=-1)
            # 1/sqrt(n) keeps the softmax out of saturation; n is the input width.
            weights = torch.softmax(top_k.values / math.sqrt(self.rows.shape[-1]), dim=-1)
        return top_k.indices, weights


class ArrowRouter(nn.Module):
    """Arrow: score |e_z^T u| on the raw input, top-k, softmax over the selected scores."""

    rows: Tensor

    def __init__(self, rows: Tensor, top_k: int) -> None:
        super().__init__()
        _check_top_k(top_k, rows.shape[0])
        self.top_k = top_k
        self.register_buffer("rows", rows.float(), persistent=False)

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        with autocast_off(u.device.type):  # routing decides in float32
            affinity = (u.float() @ self.rows.float().T).abs()
            top_k = affinity.topk(self.top_k, dim=-1)
            return top_k.indices, torch.softmax(top_k.values, dim=-1)


SPECTRAL_WEIGHTINGS = method_spec("spectr").param("weighting").choices  # protocol's list


class SpectralRouter(nn.Module):
    """SpectR: score_z = ||bases_z u|| on the raw input, top-k, weights 1/k or a softmax.

    `bases [N, r_max, n]` (`rows.spectral_rows`) hold each expert's right singular vectors
    `V_z^T` (score "input") or `S_z V_z^T` (score "spectrum"), zero rows padding lower ranks.
    One matmul against all N * r_max rows, then a norm per expert.
    """

    bases: Tensor

    def __init__(self, bases: Tensor, top_k: int, weighting: str = "uniform") -> None:
        super().__init__()
        if bases.dim() != 3:
            raise ValueError(
                f"SpectR bases are [experts, rank, in_features], got shape {list(bases.shape)}"
            )
        if weighting not in SPECTRAL_WEIGHTINGS:
            raise ValueError(
                f"SpectR weighting must be one of {', '.join(map(repr, SPECTRAL_WEIGHTINGS))}, "
                f"got {weighting!r}"
            )
        _check_top_k(top_k, bases.shape[0])
        self.top_k = top_k
        self.weighting = weighting
        self.register_buffer("bases", bases.float(), persistent=False)

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        num, rank, n = self.bases.shape
        with autocast_off(u.device.type):  # routing decides in float32
            projections = u.float() @ self.bases.reshape(num * rank, n).T  # [..., N * r]
            score = projections.unflatten(-1, (num, rank)).pow(2).sum(-1).sqrt()
            top_k = score.topk(self.top_k, dim=-1)
            if self.weighting == "softmax":
                weights = torch.softmax(top_k.values, dim=-1)
            else:  # the authors' code: each selected expert counts 1/k
                weights = torch.full_like(top_k.values, 1.0 / self.top_k)
        return top_k.indices, weights


class FixedRouter(nn.Module):
    """One expert per batch row with weight 1 (single, merged, retrieval).

    `choice()` returns the stacked-expert index per batch row, `[rows]`, or a scalar for
    every row. Returned indices are `[batch, 1, ..., 1]`: one decision per row (what the
    statistics count), broadcast over the row's tokens by the layer.
    """

    def __init__(self, choice: Callable[[], Tensor]) -> None:
        super().__init__()
        self.choice = choice

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        choice = self.choice().to(u.device).reshape(-1)
        if u.dim() == 1:
            indices = choice[:1]
        else:
            rows = u.shape[0]
            if rows % choice.shape[0]:
                raise ValueError(
                    f"the routed batch has {rows} rows but {choice.shape[0]} query "
                    "choices were set; expected the same number (or a multiple, for beams)"
                )
            # generate() repeats each row for beams / num_return_sequences, row by row.
            choice = choice.repeat_interleave(rows // choice.shape[0])
            indices = choice.reshape((rows,) + (1,) * (u.dim() - 1))
        return indices, torch.ones(indices.shape, dtype=torch.float32, device=u.device)


def constant_choice(index: int = 0) -> Callable[[], Tensor]:
    """A `FixedRouter` choice that picks the same stacked expert for every row."""
    choice = torch.tensor(index)
    return lambda: choice


class GateRouter(nn.Module):
    """Gate training (METHOD.md): the one stacked expert, weighted per token by its gate.

    weight = sigmoid(v^T u); `gate` (v, float32) is the only trainable parameter, so
    `y = W u + scale * B A u * sigmoid(v^T u)`. Training starts from `v = 0` (a weight of
    0.5 for every token); at inference the gate is only a router row (`TokenRouter`).
    """

    def __init__(self, gate: Tensor) -> None:
        super().__init__()
        if gate.dim() != 1:
            raise ValueError(f"a gate is one vector [n], got shape {list(gate.shape)}")
        self.gate = nn.Parameter(gate.detach().to(torch.float32, copy=True))

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        with autocast_off(u.device.type):  # routing decides in float32
            weights = torch.sigmoid(u.float() @ self.gate).unsqueeze(-1)  # [..., 1]
        # Every token picks stacked expert 0; one index broadcasts over all of them.
        indices = torch.zeros((1,) * u.dim(), dtype=torch.long, device=u.device)
        return indices, weights


def _check_top_k(top_k: int, num_experts: int) -> None:
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(
            f"top_k must be an integer between 1 and the number of experts at the module "
            f"({num_experts}), got {top_k!r}"
        )

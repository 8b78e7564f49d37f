"""The routing math: who is chosen for a token, and with what weight.

A router maps a module's input `u [..., n]` to `(indices [..., k], weights [..., k])`: the
stacked experts of one `RoutedLinear` that the token uses and their mixture weights. How
the layer then computes the selected updates is `layer.py`'s business.
- `TokenRouter`: PHATGOOSE and average activation (standardised affinity, top-k,
  softmax with 1/sqrt(n));
- `ArrowRouter`: Arrow (|e_z^T u|, top-k, softmax);
- `SpectralRouter`: SpectR (||V_z^T u|| or ||S_z V_z^T u||, top-k, uniform 1/k or softmax);
- `PromptRouter`: per-example PHATGOOSE (top-k) and SMEAR-style merging (every expert), one
  decision per example and module from the prompt (`PromptDecisions`);
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


class PromptDecisions:
    """The prompt-level routers' decisions for the sequences in flight, shared by the routed
    linears of one model.

    The model's hooks (`model._install_sequence_hooks`, the mechanism retrieval uses) call
    `begin` when new sequences start: a causal forward without a filled cache, or the
    encoder's forward. Each `PromptRouter` then decides on its first forward after `begin`
    and keeps that decision for every later forward (the answer's tokens, `generate`'s
    steps) until the next `begin`. `prompt_mask [batch, seq]` marks the prompt's tokens
    (None: all of them); `encoder_states` is the encoder's output, which a decoder's
    cross-attention reads.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.prompt_mask: Tensor | None = None
        self.encoder_states: Tensor | None = None
        self.kept: dict[str, tuple[int, Tensor, Tensor]] = {}  # path -> (epoch, indices, weights)

    def begin(self, attention_mask: Tensor | None) -> None:
        """New sequences start: every router decides again on its next forward."""
        self.epoch += 1
        self.prompt_mask = None if attention_mask is None else attention_mask.bool()
        self.encoder_states = None

    def reorder(self, rows: Tensor) -> None:
        """Row r of the next forwards continues row `rows[r]` of the sequences in flight
        (a key/value cache reordered with `cache.reorder_cache(rows)`)."""
        for path, (epoch, indices, weights) in self.kept.items():
            where = rows.to(indices.device)
            self.kept[path] = (epoch, indices[where], weights[where])


class PromptRouter(nn.Module):
    """Per-example PHATGOOSE (`top_k`) and SMEAR-style merging (`top_k=None`): one decision
    per example and module, made on the prompt, kept for the answer (`PromptDecisions`).

    affinity_z = mean over the prompt's tokens of (u_bar_t . v_bar_z), the mean of
    PHATGOOSE's per-token affinities (the same standardised rows); top-k: weights
    `softmax(affinity_topk / sqrt(n))`; every expert: `softmax(affinity / sqrt(n))` over all
    N, one merged update per example. Returns `[batch, 1, k]` (k = N for the merge).

    `reads_prompt`: the module's tokens are the prompt's (causal models, encoders), so the
    prompt mask applies. A decoder module (False) decides on the decoder's start token,
    the one token that every scoring and generation has before any answer; a decoder's
    cross-attention keys and values read the encoder's states and so decide on the prompt.
    """

    rows: Tensor

    def __init__(
        self,
        rows: Tensor,
        top_k: int | None,
        decisions: PromptDecisions,
        *,
        path: str,
        reads_prompt: bool = True,
        numerics: int = ROUTER_NUMERICS,
    ) -> None:
        super().__init__()
        if top_k is not None:
            _check_top_k(top_k, rows.shape[0])
        self.top_k = top_k
        self.decisions = decisions
        self.path = path
        self.reads_prompt = reads_prompt
        self.register_buffer("rows", standardise_rows(rows, numerics), persistent=False)

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        if u.dim() != 3:
            raise ValueError(
                f"{self.path}: prompt-level routing takes [batch, seq, features] inputs, got "
                f"shape {list(u.shape)}"
            )
        decisions = self.decisions
        kept = decisions.kept.get(self.path)
        if kept is None or kept[0] != decisions.epoch:
            kept = (decisions.epoch, *self.decide(u))
            decisions.kept[self.path] = kept
        _, indices, weights = kept
        rows = u.shape[0]
        if rows % indices.shape[0]:
            raise ValueError(
                f"{self.path}: the batch has {rows} rows but the prompt decided for "
                f"{indices.shape[0]}; expected the same number (or a multiple, for beams): "
                "after reordering a key/value cache, call routing.reorder_routing(model, rows)"
            )
        repeat = rows // indices.shape[0]  # generate() repeats each row for beams
        if repeat > 1:
            indices = indices.repeat_interleave(repeat, 0)
            weights = weights.repeat_interleave(repeat, 0)
        return indices.to(u.device), weights.to(u.device)

    def decide(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """`(indices, weights)`, each `[batch, 1, k]`, from this forward's prompt tokens."""
        with autocast_off(u.device.type):  # routing decides in float32
            prompt = self._prompt_weights(u)  # [batch, seq]
            tokens = standardise(u.float())
            # The affinity is linear in the token: the mean affinity is the mean token's.
            mean = (tokens * prompt.unsqueeze(-1)).sum(1) / prompt.sum(1, keepdim=True).clamp(min=1)
            affinity = mean @ self.rows.float().T  # [batch, N]
            scale = math.sqrt(self.rows.shape[-1])
            if self.top_k is None:
                weights = torch.softmax(affinity / scale, dim=-1)
                indices = torch.arange(affinity.shape[1], device=u.device).expand_as(affinity)
            else:
                top_k = affinity.topk(self.top_k, dim=-1)
                indices, weights = top_k.indices, torch.softmax(top_k.values / scale, dim=-1)
        return indices.unsqueeze(1), weights.unsqueeze(1)

    def _prompt_weights(self, u: Tensor) -> Tensor:
        """1 at the positions of `u [batch, seq, n]` that form the prompt, else 0."""
        batch, seq = u.shape[:2]
        states = self.decisions.encoder_states
        reads_encoder = (
            states is not None
            and states.shape[1:] == u.shape[1:]
            and bool(torch.equal(states[0], u[0]))  # cross-attention keys/values
        )
        if not self.reads_prompt and not reads_encoder:
            start = torch.zeros(batch, seq, device=u.device)
            start[:, 0] = 1.0  # the decoder's start token
            return start
        mask = self.decisions.prompt_mask
        if mask is None:
            return torch.ones(batch, seq, device=u.device)
        if mask.shape[1] != seq or batch % mask.shape[0]:
            raise ValueError(
                f"{self.path}: prompt-level routing decides on the forward that starts a "
                f"sequence, whose attention mask is {list(mask.shape)}, but this module's input "
                f"is [{batch}, {seq}, ...]; expected the prompt's tokens (rows may repeat, for "
                "beams)"
            )
        return mask.repeat_interleave(batch // mask.shape[0], 0).to(u.device, torch.float32)


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

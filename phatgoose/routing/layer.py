"""What one routed linear computes: the selected-only expert mixture.

Every method shares `RoutedLinear`; a method differs only in its router (`routers.py`: who
is chosen for a token, with what weight) and in the low-rank factors stacked into the
layer. Here is how the chosen experts' updates are computed, by one of four paths that
agree up to float summation order (docs/routing.md): plain matmuls when one expert is
stacked, two matmuls over all the stacked factors when every token weighs every expert
(SMEAR-style merging), `grouped_mm` over the pairs sorted by expert when experts have many
pairs each, and two embedding bags over the factors' rows otherwise (a token at a time in
generation, or many experts with a pair or two each).
Shapes: `u` is a module's input `[..., n]`, `W` is `[d, n]`, `N` experts of rank <= `r`.
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phatgoose.precision import autocast_off

# `grouped_update` runs where experts hold at least this many (token, slot) pairs on average
# (by the factors' dtype): below it grouped_mm's fixed cost per expert group (one small
# matmul each, empty groups included) loses to `pair_update`'s embedding bags; small
# bfloat16 matmuls cost more on CPU, hence the higher bar (measured: docs/routing.md).
GROUPED_MIN_PAIRS = {torch.float32: 8, torch.bfloat16: 48, torch.float16: 48}

# `F.grouped_mm` (torch >= 2.8) runs the whole selected mixture in two calls. On CPU
# (torch 2.13) it takes float32, bfloat16 and float16, not float64; on CUDA it wants bf16
# kernels whose constraints differ, so only CPU uses it here.
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
use_grouped_mm = hasattr(F, "grouped_mm")  # tests switch it off to cover the fallback


def grouped_mm_applies(
    u: Tensor, lora_A: Tensor, lora_B: Tensor, weights: Tensor | None = None
) -> bool:
    """Whether `RoutedLinear.grouped_update` can take these operands.

    grouped_mm needs one dtype, every matrix stride a multiple of 16 bytes (the gathered
    `[pairs, n]` input, the `[pairs, r]` hidden and both factors as transposed views), and
    no autograd graph through it: its backward fails on CPU in torch 2.13 (a stride error).
    Gate training differentiates the router's `weights`, which scale the hidden that the
    second grouped_mm reads; with any graph the embedding bags are used.
    """
    if not use_grouped_mm or u.device.type != "cpu" or u.dtype not in GROUPED_MM_DTYPES:
        return False
    if lora_A.dtype != u.dtype or lora_B.dtype != u.dtype or lora_A.device != u.device:
        return False
    operands = (u, lora_A, lora_B) if weights is None else (u, lora_A, lora_B, weights)
    if torch.is_grad_enabled() and any(x.requires_grad for x in operands):
        return False
    alignment = 16 // u.element_size()
    return (
        u.shape[-1] % alignment == 0
        and lora_A.shape[1] % alignment == 0
        and _aligned(lora_A.transpose(1, 2), alignment)
        and _aligned(lora_B.transpose(1, 2), alignment)
    )


def _aligned(mat: Tensor, alignment: int) -> bool:
    """grouped_mm's stride rule: one of the last two dims is unit-stride, the other's
    stride spans its rows and is a multiple of `alignment` elements."""
    rows_stride, cols_stride = mat.stride()[-2:]
    rows, cols = mat.shape[-2:]
    if rows_stride == 1 and cols_stride >= max(1, rows):
        return cols_stride % alignment == 0
    if cols_stride == 1 and rows_stride >= max(1, cols):
        return rows_stride % alignment == 0
    return False


def factor_layout(factor: Tensor) -> Tensor:
    """`factor [N, a, b]` stored as the transposed view of a contiguous `[N, b, a]`.

    The layer keeps `lora_A [N, r, n]` and `lora_B [N, d, r]` this way: then `A_z^T` and
    `B_z^T` are contiguous blocks of rows, `[N*n, r]` and `[N*r, d]`, which the embedding
    bags index and grouped_mm reads without a copy. Already laid out: returned as is.
    """
    flipped = factor.transpose(1, 2)
    return (flipped if flipped.is_contiguous() else flipped.contiguous()).transpose(1, 2)


def stack_updates(updates: Sequence[tuple[Tensor, Tensor, float]]) -> tuple[Tensor, Tensor]:
    """Stack `(A [r_z, n], B [d, r_z], scale_z)` into `A [N, r_max, n]`, `B [N, d, r_max]`.

    The scale is folded into B, and lower ranks are zero-padded: a zero row of A meets a
    zero column of B, so the product `B_z A_z` is unchanged. Both come in `factor_layout`.
    """
    if not updates:
        raise ValueError("stack_updates needs at least one (A, B, scale) update")
    n, d = updates[0][0].shape[1], updates[0][1].shape[0]
    r_max = max(a.shape[0] for a, _, _ in updates)
    lora_A = torch.zeros(len(updates), n, r_max).transpose(1, 2)
    lora_B = torch.zeros(len(updates), r_max, d).transpose(1, 2)
    for z, (a, b, scale) in enumerate(updates):
        r = a.shape[0]
        if a.shape[1] != n or b.shape != (d, r):
            raise ValueError(
                f"update {z}: expected A [r, {n}] and B [{d}, r], got A {list(a.shape)} "
                f"and B {list(b.shape)}"
            )
        lora_A[z, :r] = a.float()
        lora_B[z, :, :r] = b.float() * scale
    return lora_A, lora_B


# Called on every forward with the layer, the chosen `indices` and their `weights`.
Observer = Callable[["RoutedLinear", Tensor, Tensor], None]


class RoutedLinear(nn.Module):
    """y = W u + sum_{z in E_u} w_z * scale_z * B_z A_z u, computing only the selected experts.

    `base_layer` is the model's own `nn.Linear` (shared, never copied); `lora_A`
    `[N, r, n]` and `lora_B` `[N, d, r]` (scale folded in) are stacked once at build time,
    in `factor_layout`. `expert_ids[i]` is the index, in the routed model's expert list, of
    stacked expert i (None when the stacked experts are not real experts, as for merged).

    Precision: the router decides in float32; the mixture runs in the factors' dtype (the
    model's compute precision: `phatgoose.precision.compute_in` swaps in bfloat16 copies)
    with the input cast to it, and its result is added to the base output in that output's
    dtype.
    """

    lora_A: Tensor
    lora_B: Tensor
    a_offsets: Tensor
    b_offsets: Tensor

    def __init__(
        self,
        base_layer: nn.Linear,
        lora_A: Tensor,
        lora_B: Tensor,
        router: nn.Module,
        *,
        path: str = "",
        expert_ids: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        n, d = base_layer.in_features, base_layer.out_features
        if lora_A.dim() != 3 or lora_A.shape[2] != n:
            raise ValueError(f"{path}: lora_A must be [N, r, {n}], got {list(lora_A.shape)}")
        if lora_B.shape != (lora_A.shape[0], d, lora_A.shape[1]):
            raise ValueError(
                f"{path}: lora_B must be [{lora_A.shape[0]}, {d}, {lora_A.shape[1]}], "
                f"got {list(lora_B.shape)}"
            )
        self.base_layer = base_layer
        self.router = router.to(base_layer.weight.device)  # its rows were built on the CPU
        self.path = path
        self.expert_ids = None if expert_ids is None else list(expert_ids)
        weight = base_layer.weight
        for name, factor in (("lora_A", lora_A), ("lora_B", lora_B)):
            stored = factor_layout(factor.to(weight.device, weight.dtype))
            self.register_buffer(name, stored, persistent=False)
        # Row offsets within an expert's block of `A^T` and of `B^T` (`pair_update`).
        self.register_buffer("a_offsets", torch.arange(n, device=weight.device), persistent=False)
        rank = lora_A.shape[1]
        self.register_buffer(
            "b_offsets", torch.arange(rank, device=weight.device), persistent=False
        )
        self.observers: list[Observer] = []

    # Model code reads these off its linears (T5 checks `wo.weight.dtype`).
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def num_experts(self) -> int:
        return int(self.lora_A.shape[0])

    def forward(self, u: Tensor) -> Tensor:
        base: Tensor = self.base_layer(u)
        with autocast_off(u.device.type):  # the mixture in its factors' dtype
            indices, weights = self.router(u)
            for observe in self.observers:
                observe(self, indices, weights)
            shape = u.shape[:-1] + indices.shape[-1:]
            if indices.shape != shape:  # one choice per row (fixed routers) for every token
                indices, weights = indices.expand(shape), weights.expand(shape)
            self.selected_update(
                u.reshape(-1, u.shape[-1]).to(self.lora_A.dtype),
                indices.reshape(-1, shape[-1]),
                weights.reshape(-1, shape[-1]),
                out=base.view(-1, base.shape[-1]),
            )
        return base

    def selected_update(
        self, u: Tensor, indices: Tensor, weights: Tensor, out: Tensor | None = None
    ) -> Tensor:
        """sum_k w_tk * B_{z_tk} A_{z_tk} u_t for tokens `u [T, n]`, `indices`/`weights [T, k]`,
        added into `out [T, d]` (zeros when None) and returned.

        `forward` passes the base output as `out`: no zero-filled buffer and no extra add
        (in place is safe, a linear's backward does not read its output), the update cast
        to its dtype. Only the selected work is done, `T*k*r*(n+d)` FLOPs whatever N is.
        One stacked expert: two plain matmuls (`single_expert_update`; gate training's
        backward goes through them). Every expert weighed by every token (k = N, as in
        SMEAR-style merging): two dense matmuls over all the factors
        (`all_experts_update`). Experts with many pairs each: the pairs grouped by expert
        through grouped_mm (`grouped_update`), each expert's factors read once by a matmul.
        Else each pair reads its expert's factor rows through two embedding bags
        (`pair_update`): no sorting, no grouping, no host synchronisation. `u` is in the
        factors' dtype; all four equal up to float summation order.
        """
        if out is None:
            out = u.new_zeros(u.shape[0], self.out_features)
        if indices.numel() == 0:
            return out
        if self.num_experts == 1:
            return self.single_expert_update(u, weights, out)
        if indices.shape[1] == self.num_experts:
            return self.all_experts_update(u, indices, weights, out)
        threshold = GROUPED_MIN_PAIRS.get(u.dtype)
        many_pairs = threshold is not None and indices.numel() >= threshold * self.num_experts
        if many_pairs and grouped_mm_applies(u, self.lora_A, self.lora_B, weights):
            return self.grouped_update(u, indices, weights, out)
        return out.add_(self.pair_update(u, indices, weights))

    def single_expert_update(self, u: Tensor, weights: Tensor, out: Tensor) -> Tensor:
        """`selected_update` when one expert is stacked (gate training, single, merged, whose
        rank can reach min(n, d)): every pair is that expert's, so two plain matmuls do it,
        with no sorting, grouping or gathering (and a backward that gate training can use)."""
        hidden = u @ self.lora_A[0].T  # [T, r]
        hidden = hidden * weights.sum(-1, keepdim=True).to(u.dtype)
        if out.dtype == hidden.dtype:
            return out.addmm_(hidden, self.lora_B[0].T)
        return out.add_(hidden @ self.lora_B[0].T)

    def all_experts_update(
        self, u: Tensor, indices: Tensor, weights: Tensor, out: Tensor
    ) -> Tensor:
        """`selected_update` when every token weighs every stacked expert (SMEAR-style
        merging, or top_k = N): `sum_z w_tz B_z A_z u_t` as two dense products over the
        stacked factors, `A_all u` (`[N, T, r]`, one batched matmul that reads each `A_z^T`
        block in place), each expert's r-wide block scaled by its weight, then one
        `[T, N*r] x [N*r, d]` matmul. No `d x n` matrix is ever formed, per example or at
        all; the FLOPs are the pairs' `T*N*r*(n+d)`, in two large matmuls instead of
        `T*N` small ones."""
        tokens, num = indices.shape
        # Each row of `indices` is a permutation of the experts: put the weights in stack order.
        dense = torch.zeros(tokens, num, dtype=u.dtype, device=u.device)
        dense.scatter_(1, indices, weights.to(u.dtype))
        hidden = torch.matmul(u, self.lora_A.transpose(1, 2))  # [N, T, r]
        hidden = (hidden * dense.T.unsqueeze(2)).transpose(0, 1).reshape(tokens, -1)
        b_rows = self.lora_B.transpose(1, 2).reshape(-1, self.out_features)  # [N*r, d], a view
        if out.dtype == hidden.dtype:
            return out.addmm_(hidden, b_rows)
        return out.add_(hidden @ b_rows)

    def pair_update(self, u: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """The mixture `[T, d]` through two embedding bags over the factors' rows.

        Row `z*n + i` of `A^T [N*n, r]` is column i of `A_z`, so the bag of a pair's n
        rows weighted by `w u_t` is `w A_z u_t` ([T*k, r]); row `z*r + j` of
        `B^T [N*r, d]` is column j of `B_z`, so the bag of a token's k*r rows weighted by
        those hiddens is its whole update ([T, d]). Each pair reads its expert's factors
        once, in place: nothing is gathered, sorted or padded, and a token's k products
        are summed inside the second bag.
        """
        tokens, k = indices.shape
        lora_A, lora_B = self.lora_A, self.lora_B
        num, rank, n = lora_A.shape
        a_rows = lora_A.transpose(1, 2).reshape(num * n, rank)  # views in factor_layout
        b_rows = lora_B.transpose(1, 2).reshape(num * rank, -1)
        pair_rows = torch.add(self.a_offsets, indices.reshape(-1, 1), alpha=n)  # z*n + i
        scaled = u.unsqueeze(1) * weights.to(u.dtype).unsqueeze(2)  # w_tk u_t, [T, k, n]
        # Flat bags with explicit starts: cheaper per call than 2-D bags (no reshapes inside).
        hidden = F.embedding_bag(
            pair_rows.view(-1),
            a_rows,
            torch.arange(0, tokens * k * n, n, device=u.device),
            mode="sum",
            per_sample_weights=scaled.view(-1),
        )  # [T*k, r]
        token_rows = torch.add(self.b_offsets, indices.unsqueeze(2), alpha=rank)  # z*r + j
        return F.embedding_bag(
            token_rows.view(-1),
            b_rows,
            torch.arange(0, tokens * k * rank, k * rank, device=u.device),
            mode="sum",
            per_sample_weights=hidden.view(-1),
        )

    def grouped_update(self, u: Tensor, indices: Tensor, weights: Tensor, out: Tensor) -> Tensor:
        """`selected_update` through `F.grouped_mm`: the pairs sorted by expert form one
        jagged `[pairs, n]` operand, `offs` marks where each expert's pairs end. Two calls,
        no padding, no Python loop over experts and no host synchronisation; grouped_mm
        itself runs one matmul per expert, so it pays where experts have many pairs."""
        k = indices.shape[1]
        flat_expert = indices.reshape(-1)
        order = flat_expert.argsort(stable=True)  # pairs grouped by expert
        ends = torch.bincount(flat_expert, minlength=self.num_experts).cumsum(0)
        ends = ends.to(torch.int32)  # grouped_mm wants int32 offsets
        rows = order // k if k > 1 else order
        # index_select copies whole rows; indexing with `[rows]` goes element by element.
        inputs = u.index_select(0, rows)  # [pairs, n]
        hidden = F.grouped_mm(inputs, self.lora_A.transpose(1, 2), offs=ends)  # [pairs, r]
        # The weight scales the r-wide hidden, not the d-wide output.
        hidden = hidden * weights.reshape(-1, 1).index_select(0, order).to(u.dtype)
        delta = F.grouped_mm(hidden, self.lora_B.transpose(1, 2), offs=ends)  # [pairs, d]
        return out.index_add_(0, rows, delta.to(out.dtype))

"""What one routed linear computes: the selected-only expert mixture.

Every method shares `RoutedLinear`; a method differs only in its router (`routers.py`: who
is chosen for a token, with what weight) and in the low-rank factors stacked into the
layer. Here is how the chosen experts' updates are computed, by one of four paths that
agree up to float summation order (docs/routing.md): plain matmuls when one expert is
stacked, gathered factors for a token or two, `grouped_mm` over the pairs sorted by
expert, or padded batched matmuls.
Shapes: `u` is a module's input `[..., n]`, `W` is `[d, n]`, `N` experts of rank <= `r`.
"""

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Up to this many tokens, `RoutedLinear.gathered_update` gathers the selected experts'
# factors instead of sorting pairs by expert (measured in docs/routing.md).
FEW_TOKENS = 2
# Experts with at most this many (token, slot) pairs (or twice the mean count, if larger)
# share one padded batched matmul in `RoutedLinear.selected_update`.
PAD_MIN_WIDTH = 8


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
    second grouped_mm reads; with any graph the padded path is used.
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


def stack_updates(updates: Sequence[tuple[Tensor, Tensor, float]]) -> tuple[Tensor, Tensor]:
    """Stack `(A [r_z, n], B [d, r_z], scale_z)` into `A [N, r_max, n]`, `B [N, d, r_max]`.

    The scale is folded into B, and lower ranks are zero-padded: a zero row of A meets a
    zero column of B, so the product `B_z A_z` is unchanged.
    """
    if not updates:
        raise ValueError("stack_updates needs at least one (A, B, scale) update")
    n, d = updates[0][0].shape[1], updates[0][1].shape[0]
    r_max = max(a.shape[0] for a, _, _ in updates)
    lora_A = torch.zeros(len(updates), r_max, n)
    lora_B = torch.zeros(len(updates), d, r_max)
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


Observer = Callable[["RoutedLinear", Tensor], None]


class RoutedLinear(nn.Module):
    """y = W u + sum_{z in E_u} w_z * scale_z * B_z A_z u, computing only the selected experts.

    `base_layer` is the model's own `nn.Linear` (shared, never copied); `lora_A`
    `[N, r, n]` and `lora_B` `[N, d, r]` (scale folded in) are stacked once at build time.
    `expert_ids[i]` is the index, in the routed model's expert list, of stacked expert i
    (None when the stacked experts are not real experts, as for merged).
    """

    lora_A: Tensor
    lora_B: Tensor

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
        self.register_buffer("lora_A", lora_A.to(weight.device, weight.dtype), persistent=False)
        self.register_buffer("lora_B", lora_B.to(weight.device, weight.dtype), persistent=False)
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
        indices, weights = self.router(u)
        for observe in self.observers:
            observe(self, indices)
        shape = u.shape[:-1] + indices.shape[-1:]
        update = self.selected_update(
            u.reshape(-1, u.shape[-1]),
            indices.expand(shape).reshape(-1, shape[-1]),
            weights.expand(shape).reshape(-1, shape[-1]),
        )
        base: Tensor = self.base_layer(u)
        return base + update.reshape(*u.shape[:-1], -1)

    def selected_update(self, u: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """sum_k w_tk * B_{z_tk} A_{z_tk} u_t for tokens `u [T, n]`, `indices`/`weights [T, k]`.

        Only the selected work is done, `T*k*r*(n+d)` FLOPs whatever N is: the (token,
        slot) pairs are grouped by expert so each expert's factors are read once (gathering
        A and B per pair would materialise `T*k*r*(n+d)` weights), except with one stacked
        expert (`single_expert_update`: nothing to group) and for a token or two, where
        gathering is cheaper than grouping (`gathered_update`). Otherwise `grouped_update`
        (one `F.grouped_mm` per factor, where it applies) or `padded_update` (batched
        matmuls over a padded block); all equal up to float summation order.
        """
        if indices.numel() == 0:
            return u.new_zeros(u.shape[0], self.out_features)
        if self.num_experts == 1:
            return self.single_expert_update(u, weights)
        if u.shape[0] <= FEW_TOKENS:
            return self.gathered_update(u, indices, weights)
        if grouped_mm_applies(u, self.lora_A, self.lora_B, weights):
            return self.grouped_update(u, indices, weights)
        return self.padded_update(u, indices, weights)

    def single_expert_update(self, u: Tensor, weights: Tensor) -> Tensor:
        """`selected_update` when one expert is stacked (gate training, single, merged, whose
        rank can reach min(n, d)): every pair is that expert's, so two plain matmuls do it,
        with no sorting, grouping or gathering (and a backward that gate training can use)."""
        hidden = u @ self.lora_A[0].T  # [T, r]
        hidden = hidden * weights.sum(-1, keepdim=True).to(u.dtype)
        return hidden @ self.lora_B[0].T

    def gathered_update(self, u: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """`selected_update` for a token or two (cached generation): each pair gathers its
        expert's factors, `k*r*(n+d)` weights per token, and two batched matmul-vector
        products do the rest; no sorting or grouping."""
        tokens, k = indices.shape
        flat_expert = indices.reshape(-1)
        inputs = u.repeat_interleave(k, dim=0) if k > 1 else u  # [pairs, n]
        hidden = torch.bmm(self.lora_A[flat_expert], inputs[:, :, None])  # [pairs, r, 1]
        hidden = hidden * weights.reshape(-1, 1, 1).to(u.dtype)
        delta = torch.bmm(self.lora_B[flat_expert], hidden)  # [pairs, d, 1]
        return delta.view(tokens, k, self.out_features).sum(1)

    def grouped_update(self, u: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """`selected_update` through `F.grouped_mm`: the pairs sorted by expert form one
        jagged `[pairs, n]` operand, `offs` marks where each expert's pairs end. Two calls,
        no padding, no Python loop over experts and no host synchronisation."""
        tokens, k = indices.shape
        flat_expert = indices.reshape(-1)
        order = flat_expert.argsort(stable=True)  # pairs grouped by expert
        ends = torch.bincount(flat_expert, minlength=self.num_experts).cumsum(0)
        ends = ends.to(torch.int32)  # grouped_mm wants int32 offsets
        rows = order // k if k > 1 else order
        hidden = F.grouped_mm(u[rows], self.lora_A.transpose(1, 2), offs=ends)  # [pairs, r]
        # The weight scales the r-wide hidden, not the d-wide output.
        hidden = hidden * weights.reshape(-1)[order, None].to(u.dtype)
        delta = F.grouped_mm(hidden, self.lora_B.transpose(1, 2), offs=ends)  # [pairs, d]
        out = torch.zeros(tokens, self.out_features, dtype=u.dtype, device=u.device)
        return out.index_add_(0, rows, delta)

    def padded_update(self, u: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """`selected_update` with plain matmuls, for wherever `grouped_mm` does not apply.

        Experts with few pairs, the common case when N is large, go together through
        two batched matmuls over a padded `[experts, width]` block of their pairs; an
        expert with more than `width` pairs (skewed routing, a fixed router) gets its own
        matmuls, so padding never more than doubles the block's work.
        """
        tokens, k = indices.shape
        flat_expert = indices.reshape(-1)
        flat_weight = weights.reshape(-1).to(u.dtype)
        order = flat_expert.argsort(stable=True)  # pairs grouped by expert
        counts = torch.bincount(flat_expert, minlength=self.num_experts)
        starts = counts.cumsum(0) - counts  # where each expert's pairs begin in `order`
        present = counts.nonzero().squeeze(1)
        width = max(PAD_MIN_WIDTH, math.ceil(2 * flat_expert.numel() / len(present)))
        # Row `tokens` of the output is a sink for padding, dropped at the end.
        out = torch.zeros(tokens + 1, self.out_features, dtype=u.dtype, device=u.device)

        large = counts[present] > width
        for z in present[large].tolist():
            pairs = order[starts[z] : starts[z] + counts[z]]
            rows = pairs // k
            hidden = (u[rows] @ self.lora_A[z].T) * flat_weight[pairs, None]  # [count, r]
            out.index_add_(0, rows, hidden @ self.lora_B[z].T)

        small = present[~large]
        if len(small):
            # Most experts present: index the stacks by expert id (no copy of the factors);
            # few: gather the present experts' factors into a compact block.
            by_id = 2 * len(small) >= self.num_experts
            slots = small if not by_id else torch.arange(self.num_experts, device=u.device)
            block_rows = small if by_id else torch.arange(len(small), device=u.device)
            small_counts = counts[small]
            row = torch.repeat_interleave(block_rows, small_counts)
            offset = torch.repeat_interleave(small_counts.cumsum(0) - small_counts, small_counts)
            col = torch.arange(len(row), device=u.device) - offset
            pairs = order[torch.repeat_interleave(starts[small], small_counts) + col]
            fill = int(small_counts.max())
            token_block = torch.full((len(slots), fill), tokens, device=u.device)
            token_block[row, col] = pairs // k
            weight_block = torch.zeros(len(slots), fill, 1, dtype=u.dtype, device=u.device)
            weight_block[row, col, 0] = flat_weight[pairs]
            padded_u = torch.cat([u, u.new_zeros(1, u.shape[-1])])[token_block]  # [E, C, n]
            lora_A = self.lora_A if by_id else self.lora_A[slots]
            lora_B = self.lora_B if by_id else self.lora_B[slots]
            hidden = torch.bmm(padded_u, lora_A.transpose(1, 2)) * weight_block  # [E, C, r]
            delta = torch.bmm(hidden, lora_B.transpose(1, 2))  # [E, C, d]
            out.index_add_(0, token_block.reshape(-1), delta.reshape(-1, delta.shape[-1]))
        return out[:tokens]

"""Each method's router rows at one module, and the merged experts' update.

A router row is one vector per expert in the module's input space `R^n`:
- PHATGOOSE: the expert's trained gate vector `v_z` (standardised later, by the router);
- average activation: the mean input `u` of the module over the contributor's examples;
- Arrow: the top right singular vector of the expert's update `B_z A_z`.
SpectR's rows are several per expert: the right singular vectors of its scaled update
`s_z B_z A_z = U_z S_z V_z^T`, optionally scaled by `S_z` (`spectral_rows`, `[N, r_max, n]`).
Retrieval has no rows per module; its bank of example embeddings is built here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from protocol import method_spec

if TYPE_CHECKING:
    from phatgoose.expert import Expert

# SpectR's scores (protocol's list): `||V^T u||` ("input", the authors' code) or
# `||S V^T u||` ("spectrum").
SPECTRAL_SCORES = method_spec("spectr").param("score").choices


def gate_rows(experts: Sequence[Expert], path: str) -> Tensor:
    """PHATGOOSE rows `[N, n]`: each expert's gate vector at `path`."""
    missing = [e.name for e in experts if path not in e.gates]
    if missing:
        raise ValueError(
            f"PHATGOOSE routing needs a gate vector per module; experts {missing} have none "
            f"at {path} (train their gates first, or choose another method)"
        )
    return torch.stack([e.gates[path].float() for e in experts])


def average_activation_rows(experts: Sequence[Expert], path: str) -> Tensor:
    """Average-activation rows `[N, n]`: each expert's mean input activation at `path`."""
    missing = [
        e.name
        for e in experts
        if e.average_activations is None or path not in e.average_activations
    ]
    if missing:
        raise ValueError(
            f"average-activation routing needs each expert's average activations; experts "
            f"{missing} have none at {path} (the contributor computes them, like the gates)"
        )
    return torch.stack([e.average_activations[path].float() for e in experts])  # type: ignore[index]


def arrow_rows(experts: Sequence[Expert], path: str) -> Tensor:
    """Arrow rows `[N, n]`: the top right singular vector of each expert's `B_z A_z`."""
    return torch.stack([top_right_singular_vector(*e.lora_update(path)[:2]) for e in experts])


def top_right_singular_vector(lora_A: Tensor, lora_B: Tensor) -> Tensor:
    """e = first row of V^T in svd(B A), from the factors (`factor_svd`).

    The sign is fixed so that the largest-magnitude entry is positive (Arrow uses |e^T u|,
    so either sign routes the same; fixing it makes rows reproducible).
    """
    _, vh = factor_svd(lora_A, lora_B)
    return _fix_signs(vh[..., :1, :])[..., 0, :].float()


def factor_svd(lora_A: Tensor, lora_B: Tensor) -> tuple[Tensor, Tensor]:
    """Singular values `S [..., m]` and right singular vectors `V^T [..., m, n]` of `B A`
    (`A [..., r, n]`, `B [..., d, r]`, batched or not; m = min(d, r, n)), in float64.

    Never forms the `d x n` product: B = Q R, so B A = Q (R A), and the orthonormal Q leaves
    the singular values and right singular vectors of the small `[r, n]` matrix R A intact.
    """
    _, r_factor = torch.linalg.qr(lora_B.double())
    _, singular, vh = torch.linalg.svd(r_factor @ lora_A.double(), full_matrices=False)
    return singular, vh


def spectral_rows(experts: Sequence[Expert], path: str, score: str = "input") -> Tensor:
    """SpectR bases `[N, r_max, n]` at `path`: per expert, the rows of `V_z^T` in
    `s_z B_z A_z = U_z S_z V_z^T`, scaled by `S_z` for `score="spectrum"` (`spectral_basis`).

    Lower ranks are zero-padded: a zero row adds 0 to `||bases_z u||`, so scores are exact.
    """
    updates = [e.lora_update(path) for e in experts]
    bases = [spectral_basis(a, b, scale, score) for a, b, scale in updates]
    r_max = max(basis.shape[0] for basis in bases)
    stacked = torch.zeros(len(bases), r_max, bases[0].shape[1])
    for z, basis in enumerate(bases):
        stacked[z, : basis.shape[0]] = basis
    return stacked


def spectral_basis(
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float | Tensor = 1.0,
    score: str = "input",
) -> Tensor:
    """Rows `[..., m, n]` whose norm against a token is the expert's SpectR score, from the
    factors of `scale * B A` (`A [..., r, n]`, `B [..., d, r]`, m = min(d, r, n); batched
    factors take a `[...]` tensor of scales).

    `"input"`: the right singular vectors `V^T` (score `||V^T u||`, the part of u in the
    update's input subspace); `"spectrum"`: `S V^T` (score `||S V^T u|| = ||scale B A u||`).
    Directions with a zero singular value (below float64 round-off: B = 0, or A or B of
    lower rank than r) are not in the subspace and become zero rows. Computed in float64,
    returned in float32.
    """
    if score not in SPECTRAL_SCORES:
        raise ValueError(
            f"SpectR score must be one of {', '.join(map(repr, SPECTRAL_SCORES))}, got {score!r}"
        )
    # The SVD of the unscaled product, so that V^T is bit for bit Arrow's row at rank 1;
    # a scale multiplies every singular value by |scale| and leaves V unchanged.
    singular, vh = factor_svd(lora_A, lora_B)
    singular = singular * torch.as_tensor(scale, dtype=torch.float64).abs()[..., None]
    # matrix_rank's default tolerance: max(d, n) * eps * the largest singular value.
    size = max(lora_B.shape[-2], lora_A.shape[-1])
    tolerance = singular.amax(-1, keepdim=True) * size * torch.finfo(torch.float64).eps
    weights = singular if score == "spectrum" else torch.ones_like(singular)
    weights = torch.where(singular > tolerance, weights, 0.0)
    return (_fix_signs(vh) * weights[..., None]).float()


def _fix_signs(vh: Tensor) -> Tensor:
    """Each row's sign chosen so its largest-magnitude entry is positive (reproducible rows;
    a norm or |.| does not see the sign)."""
    largest = vh.gather(-1, vh.abs().argmax(-1, keepdim=True))
    return vh * torch.where(largest < 0, -1.0, 1.0).to(vh.dtype)


def merged_update(experts: Sequence[Expert], path: str) -> tuple[Tensor, Tensor]:
    """Factors `(A [m, n], B [d, m])` with `B A = Delta W = (1/N) sum_z scale_z B_z A_z`.

    Averaging the outer products (not A and B apart) can reach rank `sum_z r_z`. While that
    is below min(d, n) the concatenated factors are exact and cheapest; past it the dense
    average is carried whole on the narrower side (an identity on the other), still exact.
    """
    updates = [e.lora_update(path) for e in experts]
    shapes = {
        e.name: (tuple(a.shape), tuple(b.shape))
        for e, (a, b, _) in zip(experts, updates, strict=True)
    }
    if len(set(shapes.values())) > 1:
        raise ValueError(
            f"merged experts need identical architectures, but at {path} the experts' "
            f"(A, B) shapes differ: {shapes}"
        )
    count = len(updates)
    lora_A = torch.cat([a.float() for a, _, _ in updates])
    lora_B = torch.cat([b.float() * (scale / count) for _, b, scale in updates], dim=1)
    n, d = lora_A.shape[1], lora_B.shape[0]
    if lora_A.shape[0] <= min(d, n):
        return lora_A, lora_B
    delta = lora_B @ lora_A
    return (torch.eye(n), delta) if n <= d else (delta, torch.eye(d))


def retrieval_bank(experts: Sequence[Expert]) -> tuple[Tensor, Tensor]:
    """All experts' example embeddings `[M, e]` (unit length) and each one's owner `[M]`."""
    missing = [e.name for e in experts if e.retrieval_embeddings is None]
    if missing:
        raise ValueError(
            f"retrieval routing needs each expert's retrieval embeddings; experts {missing} "
            "shipped none (retrieval.safetensors is opt-in)"
        )
    dims = {e.name: e.retrieval_embeddings.shape[-1] for e in experts}  # type: ignore[union-attr]
    if len(set(dims.values())) > 1:
        raise ValueError(f"retrieval embeddings must share one width; got {dims}")
    embeddings = torch.cat([e.retrieval_embeddings.float() for e in experts])  # type: ignore[union-attr]
    owner = torch.cat(
        [
            torch.full((e.retrieval_embeddings.shape[0],), z, dtype=torch.long)  # type: ignore[union-attr]
            for z, e in enumerate(experts)
        ]
    )
    return torch.nn.functional.normalize(embeddings, dim=-1), owner

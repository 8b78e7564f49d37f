"""Each method's router rows at one module, and the merged experts' update.

A router row is one vector per expert in the module's input space `R^n`:
- PHATGOOSE: the expert's trained gate vector `v_z` (standardised later, by the router);
- average activation: the mean input `u` of the module over the contributor's examples;
- Arrow: the top right singular vector of the expert's update `B_z A_z`.
Retrieval has no rows per module; its bank of example embeddings is built here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from phatgoose.expert import Expert


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
    """e = first row of V^T in svd(B A), from the factors: B = Q R so B A = Q (R A), and the
    orthonormal Q leaves the right singular vectors of the small `[r, n]` matrix R A intact.

    The sign is fixed so that the largest-magnitude entry is positive (Arrow uses |e^T u|,
    so either sign routes the same; fixing it makes rows reproducible).
    """
    _, r_factor = torch.linalg.qr(lora_B.double())
    _, _, vh = torch.linalg.svd(r_factor @ lora_A.double(), full_matrices=False)
    row: Tensor = vh[0]
    return (row * row[row.abs().argmax()].sign()).float()


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

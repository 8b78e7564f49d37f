"""The paper's qualitative analysis, from the routing statistics stored with a result.

The worker stores, per task, `coordinator.worker.routing_summary` (docs/coordinator.md,
"Routing statistics"): the routed model's expert names, k, the layer labels and
`frequencies[e][l]`, the share of layer l's top-k selections (over every scored token and
every module of the layer) that went to expert e; each column sums to 1. Raw
`RoutingStats.to_dict()` counts per module are read too. From them:

- per layer: the experts x layers matrix, the heatmap on a release's page;
- the routing distribution on the task, `p[e]`: expert e's share of all the task's
  selections, i.e. the stored `overall[e]` (equivalently the columns averaged with weights
  `selections[l]`; with neither stored, the plain mean over the layers that selected
  anything);
- its divergence from the Oracle's choice, a one-hot on the best single expert `o` for the
  task: `KL(onehot_o || p) = sum_z onehot_o[z] log(onehot_o[z] / p[z]) = -log p[o]`.
  With top-k routing every token selects k experts, so `p[o] <= 1/k` and `KL >= log k`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from coordinator.experts.models import ExpertVersion

if TYPE_CHECKING:
    from phatgoose.routing.stats import RoutingStats


class UnreadableStats(ValueError):
    """Stored routing statistics in neither known shape, or inconsistent."""


@dataclass(frozen=True)
class LayerRouting:
    """`frequencies[e][l]`: the share of layer l's selections that went to expert e."""

    experts: list[str]
    layers: list[str]
    frequencies: list[list[float]]
    top_k: int
    selections: list[int] | None = None  # selections per layer, where stored
    overall: list[float] | None = None  # each expert's share over all layers, where stored


def per_layer_routing(data: Mapping[str, Any]) -> LayerRouting:
    """The experts x layers matrix from either stored shape."""
    try:
        if "frequencies" in data:
            routing = LayerRouting(
                experts=[str(name) for name in data["experts"]],
                layers=[str(label) for label in data["layers"]],
                frequencies=[[float(v) for v in row] for row in data["frequencies"]],
                top_k=int(data.get("top_k") or 0),
                selections=[int(v) for v in data["selections"]] if "selections" in data else None,
                overall=[float(v) for v in data["overall"]] if "overall" in data else None,
            )
        else:
            stats = _stats_from_counts(data)
            layers, matrix = stats.per_layer()
            routing = LayerRouting(
                experts=list(stats.expert_names),
                layers=layers,
                frequencies=matrix.tolist(),
                top_k=stats.top_k,
            )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise UnreadableStats(f"routing statistics are not readable: {error!r}") from error
    if len(routing.frequencies) != len(routing.experts) or any(
        len(row) != len(routing.layers) for row in routing.frequencies
    ):
        raise UnreadableStats(
            f"routing statistics name {len(routing.experts)} experts and "
            f"{len(routing.layers)} layers but hold a matrix of another shape"
        )
    return routing


def _stats_from_counts(data: Mapping[str, Any]) -> RoutingStats:
    # torch only here: the coordinator starts (and serves most pages) without importing it.
    import torch

    from phatgoose.routing.stats import RoutingStats

    names = [str(name) for name in data["experts"]]
    counts = {
        str(path): torch.tensor([int(c) for c in row], dtype=torch.long)
        for path, row in data["counts"].items()
    }
    for path, row in counts.items():
        if len(row) != len(names):
            raise ValueError(f"module {path} counts {len(row)} experts, not {len(names)}")
    return RoutingStats(expert_names=names, top_k=int(data.get("top_k") or 0), counts=counts)


def routing_distribution(routing: LayerRouting) -> list[float]:
    """`p[e]`: expert e's share of the task's selections over every layer."""
    if routing.overall is not None and len(routing.overall) == len(routing.experts):
        return list(routing.overall)
    weights = [
        (routing.selections[layer] if routing.selections else 1.0)
        if sum(row[layer] for row in routing.frequencies) > 0
        else 0.0
        for layer in range(len(routing.layers))
    ]
    total = sum(weights)
    if total <= 0:
        return [0.0] * len(routing.experts)
    return [
        sum(w * f for w, f in zip(weights, row, strict=True)) / total for row in routing.frequencies
    ]


def kl_from_oracle(distribution: Sequence[float], oracle: int) -> float:
    """`KL(onehot_oracle || p) = -log p[oracle]`; infinite when the oracle is never chosen."""
    share = distribution[oracle]
    return math.inf if share <= 0 else -math.log(share)


def expert_position(
    names: Sequence[str], version: ExpertVersion, release_size: int, position: int
) -> int | None:
    """Where `version` sits among the statistics' expert names: by its ref
    (`ns/name@v`), its full name or its manifest name; else by its position in the release
    when the statistics name exactly the release's experts."""
    candidates = (version.ref, version.expert.full_name, str(version.manifest.get("name", "")))
    for candidate in candidates:
        if candidate and candidate in names:
            return list(names).index(candidate)
    if len(names) == release_size and 0 <= position < len(names):
        return position
    return None


@dataclass(frozen=True)
class OracleDivergence:
    """The KL of one task, or why there is none (`reason`)."""

    kl: float | None
    oracle_share: float | None
    oracle_ref: str | None
    reason: str | None = None


def oracle_divergence(
    data: Mapping[str, Any] | None,
    versions: Sequence[ExpertVersion],
    oracle: ExpertVersion | None,
) -> OracleDivergence:
    """KL between a release's routing on a task and the Oracle's one-hot choice."""
    if data is None:
        return OracleDivergence(None, None, None, "no routing statistics were stored")
    if oracle is None:
        return OracleDivergence(
            None,
            None,
            None,
            "no Oracle: no single-expert release of this release's experts was evaluated "
            "on this task",
        )
    try:
        routing = per_layer_routing(data)
    except UnreadableStats as error:
        return OracleDivergence(None, None, oracle.ref, str(error))
    distribution = routing_distribution(routing)
    position = next((i for i, v in enumerate(versions) if v.id == oracle.id), -1)
    index = expert_position(routing.experts, oracle, len(versions), position)
    if index is None:
        return OracleDivergence(
            None, None, oracle.ref, f"the routing statistics do not name {oracle.ref}"
        )
    return OracleDivergence(kl_from_oracle(distribution, index), distribution[index], oracle.ref)

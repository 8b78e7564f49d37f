"""The paper's qualitative analysis, from the routing statistics stored with a result.

A result's `routing_stats` is `phatgoose.routing.RoutingStats.to_dict()`: the routed
model's expert names, k, and per module path the number of times each expert was selected
(every top-k slot of every token). From it:

- per layer: the share of selections each expert gets in each block (experts x layers,
  each column sums to 1), the heatmap on a release's page;
- the routing distribution on the task: `p = mean over modules of counts / sum(counts)`
  (modules that selected nothing are left out);
- its divergence from the Oracle's choice, a one-hot on the best single expert `o` for the
  task: `KL(onehot_o || p) = sum_z onehot_o[z] log(onehot_o[z] / p[z]) = -log p[o]`.
  With top-k routing every token selects k experts, so `p[o] <= 1/k` and `KL >= log k`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from coordinator.experts.models import ExpertVersion
from phatgoose.routing.stats import RoutingStats


class UnreadableStats(ValueError):
    """Stored routing statistics that are not `RoutingStats.to_dict()`."""


def stats_from_json(data: Mapping[str, Any]) -> RoutingStats:
    """The stored dictionary back as `RoutingStats` (counts as int64 tensors)."""
    try:
        names = [str(name) for name in data["experts"]]
        counts = {
            str(path): torch.tensor([int(c) for c in row], dtype=torch.long)
            for path, row in data["counts"].items()
        }
        top_k = int(data.get("top_k") or 0)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise UnreadableStats(f"routing statistics are not readable: {error!r}") from error
    for path, row in counts.items():
        if len(row) != len(names):
            raise UnreadableStats(
                f"module {path} counts {len(row)} experts, the statistics name {len(names)}"
            )
    return RoutingStats(expert_names=names, top_k=top_k, counts=counts)


@dataclass(frozen=True)
class LayerRouting:
    """`frequencies[z][l]`: the share of layer l's selections that went to expert z."""

    experts: list[str]
    layers: list[str]
    frequencies: list[list[float]]
    top_k: int


def per_layer_routing(data: Mapping[str, Any]) -> LayerRouting:
    stats = stats_from_json(data)
    layers, matrix = stats.per_layer()
    return LayerRouting(
        experts=list(stats.expert_names),
        layers=layers,
        frequencies=matrix.tolist(),
        top_k=stats.top_k,
    )


def routing_distribution(data: Mapping[str, Any]) -> list[float]:
    """`p[z]`: expert z's share of selections, averaged over the modules that routed."""
    stats = stats_from_json(data)
    shares = [
        stats.frequencies(path) for path, counts in stats.counts.items() if int(counts.sum()) > 0
    ]
    if not shares:
        return [0.0] * len(stats.expert_names)
    return torch.stack(shares).mean(dim=0).tolist()


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
        stats = stats_from_json(data)
        distribution = routing_distribution(data)
    except UnreadableStats as error:
        return OracleDivergence(None, None, oracle.ref, str(error))
    position = next((i for i, v in enumerate(versions) if v.id == oracle.id), -1)
    index = expert_position(stats.expert_names, oracle, len(versions), position)
    if index is None:
        return OracleDivergence(
            None, None, oracle.ref, f"the routing statistics do not name {oracle.ref}"
        )
    return OracleDivergence(kl_from_oracle(distribution, index), distribution[index], oracle.ref)

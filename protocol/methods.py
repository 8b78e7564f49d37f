"""The routing methods (../shared/METHOD.md) and what each asks of a release.

The one list of methods: the library's routers, the coordinator's release checks, its API
and the benchmarks all read it from here. Pure data, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal, TypeGuard, get_args

# The router's numerics, recorded in every release so that its results stay reproducible:
# 1: a router row (gate or average activation) standardised like a token, LayerNorm with
#    eps = 1e-5 under the square root. Freshly trained gates have variances near 1e-5, so
#    eps shrank each expert's row by its own factor and gate scale decided routing.
# 2: a router row standardised scale-free, (v - mean) / std (a constant row -> zeros): v and
#    c * v route the same for any c > 0. Tokens keep LayerNorm's eps in both.
ROUTER_NUMERICS: Final = 2

RoutingMethod = Literal[
    "phatgoose", "arrow", "average_activation", "retrieval", "merged", "single", "base"
]
METHODS: tuple[RoutingMethod, ...] = get_args(RoutingMethod)


@dataclass(frozen=True)
class ContributorVector:
    """Router vectors a contributor computes on their private data and ships with the LoRA.

    `name` is also the `check` a release refuses with when a version lacks them;
    `manifest_flag` is the `ExpertManifest` field that says the package has them (None for
    vectors every package must have).
    """

    name: str
    description: str
    manifest_flag: str | None

    def shipped_in(self, manifest: Mapping[str, object]) -> bool:
        """Whether an expert manifest (its JSON object) says the package ships them."""
        return self.manifest_flag is None or bool(manifest.get(self.manifest_flag))


GATE = ContributorVector("gate", "gates", None)
AVERAGE_ACTIVATION = ContributorVector(
    "average_activation", "average activations", "has_average_activation"
)
RETRIEVAL_EMBEDDINGS = ContributorVector(
    "retrieval", "retrieval embeddings", "has_retrieval_embeddings"
)


@dataclass(frozen=True)
class MethodSpec:
    """What a routing method needs from a release.

    `per_token`: each token goes to its own top-k experts, so the method takes `top_k`.
    `needs`: the vectors every expert must ship (beyond the LoRA, which all methods use).
    `takes_experts`: False for the base model alone.
    `single_expert`: one expert, named by `expert`, serves every input.
    `same_shapes`: the experts are averaged, so they share rank and adapted modules.
    `standardises_rows`: its router rows are standardised, the rule `ROUTER_NUMERICS` names.
    """

    name: RoutingMethod
    summary: str
    per_token: bool = False
    needs: tuple[ContributorVector, ...] = ()
    takes_experts: bool = True
    single_expert: bool = False
    same_shapes: bool = False
    standardises_rows: bool = False


METHOD_SPECS: Mapping[RoutingMethod, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "phatgoose",
            "per token and module, top-k over the experts' trained gates",
            per_token=True,
            needs=(GATE,),
            standardises_rows=True,
        ),
        MethodSpec(
            "arrow",
            "per token and module, top-k over each update's top right singular vector",
            per_token=True,
        ),
        MethodSpec(
            "average_activation",
            "as PHATGOOSE, with each module's mean training activation as the router row",
            per_token=True,
            needs=(AVERAGE_ACTIVATION,),
            standardises_rows=True,
        ),
        MethodSpec(
            "retrieval",
            "the whole query to the expert owning its most similar training input",
            needs=(RETRIEVAL_EMBEDDINGS,),
        ),
        MethodSpec("merged", "the uniform average of the experts' updates", same_shapes=True),
        MethodSpec("single", "one named expert for every input", single_expert=True),
        MethodSpec("base", "the base model alone, no experts", takes_experts=False),
    )
}
TOKEN_METHODS: tuple[RoutingMethod, ...] = tuple(m for m in METHODS if METHOD_SPECS[m].per_token)


def is_method(name: str) -> TypeGuard[RoutingMethod]:
    return name in METHOD_SPECS


def method_spec(name: str) -> MethodSpec:
    """The spec of `name`; a ValueError listing the methods for any other name."""
    if not is_method(name):
        raise ValueError(f"unknown routing method {name!r}; expected one of {METHODS}")
    return METHOD_SPECS[name]

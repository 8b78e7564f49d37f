"""The routing methods (../shared/METHOD.md) and what each asks of a release.

The one list of methods: the library's routers, the coordinator's release checks, its API
and the benchmarks all read it from here. Pure data, no torch.
"""

from __future__ import annotations

import math
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
    "phatgoose",
    "phatgoose_example",
    "smear",
    "arrow",
    "spectr",
    "average_activation",
    "retrieval",
    "merged",
    "ties",
    "dare",
    "single",
    "base",
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


# A method parameter's value, as a release manifest stores it (JSON).
ParamValue = float | int | str


@dataclass(frozen=True)
class MethodParam:
    """One hyper-parameter of a method: its default and what values it takes.

    A string parameter takes one of `choices`; a number lies in `[minimum, maximum]`
    (either end open where `exclusive` names it), an integer where `integer`.
    """

    name: str
    description: str
    default: ParamValue
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    exclusive: tuple[Literal["minimum", "maximum"], ...] = ()
    integer: bool = False

    def expected(self) -> str:
        """What the parameter takes, in words (for errors and `--help`)."""
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        kind = "an integer" if self.integer else "a number"
        show = (lambda x: str(int(x))) if self.integer else (lambda x: f"{x:g}")
        bounds = []
        if self.minimum is not None:
            bounds.append(f"{'>' if 'minimum' in self.exclusive else '>='} {show(self.minimum)}")
        if self.maximum is not None:
            bounds.append(f"{'<' if 'maximum' in self.exclusive else '<='} {show(self.maximum)}")
        return kind + (" " + " and ".join(bounds) if bounds else "")

    def check(self, method: str, value: object) -> ParamValue:
        """`value` if the parameter takes it (an integral float for an integer parameter
        becomes an int); else a ValueError naming method, parameter and what it takes."""
        problem = (
            f"method {method!r}: parameter {self.name!r} must be {self.expected()}, got {value!r}"
        )
        if self.choices:
            if not isinstance(value, str) or value not in self.choices:
                raise ValueError(problem)
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(problem)
        if self.integer:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(problem)
            value = int(value)
        elif not math.isfinite(value):
            raise ValueError(problem)
        low, high = self.minimum, self.maximum
        if low is not None and (value < low or ("minimum" in self.exclusive and value == low)):
            raise ValueError(problem)
        if high is not None and (value > high or ("maximum" in self.exclusive and value == high)):
            raise ValueError(problem)
        return value


@dataclass(frozen=True)
class MethodSpec:
    """What a routing method needs from a release.

    `per_token`: each token goes to its own top-k experts.
    `prompt_level`: one decision per example and module, made on the prompt and kept for
    the answer's tokens and during `generate` (as retrieval's).
    `takes_top_k`: the method selects `top_k` experts (per token or per example).
    `needs`: the vectors every expert must ship (beyond the LoRA, which all methods use).
    `takes_experts`: False for the base model alone.
    `single_expert`: one expert, named by `expert`, serves every input.
    `same_shapes`: the experts are averaged, so they share rank and adapted modules.
    `standardises_rows`: its router rows are standardised, the rule `ROUTER_NUMERICS` names.
    `params`: its hyper-parameters (`resolve_params` checks them and fills the defaults;
    a release records every one).
    """

    name: RoutingMethod
    summary: str
    per_token: bool = False
    prompt_level: bool = False
    takes_top_k: bool = False
    needs: tuple[ContributorVector, ...] = ()
    takes_experts: bool = True
    single_expert: bool = False
    same_shapes: bool = False
    standardises_rows: bool = False
    params: tuple[MethodParam, ...] = ()

    def param(self, name: str) -> MethodParam:
        """The parameter called `name`; a KeyError naming the method's parameters otherwise."""
        for param in self.params:
            if param.name == name:
                return param
        raise KeyError(f"method {self.name!r} has no parameter {name!r}")

    def resolve_params(self, given: Mapping[str, object] | None = None) -> dict[str, ParamValue]:
        """Every parameter of the method, `given` values checked and the rest defaulted;
        a ValueError for a parameter the method does not have or a value it does not take."""
        given = dict(given or {})
        known = {p.name: p for p in self.params}
        unknown = sorted(set(given) - set(known))
        if unknown:
            takes = ", ".join(known) if known else "none"
            raise ValueError(
                f"method {self.name!r} has no parameter(s) {', '.join(map(repr, unknown))}; "
                f"its parameters: {takes}"
            )
        return {
            name: param.check(self.name, given[name]) if name in given else param.default
            for name, param in known.items()
        }


# TIES's trim and scale (Yadav et al., 2023: keep the top 20 % of each update by magnitude;
# lambda = 1 where no validation data tunes it), shared by DARE's TIES combination.
_TIES_SCALE = MethodParam(
    "scale", "lambda, the factor applied to the merged update", 1.0, minimum=0.0,
    exclusive=("minimum",),
)  # fmt: skip


METHOD_SPECS: Mapping[RoutingMethod, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "phatgoose",
            "per token and module, top-k over the experts' trained gates",
            per_token=True,
            takes_top_k=True,
            needs=(GATE,),
            standardises_rows=True,
        ),
        MethodSpec(
            "phatgoose_example",
            "per example and module, top-k over the gates by the prompt's mean affinity",
            prompt_level=True,
            takes_top_k=True,
            needs=(GATE,),
            standardises_rows=True,
        ),
        MethodSpec(
            "smear",
            "per example and module, every expert's update merged with softmax weights over "
            "the gates by the prompt's mean affinity (SMEAR-style)",
            prompt_level=True,
            needs=(GATE,),
            standardises_rows=True,
        ),
        MethodSpec(
            "arrow",
            "per token and module, top-k over each update's top right singular vector",
            per_token=True,
            takes_top_k=True,
        ),
        MethodSpec(
            "spectr",
            "per token and module, top-k by how much of the token lies in each update's "
            "input subspace (SpectR)",
            per_token=True,
            takes_top_k=True,
            params=(
                MethodParam(
                    "score",
                    "'input': ||V_e^T u|| (the authors' code); 'spectrum': ||S_e V_e^T u||, "
                    "the norm of the update's output",
                    "input",
                    choices=("input", "spectrum"),
                ),
                MethodParam(
                    "weighting",
                    "'uniform': 1/k to each selected expert (the paper's); 'softmax': a "
                    "softmax over the selected scores",
                    "uniform",
                    choices=("uniform", "softmax"),
                ),
            ),
        ),
        MethodSpec(
            "average_activation",
            "as PHATGOOSE, with each module's mean training activation as the router row",
            per_token=True,
            takes_top_k=True,
            needs=(AVERAGE_ACTIVATION,),
            standardises_rows=True,
        ),
        MethodSpec(
            "retrieval",
            "the whole query to the expert owning its most similar training input",
            needs=(RETRIEVAL_EMBEDDINGS,),
        ),
        MethodSpec("merged", "the uniform average of the experts' updates", same_shapes=True),
        MethodSpec(
            "ties",
            "TIES merging of the experts' updates: trim, elect signs, average the agreeing",
            params=(
                MethodParam(
                    "density",
                    "the fraction of each update's entries kept, by magnitude",
                    0.2,
                    minimum=0.0,
                    maximum=1.0,
                    exclusive=("minimum",),
                ),
                _TIES_SCALE,
            ),
        ),
        MethodSpec(
            "dare",
            "DARE: drop each update entry at random and rescale the rest, then merge",
            params=(
                MethodParam(
                    "drop_rate",
                    "p, the probability of dropping an entry (the rest scaled by 1/(1-p))",
                    0.9,
                    minimum=0.0,
                    maximum=1.0,
                    exclusive=("maximum",),
                ),
                MethodParam(
                    "merge",
                    "'average': the mean of the rescaled updates; 'ties': TIES's sign "
                    "election over them (no trim: the drop replaced it)",
                    "average",
                    choices=("average", "ties"),
                ),
                _TIES_SCALE,
                MethodParam(
                    "seed",
                    "the random drops' seed",
                    0,
                    minimum=0,
                    maximum=2**63 - 1,
                    integer=True,
                ),
            ),
        ),
        MethodSpec("single", "one named expert for every input", single_expert=True),
        MethodSpec("base", "the base model alone, no experts", takes_experts=False),
    )
}
TOKEN_METHODS: tuple[RoutingMethod, ...] = tuple(m for m in METHODS if METHOD_SPECS[m].per_token)
TOP_K_METHODS: tuple[RoutingMethod, ...] = tuple(m for m in METHODS if METHOD_SPECS[m].takes_top_k)
PROMPT_METHODS: tuple[RoutingMethod, ...] = tuple(
    m for m in METHODS if METHOD_SPECS[m].prompt_level
)


def is_method(name: str) -> TypeGuard[RoutingMethod]:
    return name in METHOD_SPECS


def resolve_params(method: str, given: Mapping[str, object] | None = None) -> dict[str, ParamValue]:
    """`method_spec(method).resolve_params(given)`: every parameter, checked or defaulted."""
    return method_spec(method).resolve_params(given)


def method_spec(name: str) -> MethodSpec:
    """The spec of `name`; a ValueError listing the methods for any other name."""
    if not is_method(name):
        raise ValueError(f"unknown routing method {name!r}; expected one of {METHODS}")
    return METHOD_SPECS[name]

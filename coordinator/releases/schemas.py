"""API bodies of releases."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from coordinator.releases.models import Release
from protocol import API_PREFIX, API_VERSION, ApiVersion
from protocol.methods import METHOD_SPECS, TOP_K_METHODS, ParamValue, RoutingMethod
from protocol.privacy import WeakestGuarantee

# The routing methods (protocol.methods, no torch needed), as the API's query parameters
# and bodies name them.
Method = RoutingMethod


def param_text(value: object) -> str:
    """A parameter's value as pages show it: `0.2`, `1` (for 1.0), `7`, `input`."""
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def method_settings(top_k: int | None, params: Mapping[str, object]) -> str:
    """k and the method's parameters: `k=2`, `density 0.2, scale 1`, or ''."""
    settings = [f"k={top_k}"] if top_k else []
    settings += [f"{name} {param_text(value)}" for name, value in params.items()]
    return ", ".join(settings)


def method_label(method: str, top_k: int | None, params: Mapping[str, object]) -> str:
    """The method with its k and parameters: `phatgoose, k=2`, `ties, density 0.2, scale 1`."""
    settings = method_settings(top_k, params)
    return f"{method}, {settings}" if settings else method


def params_help() -> str:
    """Which methods take which parameters, read from their specs (API docs and `--help`)."""
    described = [
        f"{spec.name}: "
        + ", ".join(f"{p.name} ({p.expected()}; default {param_text(p.default)})" for p in params)
        for spec in METHOD_SPECS.values()
        if (params := spec.params)
    ]
    return "; ".join(described) + "; the other methods take none"


class ReleaseCreate(BaseModel):
    """What a maintainer asks for; the coordinator resolves and freezes it."""

    method: Method
    experts: list[str] = Field(
        default_factory=list,
        max_length=1000,
        description="'namespace/name@version', or 'namespace/name' for its newest "
        "version that is not yanked",
        examples=[["alice/hyperbaton@2", "bob/navigate"]],
    )
    top_k: int | None = Field(
        default=None,
        ge=1,
        description=f"experts per token or per example ({', '.join(TOP_K_METHODS)}); "
        "default min(2, number of experts)",
    )
    # Any JSON values: the method's spec checks them, so a refusal names the parameter and
    # what it takes (check "params") rather than a JSON type.
    params: dict[str, Any] | None = Field(
        default=None,
        description="the method's hyper-parameters; those not given take their defaults and "
        f"the release records every one. {params_help()}",
        examples=[{"density": 0.2}],
    )
    expert: str | None = Field(
        default=None,
        description="method=single: the expert to use ('namespace/name[@version]'); may be "
        "its only entry in `experts` too",
    )
    base_model: str | None = Field(
        default=None,
        description="the base model's name: required for method=base, else taken from the "
        "experts (and checked against them if given)",
    )
    allow_yanked: bool = Field(
        default=False, description="accept exact versions that are yanked (never by default)"
    )
    notes: str = Field(default="", max_length=10_000)


class ReleaseExpertInfo(BaseModel):
    ref: str
    namespace: str
    name: str
    version: int
    package_digest: str


class ScoreInfo(BaseModel):
    accuracy: float
    stderr: float
    n: int
    evaluator_version: str
    precision: str | None = None  # float32 or bfloat16 (None: not recorded)
    job_id: int
    group: str | None = None
    routing_stats: dict[str, Any] | None = None


class JobInfo(BaseModel):
    id: int
    state: str


class ScoresSummary(BaseModel):
    tasks: dict[str, ScoreInfo] = Field(description="the newest result per task")
    mean_accuracy: float | None
    group_means: dict[str, float] = Field(description="e.g. held_in, held_out")
    evaluations: list[JobInfo] = Field(description="its newest 100 jobs, oldest first")
    evaluations_total: int = Field(description="all its jobs")


class ReleaseSummary(BaseModel):
    api_version: ApiVersion = API_VERSION
    number: int
    method: str
    top_k: int | None
    method_params: dict[str, ParamValue] = Field(
        description="every hyper-parameter of the method, resolved ({} for methods without any)"
    )
    expert: str | None
    router_numerics: int = Field(
        description="how its token routers standardise their rows (1: releases of manifest "
        "format_version 1, LayerNorm's eps; 2: scale-free); scores of different numerics "
        "are not the same experiment"
    )
    base_model: str
    experts: list[ReleaseExpertInfo]
    notes: str
    artifact_digest: str | None
    created_by: str
    created_at: datetime
    url: str
    manifest_url: str
    # Curation state, read by phatgoose.load_release; never in the frozen manifest.
    withdrawn: bool = Field(description="a maintainer withdrew the release")
    withdrawn_reason: str | None
    yanked_experts: list[str] = Field(
        description="refs (namespace/name@version) of the release's experts yanked now"
    )
    privacy: WeakestGuarantee = Field(
        description="the weakest DP guarantee among its experts: none (epsilon null) when "
        "any was trained without DP (docs/privacy.md)"
    )

    @classmethod
    def of(
        cls, release: Release, yanked_experts: list[str], privacy: WeakestGuarantee
    ) -> ReleaseSummary:
        return cls(**_summary_fields(release, yanked_experts, privacy))


class ReleaseDetail(ReleaseSummary):
    manifest: dict[str, Any] = Field(description="the artifact manifest (also at manifest_url)")
    scores: ScoresSummary

    @classmethod
    def of_scored(
        cls,
        release: Release,
        scores: ScoresSummary,
        yanked_experts: list[str],
        privacy: WeakestGuarantee,
    ) -> ReleaseDetail:
        return cls(
            **_summary_fields(release, yanked_experts, privacy),
            manifest=release.manifest,
            scores=scores,
        )


class WithdrawRequest(BaseModel):
    reason: str = Field(min_length=1, max_length=2000, examples=["an expert routes every token"])


def release_url(number: int) -> str:
    return f"{API_PREFIX}/releases/{number}"


def _summary_fields(
    release: Release, yanked_experts: list[str], privacy: WeakestGuarantee
) -> dict[str, Any]:
    manifest = release.manifest
    return {
        "number": release.number,
        "method": release.method,
        "top_k": release.top_k,
        "method_params": release.method_params,
        "expert": manifest.get("expert"),
        "router_numerics": manifest.get("router_numerics", 1),  # format_version 1: always 1
        "base_model": manifest["base_model"]["name"],
        "experts": [
            ReleaseExpertInfo(
                ref=e["ref"],
                namespace=e["namespace"],
                name=e["name"],
                version=e["version"],
                package_digest=e["package_digest"],
            )
            for e in manifest["experts"]
        ],
        "notes": release.notes,
        "artifact_digest": release.artifact_digest,
        "created_by": release.created_by,
        "created_at": release.created_at,
        "url": release_url(release.number),
        "manifest_url": release_url(release.number) + "/manifest",
        "withdrawn": release.withdrawn_at is not None,
        "withdrawn_reason": release.withdrawn_reason,
        "yanked_experts": yanked_experts,
        "privacy": privacy,
    }

"""API bodies of release channels (docs/coordinator.md, "Release channels")."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from coordinator.channels.models import ChannelEntry, ReleaseChannel
from coordinator.core.params import DB_INT_MAX
from coordinator.evaluations.schemas import EvaluationSpec
from coordinator.leaderboard.schemas import Comparison
from coordinator.releases.schemas import Method, params_help, release_url
from protocol import API_PREFIX, API_VERSION, ApiVersion
from protocol.manifest import SLUG_PATTERN
from protocol.methods import ParamValue

# `namespace/slug`, each part as an expert's; at most 56 characters in all, so that
# `channel:<name>`, what its releases record as their creator, fits a token name's 64.
MAX_CHANNEL_NAME = 56
CHANNEL_NAME_PATTERN = rf"^{SLUG_PATTERN}/{SLUG_PATTERN}$"
ExpertName = Annotated[str, Field(pattern=CHANNEL_NAME_PATTERN, max_length=129)]
Namespace = Annotated[str, Field(pattern=rf"^{SLUG_PATTERN}$")]
# fnmatch's characters over the name's own: * ? [ ] !
NAME_GLOB_PATTERN = r"^[a-z0-9_.\-/*?\[\]!]{1,200}$"
MAX_REASON = 2000


class ChannelRecipe(BaseModel):
    """What the channel's releases are: a method over some of a base model's experts."""

    model_config = ConfigDict(extra="forbid")

    method: Method
    top_k: int | None = Field(
        default=None,
        ge=1,
        le=DB_INT_MAX,
        description="experts per token or per example, capped at the experts there are "
        "(default min(2, experts)); methods that select no top-k take none",
    )
    params: dict[str, Any] | None = Field(
        default=None,
        description=f"the method's hyper-parameters, resolved as a release's. {params_help()}",
    )
    base_model: str | None = Field(
        default=None,
        max_length=200,
        description="the base model's name (default: the only one registered)",
    )
    experts: list[ExpertName] | None = Field(
        default=None,
        min_length=1,
        max_length=1000,
        description="'namespace/name' of each expert, each at its newest version that is not "
        "yanked; null: every admitted expert of the base model that the filter lets through",
        examples=[["alice/hyperbaton", "bob/navigate"]],
    )
    namespaces: list[Namespace] | None = Field(
        default=None,
        min_length=1,
        max_length=1000,
        description="filter (without `experts`): only experts of these namespaces",
    )
    name_glob: str | None = Field(
        default=None,
        pattern=NAME_GLOB_PATTERN,
        description="filter (without `experts`): only experts whose 'namespace/name' matches "
        "this glob (fnmatch: * ? [...])",
        examples=["*/bbh-*"],
    )

    @model_validator(mode="after")
    def _one_selection(self) -> Self:
        if self.experts is not None and (self.namespaces is not None or self.name_glob):
            raise ValueError("give `experts` or a filter (`namespaces`, `name_glob`), not both")
        return self


class ChannelCreate(ChannelRecipe):
    """A new channel: its name, its recipe, the benchmark its releases are evaluated on."""

    name: str = Field(
        pattern=CHANNEL_NAME_PATTERN,
        max_length=MAX_CHANNEL_NAME,
        description=f"'namespace/name' (each as an expert's; {MAX_CHANNEL_NAME} characters "
        "at most)",
        examples=["community/latest"],
    )
    spec: EvaluationSpec | None = Field(
        default=None,
        description="the benchmark each new release is evaluated on, as POST /evaluations "
        "takes it without the release; null: none is queued",
    )
    follow: bool = Field(
        default=True,
        description="build the next release when the catalog changes; false: a pointer that "
        "only maintainers move (pin)",
    )
    notes: str = Field(default="", max_length=10_000)


class ChannelUpdate(BaseModel):
    """`PATCH`: the fields given replace the channel's (null clears an optional one); a
    changed recipe makes the next advance build a release of it."""

    model_config = ConfigDict(extra="forbid")

    method: Method | None = None
    top_k: int | None = Field(default=None, ge=1, le=DB_INT_MAX)
    params: dict[str, Any] | None = None
    base_model: str | None = Field(default=None, max_length=200)
    experts: list[ExpertName] | None = Field(default=None, min_length=1, max_length=1000)
    namespaces: list[Namespace] | None = Field(default=None, min_length=1, max_length=1000)
    name_glob: str | None = Field(default=None, pattern=NAME_GLOB_PATTERN)
    spec: EvaluationSpec | None = None
    follow: bool | None = None
    notes: str | None = Field(default=None, max_length=10_000)


class PinRequest(BaseModel):
    release: int = Field(ge=1, le=DB_INT_MAX, description="the release number to pin to")
    reason: str = Field(default="", max_length=MAX_REASON)


class RollbackRequest(BaseModel):
    reason: str = Field(default="", max_length=MAX_REASON, examples=["release 7 regressed"])


class PauseRequest(BaseModel):
    reason: str = Field(default="", max_length=MAX_REASON)


class ChannelDetail(BaseModel):
    api_version: ApiVersion = API_VERSION
    name: str = Field(description="namespace/name")
    release: int | None = Field(description="the release it points at now (null: none yet)")
    release_url: str | None
    release_withdrawn: bool = Field(
        description="its release was withdrawn since it pointed there: readers get a "
        "release `load_release` refuses until maintainers move the channel (the channel's "
        "advance_error says what it needs)"
    )
    method: str
    top_k: int | None
    method_params: dict[str, ParamValue]
    base_model: str
    experts: list[str] | None
    namespaces: list[str] | None
    name_glob: str | None
    spec: dict[str, Any] | None
    follow: bool
    paused: bool
    paused_reason: str | None
    pinned_release: int | None = Field(description="pinned there: it does not advance")
    sequence: int = Field(description="the number of its newest history entry (0: none)")
    advance_error: str | None = Field(
        description="why the last attempt to advance built nothing although the catalog "
        "changed (null: none)"
    )
    notes: str
    created_by: str
    created_at: datetime
    updated_at: datetime
    url: str
    history_url: str

    @classmethod
    def of(cls, channel: ReleaseChannel) -> ChannelDetail:
        number = channel.release.number if channel.release else None
        return cls(
            name=channel.full_name,
            release=number,
            release_url=None if number is None else release_url(number),
            release_withdrawn=channel.release is not None
            and channel.release.withdrawn_at is not None,
            method=channel.method,
            top_k=channel.top_k,
            method_params=channel.method_params,
            base_model=channel.base_model.name,
            experts=channel.experts,
            namespaces=channel.namespaces,
            name_glob=channel.name_glob,
            spec=channel.spec,
            follow=channel.follow,
            paused=channel.paused,
            paused_reason=channel.paused_reason,
            pinned_release=channel.pinned_release.number if channel.pinned_release else None,
            sequence=channel.sequence,
            advance_error=channel.advance_error,
            notes=channel.notes,
            created_by=channel.created_by,
            created_at=channel.created_at,
            updated_at=channel.updated_at,
            url=channel_url(channel.full_name),
            history_url=channel_url(channel.full_name) + "/history",
        )


class ChannelEntryInfo(BaseModel):
    sequence: int
    release: int
    release_url: str
    action: str = Field(description="advance, pin, unpin or rollback")
    reason: str
    job_id: int | None = Field(description="the evaluation queued with the release, if any")
    created_by: str
    created_at: datetime

    @classmethod
    def of(cls, entry: ChannelEntry, number: int) -> ChannelEntryInfo:
        return cls(
            sequence=entry.sequence,
            release=number,
            release_url=release_url(number),
            action=entry.action,
            reason=entry.reason,
            job_id=entry.job_id,
            created_by=entry.created_by,
            created_at=entry.created_at,
        )


class AdvancedChannel(BaseModel):
    channel: str
    sequence: int
    release: int
    reason: str
    job_id: int | None = Field(description="its evaluation on the channel's spec")
    credit_jobs: list[int] = Field(
        default_factory=list, description="leave-one-out evaluations queued with it"
    )


class AdvanceReport(BaseModel):
    """`POST /channels/advance`: what one pass over the channels did."""

    api_version: ApiVersion = API_VERSION
    advanced: list[AdvancedChannel] = Field(description="channels moved to a new release")
    unchanged: list[str] = Field(description="following channels whose release is current")
    held: list[str] = Field(description="channels not following now: paused, pinned or manual")
    errors: dict[str, str] = Field(description="per channel, why it could not advance")


# --- a release against the previous release of its channel --------------------------------


class ExpertChange(BaseModel):
    name: str = Field(description="namespace/name")
    before: str | None = Field(description="its ref in the previous release (null: added)")
    after: str | None = Field(description="its ref in this release (null: removed)")


class RoutingShift(BaseModel):
    expert: str = Field(description="namespace/name")
    before: float | None = Field(description="its share of the routing decisions before")
    after: float | None = Field(description="and in this release")


class TaskRoutingShift(BaseModel):
    task: str
    total_variation: float = Field(
        description="half the L1 distance between the two routing distributions over "
        "experts on the task (0: routed alike; 1: no expert in common)"
    )


class ChannelDiff(BaseModel):
    """A release against the release its channel pointed at before it."""

    api_version: ApiVersion = API_VERSION
    channel: str
    sequence: int = Field(description="the history entry that brought the channel here")
    reason: str
    release: int
    previous: int | None = Field(description="the release before it (null: the first)")
    experts: list[ExpertChange] = Field(description="the experts added, removed or changed")
    comparison: Comparison | None = Field(
        description="this release (a) against the previous one (b) on the same examples"
    )
    routing: list[RoutingShift] = Field(
        description="each expert's share of the routing decisions (averaged over the tasks) "
        "in the compared evaluations"
    )
    task_routing: list[TaskRoutingShift]


def channel_url(full_name: str) -> str:
    return f"{API_PREFIX}/channels/{full_name}"

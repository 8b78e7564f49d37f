"""Release channels: named, moving pointers to releases that follow the catalog.

A channel (`community/latest`) holds a recipe: a method, its k and parameters over experts
of one base model, either a list of expert names (each at its newest version that is not
yanked) or every admitted expert of the base that a filter lets through (namespaces, a name
glob; not yanked, not blocked, shipping the router vectors the method needs).

- `advance_channels`: for each channel that follows the catalog (`follow`, not paused, not
  pinned), resolve the recipe against the catalog now (`resolve_recipe`); when the expert
  versions, or the recipe itself, differ from its current release's, build the next release
  through `releases.service.create_release`, which calls back (`then`) in the transaction
  that inserts the release: under the channel's row lock, the channel must still be at the
  history entry the plan was made on; the next entry is written, the channel pointed at the
  release and its evaluation queued on the channel's spec (`evaluations.service.new_job`),
  all committed together or not at all. The entry's key (channel, sequence) backs the lock:
  of two workers advancing at once, exactly one commits; the other finds the channel moved
  and its release rolled back (`ChannelMoved`). So a catalog change makes one release.
- Maintainers pin a channel (to any release of its base model), unpin it, roll it back (to
  the release before the current one, and pinned there so that the next pass does not
  advance it again at once), pause and resume it. Every move is a history entry.

What a channel's releases did (the diff to the previous release, the chart of their means)
is read in `coordinator.channels.diff`.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from coordinator.base_models import service as base_models
from coordinator.base_models.models import BaseModelRecord
from coordinator.channels.models import ChannelAction, ChannelEntry, ReleaseChannel
from coordinator.channels.schemas import (
    AdvancedChannel,
    AdvanceReport,
    ChannelCreate,
    ChannelUpdate,
)
from coordinator.core.config import Settings
from coordinator.core.db import begin_write, utcnow
from coordinator.core.errors import Conflict, CoordinatorError, NotFound, Unprocessable
from coordinator.credit import service as credit
from coordinator.evaluations import service as evaluations
from coordinator.evaluations.schemas import EvaluationCreate
from coordinator.experts.models import Block, Expert, ExpertVersion
from coordinator.releases import service as releases
from coordinator.releases.models import Release
from coordinator.releases.schemas import ReleaseCreate, method_label
from coordinator.storage import BlobStore
from protocol.methods import METHOD_SPECS, ParamValue, RoutingMethod

log = logging.getLogger(__name__)

# A history page's rows by default, and the most the API gives in one.
HISTORY_PAGE = 100
# A release's notes hold the reason it was built; reasons past this are cut.
_MAX_NOTES = 10_000


class ChannelRejected(Unprocessable):
    """A channel's recipe, name or action that cannot be (422); `check` says which rule."""

    error = "channel_rejected"
    check = "channel"


class ChannelMoved(Exception):
    """The channel is no longer where an advance planned from: another worker advanced it,
    or a maintainer moved, paused or pinned it meanwhile. Nothing was written."""


# --- the recipe --------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """A checked recipe, as a channel's row holds it."""

    method: RoutingMethod
    top_k: int | None
    method_params: dict[str, ParamValue]
    base: BaseModelRecord
    experts: list[str] | None
    namespaces: list[str] | None
    name_glob: str | None


def check_recipe(
    session: Session,
    *,
    method: RoutingMethod,
    top_k: int | None,
    params: Mapping[str, Any] | None,
    base_model: str | None,
    experts: Sequence[str] | None,
    namespaces: Sequence[str] | None,
    name_glob: str | None,
) -> Recipe:
    """The recipe with its parameters resolved as a release's (`releases.method_params`)
    and its base model found; `ChannelRejected` (or the release's `ReleaseRejected`, both
    422) naming the rule it breaks."""
    spec = METHOD_SPECS[method]
    if not spec.takes_experts:
        raise ChannelRejected(
            f"method {method!r} takes no experts: a channel follows experts",
            check="method",
            expected="a method that routes or merges over experts",
        )
    resolved = releases.method_params(ReleaseCreate(method=method, params=params))
    if not spec.takes_top_k and top_k not in (None, 1):
        raise ChannelRejected(
            f"method {method!r} selects no top-k (got top_k={top_k})", check="top_k"
        )
    if experts is not None and (namespaces is not None or name_glob is not None):
        raise ChannelRejected(
            "give `experts` or a filter (`namespaces`, `name_glob`), not both", check="experts"
        )
    if experts is not None:
        repeated = sorted({name for name in experts if list(experts).count(name) > 1})
        if repeated:
            raise ChannelRejected(
                f"experts repeat: {', '.join(repeated)}",
                check="experts",
                expected="each namespace/name once",
            )
    if spec.single_expert and (experts is None or len(experts) != 1):
        raise ChannelRejected(
            f"method {method!r} serves one expert: give `experts` with exactly one name",
            check="experts",
        )
    return Recipe(
        method=method,
        top_k=top_k if spec.takes_top_k else None,
        method_params=resolved,
        base=_base_model(session, base_model),
        experts=None if experts is None else list(experts),
        namespaces=None if namespaces is None else sorted(set(namespaces)),
        name_glob=name_glob,
    )


def _base_model(session: Session, name: str | None) -> BaseModelRecord:
    if name is not None:
        record = base_models.get_by_name(session, name)
        if record is None:
            raise ChannelRejected(f"base model {name!r} is not registered", check="base_model")
        return record
    registered = base_models.list_base_models(session)
    if len(registered) == 1:
        return registered[0]
    raise ChannelRejected(
        "name the channel's `base_model`: "
        + (", ".join(b.name for b in registered) or "none is registered"),
        check="base_model",
    )


def _apply(channel: ReleaseChannel, recipe: Recipe) -> None:
    channel.method = recipe.method
    channel.top_k = recipe.top_k
    channel.method_params = recipe.method_params
    channel.base_model = recipe.base
    channel.experts = recipe.experts
    channel.namespaces = recipe.namespaces
    channel.name_glob = recipe.name_glob


# --- creating, reading, changing ---------------------------------------------------------


def create_channel(session: Session, request: ChannelCreate, *, by: str) -> ReleaseChannel:
    """A new channel (409 when the name is taken). It has no release until it advances."""
    recipe = check_recipe(
        session,
        method=request.method,
        top_k=request.top_k,
        params=request.params,
        base_model=request.base_model,
        experts=request.experts,
        namespaces=request.namespaces,
        name_glob=request.name_glob,
    )
    namespace, name = request.name.split("/", 1)
    taken = Conflict(f"a release channel named {request.name} exists", check="duplicate")
    if _find(session, namespace, name) is not None:
        session.rollback()
        raise taken
    channel = ReleaseChannel(
        namespace=namespace,
        name=name,
        spec=None if request.spec is None else _spec_json(request.spec.model_dump(mode="json")),
        follow=request.follow,
        notes=request.notes,
        created_by=by,
    )
    _apply(channel, recipe)
    begin_write(session)
    session.add(channel)
    try:
        session.commit()
    except IntegrityError:  # created concurrently
        session.rollback()
        raise taken from None
    log.info(
        "channel %s created by %s: %s on %s",
        channel.full_name,
        by,
        method_label(channel.method, channel.top_k, channel.method_params),
        recipe.base.name,
    )
    return channel


def _spec_json(spec: dict[str, Any]) -> dict[str, Any]:
    """A spec as jobs record it: overrides only when used (`evaluations.job_spec`)."""
    return {k: v for k, v in spec.items() if v is not None and v is not False}


def update_channel(
    session: Session, channel: ReleaseChannel, update: ChannelUpdate, *, by: str
) -> ReleaseChannel:
    """Replace the fields `update` sets; a changed recipe is built at the next advance."""
    given = update.model_fields_set
    method = update.method or channel.method
    if "params" in given:
        params: Mapping[str, Any] | None = update.params
    else:
        params = channel.method_params if method == channel.method else None
    experts, namespaces, name_glob = channel.experts, channel.namespaces, channel.name_glob
    if "experts" in given and update.experts is not None:
        namespaces, name_glob = None, None  # a list replaces the filter
    if given & {"namespaces", "name_glob"} and any(
        value is not None for value in (update.namespaces, update.name_glob)
    ):
        experts = None  # a filter replaces the list
    experts = update.experts if "experts" in given else experts
    namespaces = update.namespaces if "namespaces" in given else namespaces
    name_glob = update.name_glob if "name_glob" in given else name_glob
    recipe = check_recipe(
        session,
        method=method,  # type: ignore[arg-type]  # a stored method is a RoutingMethod
        top_k=update.top_k if "top_k" in given else channel.top_k,
        params=params,
        base_model=update.base_model or channel.base_model.name,
        experts=experts,
        namespaces=namespaces,
        name_glob=name_glob,
    )
    spec = channel.spec
    if "spec" in given:
        spec = None if update.spec is None else _spec_json(update.spec.model_dump(mode="json"))
    locked = _lock(session, channel)
    _apply(locked, recipe)
    locked.spec = spec
    if update.follow is not None:
        locked.follow = update.follow
    if update.notes is not None:
        locked.notes = update.notes
    locked.advance_error = None  # it was about the recipe before
    locked.updated_at = utcnow()
    session.commit()
    log.info("channel %s changed by %s: %s", locked.full_name, by, sorted(given))
    return locked


def _find(session: Session, namespace: str, name: str) -> ReleaseChannel | None:
    return session.scalar(
        select(ReleaseChannel).where(
            ReleaseChannel.namespace == namespace, ReleaseChannel.name == name
        )
    )


def get_channel(session: Session, namespace: str, name: str) -> ReleaseChannel:
    channel = _find(session, namespace, name)
    if channel is None:
        raise NotFound(f"no release channel named {namespace}/{name}")
    return channel


@dataclass(frozen=True)
class ChannelPage:
    items: list[ReleaseChannel]
    total: int


def channel_page(session: Session, *, limit: int, offset: int) -> ChannelPage:
    """One page of the channels by name, and how many there are."""
    total = session.scalar(select(func.count()).select_from(ReleaseChannel)) or 0
    items = session.scalars(
        select(ReleaseChannel)
        .order_by(ReleaseChannel.namespace, ReleaseChannel.name)
        .limit(limit)
        .offset(offset)
    )
    return ChannelPage(items=list(items), total=total)


@dataclass(frozen=True)
class HistoryPage:
    items: list[tuple[ChannelEntry, int]]  # each entry with its release's number
    total: int


def history_page(
    session: Session, channel: ReleaseChannel, *, limit: int = HISTORY_PAGE, offset: int = 0
) -> HistoryPage:
    """One page of a channel's history, newest first, each entry with its release number."""
    rows = session.execute(
        select(ChannelEntry, Release.number)
        .join(Release, Release.id == ChannelEntry.release_id)
        .where(ChannelEntry.channel_id == channel.id)
        .order_by(ChannelEntry.sequence.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    return HistoryPage(items=[(entry, number) for entry, number in rows], total=channel.sequence)


def channel_entries(session: Session, channel_id: int) -> list[ChannelEntry]:
    """A channel's whole history, oldest first."""
    return list(
        session.scalars(
            select(ChannelEntry)
            .where(ChannelEntry.channel_id == channel_id)
            .order_by(ChannelEntry.sequence)
        )
    )


# --- resolving the recipe ----------------------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    """The expert versions a recipe selects now, and the listed experts it left out (why)."""

    versions: list[ExpertVersion]
    left_out: list[str]

    @property
    def refs(self) -> list[str]:
        return [version.ref for version in self.versions]


def resolve_recipe(session: Session, channel: ReleaseChannel) -> Resolved:
    """The expert versions the channel's recipe selects in the catalog now: each listed
    expert's newest version on the base model that is not yanked (blocked experts left out),
    or, without a list, every admitted expert of the base the filter lets through, at its
    newest such version that ships the vectors the method needs; sorted by name."""
    if channel.experts is not None:
        return _listed(session, channel, channel.experts)
    return _admitted(session, channel)


def _listed(session: Session, channel: ReleaseChannel, names: Sequence[str]) -> Resolved:
    versions, left_out = [], []
    for full_name in names:
        namespace, _, name = full_name.partition("/")
        expert = session.scalar(
            select(Expert).where(Expert.namespace == namespace, Expert.name == name)
        )
        if expert is None:
            left_out.append(f"{full_name}: no such expert")
            continue
        if expert.block is not None:
            left_out.append(f"{full_name}: blocked ({expert.block.reason})")
            continue
        usable = [
            v for v in expert.versions if not v.yanked and v.base_model_id == channel.base_model_id
        ]
        if not usable:
            left_out.append(f"{full_name}: no version on its base model that is not yanked")
            continue
        versions.append(max(usable, key=lambda v: v.number))
    return Resolved(versions, left_out)


def _admitted(session: Session, channel: ReleaseChannel) -> Resolved:
    blocks = session.execute(select(Block.namespace, Block.name)).all()
    blocked_namespaces = {namespace for namespace, name in blocks if not name}
    blocked = {(namespace, name) for namespace, name in blocks}
    needs = METHOD_SPECS[channel.method].needs  # type: ignore[index]  # a RoutingMethod
    query = (
        select(ExpertVersion)
        .join(ExpertVersion.expert)
        .where(
            ExpertVersion.base_model_id == channel.base_model_id,
            ExpertVersion.yanked_at.is_(None),
        )
    )
    if channel.namespaces is not None:
        query = query.where(Expert.namespace.in_(channel.namespaces))
    newest: dict[int, ExpertVersion] = {}
    for version in session.scalars(
        query.order_by(Expert.namespace, Expert.name, ExpertVersion.number)
    ):
        expert = version.expert
        if expert.namespace in blocked_namespaces or (expert.namespace, expert.name) in blocked:
            continue
        if channel.name_glob is not None and not fnmatchcase(expert.full_name, channel.name_glob):
            continue
        if all(vector.shipped_in(version.manifest) for vector in needs):
            newest[expert.id] = version  # ascending numbers: the newest wins
    return Resolved(list(newest.values()), [])


# --- advancing ---------------------------------------------------------------------------


def follows(channel: ReleaseChannel) -> bool:
    """Whether the channel advances on its own now."""
    return channel.follow and not channel.paused and channel.pinned_release_id is None


def state(channel: ReleaseChannel) -> str:
    """How the channel stands, in words: `follows`, `pinned to #n`, `paused`, `manual`."""
    if channel.pinned_release is not None:
        return f"pinned to #{channel.pinned_release.number}"
    if channel.paused:
        return "paused"
    return "follows" if channel.follow else "manual"


def effective_top_k(channel: ReleaseChannel, experts: int) -> int | None:
    """The k of the channel's next release: its own, capped at the experts there are."""
    if not METHOD_SPECS[channel.method].takes_top_k:  # type: ignore[index]
        return None
    return min(channel.top_k or releases.DEFAULT_TOP_K, experts)


@dataclass(frozen=True)
class AdvancePlan:
    """What the channel's next release would be, planned at history entry `sequence`."""

    channel_id: int
    channel: str
    sequence: int
    request: ReleaseCreate
    reason: str

    @property
    def actor(self) -> str:
        return f"channel:{self.channel}"


def plan_advance(session: Session, channel: ReleaseChannel) -> AdvancePlan | None:
    """The next release of a following channel, or None when its current release already
    is what the recipe selects. `ChannelRejected` when the recipe selects no expert."""
    resolved = resolve_recipe(session, channel)
    current = channel.release
    before = releases.release_versions(session, current) if current is not None else []
    top_k = effective_top_k(channel, len(resolved.versions))
    recipe_changes = [] if current is None else _recipe_changes(current, channel, len(before))
    if current is not None and not recipe_changes and set(resolved.refs) == {v.ref for v in before}:
        if current.withdrawn_at is not None:
            # Building the same release again would hand readers what was withdrawn.
            raise ChannelRejected(
                f"release {current.number} of channel {channel.full_name} is withdrawn "
                f"({current.withdrawn_reason}) and the catalog still selects its experts: pin "
                "another release or roll back, or yank or block the expert at fault",
                check="withdrawn",
            )
        return None
    if not resolved.versions:
        why = "; ".join(resolved.left_out) or "no admitted expert matches its filter"
        raise ChannelRejected(
            f"the recipe of channel {channel.full_name} selects no expert ({why})",
            check="experts",
        )
    reason = describe_change(before, resolved.versions, recipe_changes)
    if resolved.left_out:
        reason += f"; left out: {', '.join(resolved.left_out)}"
    request = ReleaseCreate(
        method=channel.method,
        experts=resolved.refs,
        top_k=top_k,
        params=channel.method_params,
        base_model=channel.base_model.name,
        notes=f"channel {channel.full_name}: {reason}"[:_MAX_NOTES],
    )
    return AdvancePlan(channel.id, channel.full_name, channel.sequence, request, reason)


def _recipe_changes(release: Release, channel: ReleaseChannel, experts: int) -> list[str]:
    """How the channel's recipe differs from the one `release` (of `experts` experts) was
    built with; a k that only follows the number of experts is no change of recipe."""
    changes = []
    top_k = effective_top_k(channel, experts)
    if release.method != channel.method:
        changes.append(f"method {release.method} -> {channel.method}")
    if release.top_k != top_k:
        changes.append(f"k {release.top_k} -> {top_k}")
    if release.method == channel.method and (release.method_params or {}) != channel.method_params:
        changes.append(f"params {release.method_params} -> {channel.method_params}")
    if release.base_model_id != channel.base_model_id:
        changes.append(f"base model -> {channel.base_model.name}")
    return changes


def describe_change(
    before: Sequence[ExpertVersion],
    after: Sequence[ExpertVersion],
    recipe_changes: Sequence[str] = (),
) -> str:
    """Why the channel moves: `expert admitted bob/b@1`, `new version alice/a@2 (was @1)`,
    `yanked alice/a@2`, `blocked bob/b`, ... or `first release: N expert(s)`."""
    if not before and not recipe_changes:
        return f"first release: {len(after)} expert(s)"
    old = {v.expert.full_name: v for v in before}
    new = {v.expert.full_name: v for v in after}
    parts = [f"recipe changed: {', '.join(recipe_changes)}"] if recipe_changes else []
    for name in sorted(old.keys() | new.keys()):
        was, now = old.get(name), new.get(name)
        if was is not None and now is not None and was.id == now.id:
            continue
        if was is None and now is not None:
            parts.append(f"expert admitted {now.ref}")
        elif was is not None and now is not None and now.number > was.number:
            parts.append(f"new version {now.ref} (was @{was.number})")
        elif was is not None and now is not None:
            why = "yanked" if was.yanked else "left out"
            parts.append(f"{why} {was.ref}: back to @{now.number}")
        elif was is not None:
            if was.yanked:
                parts.append(f"yanked {was.ref}")
            elif was.expert.block is not None:
                parts.append(f"blocked {name}")
            else:
                parts.append(f"removed {was.ref}")
    return "; ".join(parts) or "the same experts"


def apply_advance(session: Session, blobs: BlobStore, plan: AdvancePlan) -> ChannelEntry | None:
    """Build the planned release and move the channel to it, in one transaction with its
    history entry and its evaluation on the channel's spec; None (nothing written) when the
    channel moved since the plan was made (`ChannelMoved`)."""
    made: list[ChannelEntry] = []

    def record(session: Session, release: Release) -> None:
        channel = _locked_row(session, plan.channel_id)
        if channel is None or channel.sequence != plan.sequence or not follows(channel):
            raise ChannelMoved(f"channel {plan.channel} moved since entry {plan.sequence}")
        entry = ChannelEntry(
            channel_id=channel.id,
            sequence=plan.sequence + 1,
            release_id=release.id,
            action=ChannelAction.ADVANCE.value,
            reason=plan.reason,
            created_by=channel.actor,
        )
        if channel.spec is not None:
            request = EvaluationCreate.model_validate({**channel.spec, "release": release.number})
            job = evaluations.new_job(session, release, request, by=channel.actor)
            session.add(job)
            session.flush()
            entry.job_id = job.id
        session.add(entry)
        channel.release = release
        channel.sequence = entry.sequence
        channel.advance_error = None
        # A second writer of this entry fails here (PostgreSQL) or at the commit.
        session.flush()
        made.append(entry)

    try:
        releases.create_release(session, blobs, plan.request, by=plan.actor, then=record)
    except ChannelMoved as moved:
        log.info("%s: nothing built", moved)
        return None
    return made[-1]


def advance_channel(
    session: Session, blobs: BlobStore, settings: Settings, channel: ReleaseChannel
) -> AdvancedChannel | None:
    """One following channel advanced if its catalog changed: what was built, or None.
    A recipe that cannot become a release (`CoordinatorError`) is recorded on the channel
    (`advance_error`) and raised."""
    try:
        plan = plan_advance(session, channel)
        session.commit()  # end the read transaction of the plan
        entry = None if plan is None else apply_advance(session, blobs, plan)
    except CoordinatorError as error:
        session.rollback()
        _record_error(session, channel, error.message)
        raise
    if plan is None:
        _record_error(session, channel, None)
        return None
    if entry is None:
        return None
    release = session.get(Release, entry.release_id)
    assert release is not None  # a foreign key
    credit_jobs: list[int] = []
    if entry.job_id is not None:
        job = evaluations.get_job(session, entry.job_id)
        evaluations.log_queued(job, release)
        credit_jobs = credit.auto_credit(
            session, job, max_experts=settings.auto_credit_max_experts, by=plan.actor
        )
    log.info(
        "channel %s advanced to release %d (entry %d): %s",
        plan.channel,
        release.number,
        entry.sequence,
        entry.reason,
    )
    return AdvancedChannel(
        channel=plan.channel,
        sequence=entry.sequence,
        release=release.number,
        reason=entry.reason,
        job_id=entry.job_id,
        credit_jobs=credit_jobs,
    )


def _record_error(session: Session, channel: ReleaseChannel, message: str | None) -> None:
    """Keep why the channel could not advance (None: clear it); written only on a change."""
    if channel.advance_error == message:
        return
    locked = _lock(session, channel)
    locked.advance_error = message
    session.commit()
    if message is not None:
        log.warning("channel %s cannot advance: %s", channel.full_name, message)


def advance_channels(session: Session, blobs: BlobStore, settings: Settings) -> AdvanceReport:
    """Advance every channel that follows the catalog (`advance_channel`); safe to run from
    any number of workers at once. What each channel did, in one report."""
    channels = list(
        session.scalars(
            select(ReleaseChannel).order_by(ReleaseChannel.namespace, ReleaseChannel.name)
        )
    )
    session.commit()
    report = AdvanceReport(advanced=[], unchanged=[], held=[], errors={})
    for channel in channels:
        if not follows(channel):
            report.held.append(channel.full_name)
            continue
        try:
            advanced = advance_channel(session, blobs, settings, channel)
        except CoordinatorError as error:
            report.errors[channel.full_name] = error.message
            continue
        if advanced is None:
            report.unchanged.append(channel.full_name)
        else:
            report.advanced.append(advanced)
    return report


# --- maintainers' actions ----------------------------------------------------------------


def _locked_row(session: Session, channel_id: int) -> ReleaseChannel | None:
    """The channel's row, read again under its row lock (in the write transaction)."""
    session.execute(
        select(ReleaseChannel.id).where(ReleaseChannel.id == channel_id).with_for_update()
    )
    return session.get(ReleaseChannel, channel_id, populate_existing=True)


def _lock(session: Session, channel: ReleaseChannel) -> ReleaseChannel:
    """Begin a write transaction holding the channel's row; the row as it is now."""
    begin_write(session)
    locked = _locked_row(session, channel.id)
    if locked is None:
        session.rollback()
        raise NotFound(f"no release channel named {channel.full_name}")
    return locked


def _move(
    session: Session,
    channel: ReleaseChannel,
    release: Release,
    *,
    action: ChannelAction,
    reason: str,
    by: str,
) -> ChannelEntry:
    """The channel (locked by the caller) points at `release` from a new history entry on."""
    entry = ChannelEntry(
        channel_id=channel.id,
        sequence=channel.sequence + 1,
        release_id=release.id,
        action=action.value,
        reason=reason,
        created_by=by,
    )
    session.add(entry)
    channel.release = release
    channel.sequence = entry.sequence
    channel.updated_at = utcnow()
    try:
        session.commit()
    except IntegrityError:  # the row lock makes this unreachable; a clear answer if not
        session.rollback()
        raise Conflict(f"channel {channel.full_name} moved concurrently; try again") from None
    log.info(
        "channel %s: %s to release %d by %s (%s)",
        channel.full_name,
        action.value,
        release.number,
        by,
        reason,
    )
    return entry


def pin(
    session: Session, channel: ReleaseChannel, number: int, *, by: str, reason: str = ""
) -> ChannelEntry:
    """Point the channel at release `number` and hold it there (it does not advance until
    unpinned). Any release of the channel's base model that is not withdrawn."""
    release = releases.get_release(session, number)
    if release.base_model_id != channel.base_model_id:
        raise ChannelRejected(
            f"release {number} is not on the channel's base model {channel.base_model.name}",
            check="base_model",
            expected=f"a release on {channel.base_model.name}",
        )
    if release.withdrawn_at is not None:
        raise Conflict(
            f"release {number} is withdrawn ({release.withdrawn_reason}); a channel does not "
            "point at a withdrawn release",
            check="withdrawn",
        )
    locked = _lock(session, channel)
    locked.pinned_release = release
    return _move(
        session,
        locked,
        release,
        action=ChannelAction.PIN,
        reason=reason or f"pinned to release {number}",
        by=by,
    )


def unpin(session: Session, channel: ReleaseChannel, *, by: str) -> ChannelEntry:
    """Lift the pin: the channel stays at its release until the next advance moves it."""
    locked = _lock(session, channel)
    current = None if locked.release_id is None else session.get(Release, locked.release_id)
    if locked.pinned_release_id is None or current is None:
        session.rollback()
        raise Conflict(f"channel {channel.full_name} is not pinned", check="pin")
    locked.pinned_release = None
    return _move(session, locked, current, action=ChannelAction.UNPIN, reason="unpinned", by=by)


def rollback_target(entries: Sequence[ChannelEntry], withdrawn: Collection[int] = ()) -> int | None:
    """The release id a rollback goes to: the release the channel pointed at before the
    current one, with earlier rollbacks undone (entries are a stack: a move to another
    release pushes it, a rollback pops one), passing over the `withdrawn` release ids. None
    when there is no such earlier release."""
    stack: list[int] = []
    for entry in entries:
        if entry.action == ChannelAction.ROLLBACK:
            if stack:
                stack.pop()
            if not stack or stack[-1] != entry.release_id:  # a history from elsewhere
                stack.append(entry.release_id)
        elif not stack or stack[-1] != entry.release_id:
            stack.append(entry.release_id)
    return next((release for release in reversed(stack[:-1]) if release not in withdrawn), None)


def rollback(
    session: Session, channel: ReleaseChannel, *, by: str, reason: str = ""
) -> ChannelEntry:
    """Point the channel back at the release before its current one (`rollback_target`)
    and pin it there: without the pin the next pass would advance it straight back to what
    the catalog selects. `unpin` lets it follow again."""
    locked = _lock(session, channel)
    entries = channel_entries(session, locked.id)
    withdrawn = set(
        session.scalars(
            select(Release.id).where(
                Release.id.in_({entry.release_id for entry in entries}),
                Release.withdrawn_at.is_not(None),
            )
        )
    )
    target = rollback_target(entries, withdrawn)
    if target is None:
        session.rollback()
        raise Conflict(
            f"channel {channel.full_name} has no earlier release to roll back to that is not "
            "withdrawn",
            check="rollback",
            expected="a channel that has pointed at two releases or more",
        )
    release = session.get(Release, target)
    assert release is not None  # a foreign key
    current = session.get(Release, locked.release_id) if locked.release_id else None
    locked.pinned_release = release
    return _move(
        session,
        locked,
        release,
        action=ChannelAction.ROLLBACK,
        reason=reason or f"rolled back from release {current.number if current else None}",
        by=by,
    )


def pause(
    session: Session, channel: ReleaseChannel, *, by: str, reason: str = ""
) -> ReleaseChannel:
    """Hold the channel where it is (it does not advance) until resumed."""
    locked = _lock(session, channel)
    if locked.paused:
        session.rollback()
        raise Conflict(
            f"channel {channel.full_name} is already paused ({locked.paused_reason})",
            check="paused",
        )
    locked.paused = True
    locked.paused_reason = reason or f"paused by {by}"
    locked.updated_at = utcnow()
    session.commit()
    log.info("channel %s paused by %s: %s", locked.full_name, by, locked.paused_reason)
    return locked


def resume(session: Session, channel: ReleaseChannel, *, by: str) -> ReleaseChannel:
    locked = _lock(session, channel)
    if not locked.paused:
        session.rollback()
        raise Conflict(f"channel {channel.full_name} is not paused", check="paused")
    locked.paused = False
    locked.paused_reason = None
    locked.updated_at = utcnow()
    session.commit()
    log.info("channel %s resumed by %s", locked.full_name, by)
    return locked

"""What a release channel's releases did: a release against the previous release of its
channel (`release_channel_diff`, the release page and `GET /releases/{n}/channel-diff`) and
the held-in and held-out means of a channel's releases (`channel_means`, its chart).

The previous release is the one the channel pointed at just before the move that first
brought it to this release (whatever that move was: an advance, a pin, a rollback). The
accuracy differences are the leaderboard's paired comparison of the two releases
(`leaderboard.comparisons.compare`, a = this release, b = the previous one: the newest
finished evaluations of the two on a shared spec); routing is read from the routing
statistics the worker stored with those two evaluations (each expert's `overall` share,
`credit.service.routing_shares`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.channels.models import ChannelEntry, ReleaseChannel
from coordinator.channels.schemas import (
    ChannelDiff,
    ExpertChange,
    RoutingShift,
    TaskRoutingShift,
)
from coordinator.channels.service import channel_entries
from coordinator.credit import service as credit
from coordinator.evaluations.models import EvaluationJob, EvaluationResult
from coordinator.leaderboard import comparisons
from coordinator.leaderboard import service as leaderboard
from coordinator.leaderboard.comparisons import ALL_TASKS, SpecKey
from coordinator.releases.models import Release

# --- a release against the previous one of its channel -----------------------------------


@dataclass(frozen=True)
class ReleaseInChannel:
    """Where a release sits in a channel: the entry that first brought the channel to it,
    and the release the channel pointed at just before (None: it was the first)."""

    channel: ReleaseChannel
    entry: ChannelEntry
    previous: Release | None


def release_channel(session: Session, release: Release) -> ReleaseInChannel | None:
    """The channel of `release`: the one that built it, else the first to point at it."""
    rows = session.execute(
        select(ChannelEntry, ReleaseChannel)
        .join(ReleaseChannel, ReleaseChannel.id == ChannelEntry.channel_id)
        .where(ChannelEntry.release_id == release.id)
        .order_by(ChannelEntry.created_at, ChannelEntry.channel_id, ChannelEntry.sequence)
    ).all()
    if not rows:
        return None
    channel = next((c for _, c in rows if c.actor == release.created_by), rows[0][1])
    first = min((e for e, c in rows if c.id == channel.id), key=lambda e: e.sequence)
    previous_id = session.scalar(
        select(ChannelEntry.release_id).where(
            ChannelEntry.channel_id == channel.id, ChannelEntry.sequence == first.sequence - 1
        )
    )
    previous = None if previous_id is None else session.get(Release, previous_id)
    return ReleaseInChannel(channel, first, previous)


def _names(release: Release) -> dict[str, str]:
    """namespace/name -> ref of the release's experts (as its manifest names them)."""
    return {
        f"{entry['namespace']}/{entry['name']}": str(entry["ref"])
        for entry in release.manifest.get("experts") or []
    }


def expert_changes(release: Release, previous: Release | None) -> list[ExpertChange]:
    """The experts added, removed or at another version, by name."""
    now, before = _names(release), _names(previous) if previous is not None else {}
    return [
        ExpertChange(name=name, before=before.get(name), after=now.get(name))
        for name in sorted(now.keys() | before.keys())
        if before.get(name) != now.get(name)
    ]


def _routing(session: Session, job_id: int | None) -> dict[str, dict[str, Any] | None]:
    if job_id is None:
        return {}
    rows = session.execute(
        select(EvaluationResult.task, EvaluationResult.routing_stats).where(
            EvaluationResult.job_id == job_id
        )
    )
    return {task: stats for task, stats in rows}


def total_variation(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Half the L1 distance between two distributions over expert names."""
    return 0.5 * sum(abs(a.get(name, 0.0) - b.get(name, 0.0)) for name in a.keys() | b.keys())


def release_channel_diff(
    session: Session, release: Release, *, groups: Mapping[str, str] | None = None
) -> ChannelDiff | None:
    """`release` against the previous release of its channel: the experts added and
    removed, the per-task and mean accuracy differences with paired intervals (the
    leaderboard's comparison, a = this release, b = the previous one) and how routing
    shifted between the two compared evaluations. None when no channel holds it."""
    found = release_channel(session, release)
    if found is None:
        return None
    previous = found.previous
    comparison = None
    routing: list[RoutingShift] = []
    task_routing: list[TaskRoutingShift] = []
    if previous is not None:
        comparison = comparisons.compare(
            session,
            release.number,
            previous.number,
            groups=leaderboard.task_groups(session) if groups is None else groups,
        )
        after = _routing(session, comparison.a.job_id)
        before = _routing(session, comparison.b.job_id)
        shares_after = credit.routing_shares(after.values())
        shares_before = credit.routing_shares(before.values())
        routing = [
            RoutingShift(expert=name, before=shares_before.get(name), after=shares_after.get(name))
            for name in sorted(shares_after.keys() | shares_before.keys())
        ]
        for task in sorted(after.keys() & before.keys()):
            one_after = credit.routing_shares([after[task]])
            one_before = credit.routing_shares([before[task]])
            if one_after and one_before:
                task_routing.append(
                    TaskRoutingShift(
                        task=task, total_variation=total_variation(one_after, one_before)
                    )
                )
    return ChannelDiff(
        channel=found.channel.full_name,
        sequence=found.entry.sequence,
        reason=found.entry.reason,
        release=release.number,
        previous=None if previous is None else previous.number,
        experts=expert_changes(release, previous),
        comparison=comparison,
        routing=routing,
        task_routing=task_routing,
    )


# --- the chart of a channel --------------------------------------------------------------


@dataclass(frozen=True)
class ChannelPoint:
    """A release of the channel and its means: over every task (`all`), held-in, held-out,
    each with its standard error; from its evaluation on the channel's spec (else its
    newest)."""

    release: int
    sequence: int  # the entry that first brought the channel to it
    job_id: int | None
    means: dict[str, float]
    stderrs: dict[str, float]


def channel_releases(session: Session, channel: ReleaseChannel) -> list[tuple[Release, int]]:
    """The channel's releases in the order it first pointed at each, with that entry."""
    seen: dict[int, int] = {}
    for entry in channel_entries(session, channel.id):
        seen.setdefault(entry.release_id, entry.sequence)
    found = {r.id: r for r in session.scalars(select(Release).where(Release.id.in_(list(seen))))}
    return [(found[release_id], sequence) for release_id, sequence in seen.items()]


def channel_means(
    session: Session, channel: ReleaseChannel, *, groups: Mapping[str, str]
) -> list[ChannelPoint]:
    """Per release of the channel (`channel_releases`), the means of its finished
    evaluation on the channel's spec (else of its newest finished one)."""
    ordered = channel_releases(session, channel)
    key = SpecKey.of(channel.spec)
    jobs = comparisons.finished_jobs(session, [release.id for release, _ in ordered])
    chosen: dict[int, EvaluationJob] = {}
    for release, _ in ordered:
        candidates = jobs.get(release.id, [])
        job = next((j for j in candidates if key is None or SpecKey.of(j.spec) == key), None)
        if job is not None:
            chosen[release.id] = job
    results = _job_results(session, [job.id for job in chosen.values()])
    points = []
    for release, sequence in ordered:
        job = chosen.get(release.id)
        scored = results.get(job.id, []) if job is not None else []
        means, stderrs = _means(scored, groups)
        points.append(
            ChannelPoint(release.number, sequence, None if job is None else job.id, means, stderrs)
        )
    return points


def _job_results(session: Session, job_ids: Iterable[int]) -> dict[int, list[EvaluationResult]]:
    found: dict[int, list[EvaluationResult]] = {}
    ids = sorted(set(job_ids))
    if ids:
        for result in session.scalars(
            select(EvaluationResult).where(EvaluationResult.job_id.in_(ids))
        ):
            found.setdefault(result.job_id, []).append(result)
    return found


def _means(
    results: Sequence[EvaluationResult], groups: Mapping[str, str]
) -> tuple[dict[str, float], dict[str, float]]:
    by_group: dict[str, list[EvaluationResult]] = {ALL_TASKS: list(results)}
    for result in results:
        if result.task in groups:
            by_group.setdefault(groups[result.task], []).append(result)
    means, stderrs = {}, {}
    for group, scored in by_group.items():
        mean = leaderboard.mean_accuracy([r.accuracy for r in scored])
        stderr = leaderboard.stderr_of_mean([r.stderr for r in scored])
        if mean is not None and stderr is not None and math.isfinite(mean):
            means[group], stderrs[group] = mean, stderr
    return means, stderrs

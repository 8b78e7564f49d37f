"""Releases x tasks: the newest finished score of every release on every task.

`leaderboard(session, base_model=..., method=...)` is the one source of the JSON API and of
the web pages. A release's mean is the unweighted mean over the tasks it was scored on;
`group_means` averages the tasks an evaluation spec tagged `held_in` / `held_out`.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from coordinator.evaluations import service as evaluations
from coordinator.leaderboard.schemas import Leaderboard, LeaderboardCell, LeaderboardRow
from coordinator.releases import service as releases


def leaderboard(
    session: Session, *, base_model: str | None = None, method: str | None = None
) -> Leaderboard:
    found = releases.list_releases(session, base_model=base_model, method=method)
    scores = evaluations.latest_scores(session, [r.id for r in found])
    rows = []
    task_groups: dict[str, str] = {}
    for release in found:
        by_task = scores.get(release.id, {})
        for task, score in by_task.items():
            if score.group is not None:
                task_groups.setdefault(task, score.group)
        rows.append(
            LeaderboardRow(
                release=release.number,
                method=release.method,
                top_k=release.top_k,
                expert=release.manifest.get("expert"),
                base_model=release.manifest["base_model"]["name"],
                experts=[e["ref"] for e in release.manifest["experts"]],
                notes=release.notes,
                created_at=release.created_at,
                scores={
                    task: LeaderboardCell(
                        accuracy=s.result.accuracy,
                        stderr=s.result.stderr,
                        n=s.result.n,
                        evaluator_version=s.result.evaluator_version,
                        job_id=s.result.job_id,
                    )
                    for task, s in sorted(by_task.items())
                },
                mean_accuracy=evaluations.mean([s.result.accuracy for s in by_task.values()]),
                group_means=evaluations.group_means(by_task),
            )
        )
    tasks = sorted({task for row in rows for task in row.scores})
    return Leaderboard(
        tasks=tasks,
        task_groups={t: task_groups[t] for t in tasks if t in task_groups},
        releases=rows,
        filters={"base_model": base_model, "method": method},
    )

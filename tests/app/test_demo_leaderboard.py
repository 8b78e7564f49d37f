"""The demo's printed leaderboard: accuracies, group means, and each release's paired
difference against the base (the leaderboard's `vs_base`), marked only where its interval
excludes 0; and the evaluations it queues so that every release can be compared."""

from datetime import UTC, datetime

import pytest

from app.demo import (
    DemoPlan,
    demo_maintainer,
    leaderboard_grid,
    paired_cell,
    queue_evaluations,
    versus_base_notes,
)
from coordinator.base_models.service import register_base_model
from coordinator.core.app import open_database
from coordinator.core.config import Settings
from coordinator.evaluations import service as evaluations
from coordinator.evaluations.outcomes import ExampleOutcomes
from coordinator.evaluations.schemas import EvaluationCreate, TaskGroups
from coordinator.leaderboard.schemas import (
    Leaderboard,
    LeaderboardCell,
    LeaderboardRow,
    MeanDelta,
    PairedDelta,
    VersusBase,
)
from coordinator.releases import service as releases
from coordinator.releases.schemas import ReleaseCreate
from coordinator.storage import LocalBlobStore
from phatgoose.models import base_model_spec
from phatgoose.paired import paired_mean_difference
from tests.tiny import tiny_llama

PLAN = DemoPlan(held_in=("alpha", "beta"), later=(), held_out=("gamma",), n_eval=4)
BASE = {
    "alpha": [False] * 4,
    "beta": [True, False, False, False],
    "gamma": [True, True, False, False],
}
PHATGOOSE = {"alpha": [True] * 4, "beta": [True] * 4, "gamma": [True, False, True, False]}


def mean_delta(tasks, mine, base=BASE):
    difference = paired_mean_difference({t: (mine[t], base[t]) for t in tasks})
    return MeanDelta(
        tasks=list(tasks),
        a=sum(sum(mine[t]) / 4 for t in tasks) / len(tasks),
        b=sum(sum(base[t]) / 4 for t in tasks) / len(tasks),
        difference=PairedDelta.of(difference),
    )


def row(number, method, outcomes, vs_base):
    return LeaderboardRow(
        release=number,
        method=method,
        top_k=None,
        expert=None,
        base_model="tiny",
        experts=[],
        notes="",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        scores={
            t: LeaderboardCell(
                accuracy=sum(c) / 4, stderr=0.1, n=4, evaluator_version="v", job_id=number
            )
            for t, c in outcomes.items()
        },
        mean_accuracy=None,
        group_means={
            "held_in": (sum(outcomes["alpha"]) + sum(outcomes["beta"])) / 8,
            "held_out": sum(outcomes["gamma"]) / 4,
        },
        vs_base=vs_base,
    )


def board(*rows):
    return Leaderboard(
        tasks=["alpha", "beta", "gamma"],
        task_groups={"alpha": "held_in", "beta": "held_in", "gamma": "held_out"},
        releases=list(rows),
        filters={},
    )


def versus_base(group_means, reason=None):
    return VersusBase(
        base_release=3, job_id=1, base_job_id=3, group_means=group_means, reason=reason
    )


PHATGOOSE_ROW = row(
    1,
    "phatgoose",
    PHATGOOSE,
    versus_base(
        {
            "held_in": mean_delta(["alpha", "beta"], PHATGOOSE),
            "held_out": mean_delta(["gamma"], PHATGOOSE),
        }
    ),
)
BASE_ROW = row(
    3,
    "base",
    BASE,
    VersusBase(
        base_release=3,
        job_id=3,
        base_job_id=3,
        reason="this is the base's evaluation: the reference of the comparison",
    ),
)


def test_each_release_shows_its_paired_difference_of_the_group_means_against_the_base():
    grid = leaderboard_grid(board(PHATGOOSE_ROW, BASE_ROW), {"phatgoose": 1, "base": 3}, PLAN)

    assert grid.columns == ("task", "#1 phatgoose", "#3 base")
    by_label = {line[0]: line[1:] for line in grid.rows}
    assert by_label["held-in mean"] == ("1.000", "0.125")
    held_in = paired_mean_difference({t: (PHATGOOSE[t], BASE[t]) for t in ("alpha", "beta")})
    # 7 of 8 examples right only for phatgoose: a difference whose interval excludes 0
    assert held_in.significant
    assert by_label["held-in Δ vs base"] == (
        f"+0.875 [{held_in.low:+.3f}, {held_in.high:+.3f}] ▲",
        "reference",
    )
    # gamma: one example right only for each, of 4: 0, its interval wide, and not marked
    assert by_label["held-out Δ vs base"] == ("+0.000 [-0.750, +0.750]", "reference")
    # the means and their differences stand out
    assert grid.strong == frozenset(range(len(grid.rows) - 4, len(grid.rows)))


def test_a_paired_cell_is_marked_only_where_the_interval_excludes_zero():
    def delta(value, low, high):
        return PairedDelta(
            delta=value, low=low, high=high, p_value=0.5, n=40, a_only=0, b_only=0,
            significant=low > 0 or high < 0,
        )  # fmt: skip

    assert paired_cell(delta(0.1, 0.02, 0.18)) == "+0.100 [+0.020, +0.180] ▲"
    assert paired_cell(delta(-0.1, -0.18, -0.02)) == "-0.100 [-0.180, -0.020] ▼"
    assert paired_cell(delta(0.1, -0.02, 0.22)) == "+0.100 [-0.020, +0.220]"
    assert paired_cell(delta(0.1, 0.0, 0.2)) == "+0.100 [+0.000, +0.200]"  # 0 is inside


def test_a_release_without_a_difference_says_why_and_the_notes_say_what_the_size_allows():
    no_outcomes = "1 of its 2 task(s) do not compare (alpha; alpha: no per-example outcomes)"
    merged = row(
        2,
        "merged",
        BASE,
        versus_base(
            {
                "held_in": MeanDelta(
                    tasks=["alpha", "beta"], a=0.1, b=0.1, difference=None, reason=no_outcomes
                ),
                "held_out": mean_delta(["gamma"], BASE),
            }
        ),
    )
    unpaired = row(4, "phatgoose", PHATGOOSE, versus_base({}, reason="not evaluated yet"))
    numbers = {"phatgoose": 1, "merged": 2, "base": 3, "other": 4}
    leaderboard = board(PHATGOOSE_ROW, merged, BASE_ROW, unpaired)

    grid = leaderboard_grid(leaderboard, numbers, PLAN)
    notes = versus_base_notes(leaderboard, numbers, PLAN)

    by_label = {line[0]: line[1:] for line in grid.rows}
    assert by_label["held-in Δ vs base"][1:] == ("n/a", "reference", "n/a")
    assert notes[0].startswith("Δ vs base: a release's mean minus the base model's on the same 4")
    assert "docs/benchmarks.md" in notes[0]
    assert notes[1:] == [
        f"#2 merged, held-in: no Δ vs base ({no_outcomes})",
        "#4 phatgoose: no Δ vs base (not evaluated yet)",
    ]


# ----------------------------------------------------------- queueing the evaluations
@pytest.fixture
def settings(tmp_path):
    return Settings(data_dir=tmp_path / "coordinator")


@pytest.fixture
def sessions(settings):
    engine, sessions = open_database(settings)
    with sessions() as session:
        register_base_model(session, base_model_spec(tiny_llama(), "tiny"))
    yield sessions
    engine.dispose()


@pytest.fixture
def import_base_evaluation(sessions, settings):
    def imported(*, with_outcomes: bool) -> int:
        return _import_base_evaluation(
            sessions, LocalBlobStore(settings.blob_dir), with_outcomes=with_outcomes
        )

    return imported


def _import_base_evaluation(sessions, blobs, *, with_outcomes: bool) -> int:
    """A base release with a finished evaluation of the plan's tasks; its number."""
    maintainer = demo_maintainer(sessions)
    with sessions() as session:
        number = releases.create_release(
            session,
            blobs,
            ReleaseCreate(method="base", experts=[], base_model="tiny"),
            by=maintainer,
        ).number
        request = EvaluationCreate(
            release=number,
            tasks=[*PLAN.held_in, *PLAN.held_out],
            examples_per_task=PLAN.n_eval,
            seed=PLAN.training.seed,
            task_groups=TaskGroups(held_in=list(PLAN.held_in), held_out=list(PLAN.held_out)),
        )
        scores = [
            evaluations.TaskScore(
                task=task,
                accuracy=sum(correct) / 4,
                stderr=0.1,
                n=4,
                evaluator_version="v",
                seconds=1.0,
                routing_stats=None,
                outcomes=ExampleOutcomes(predictions=(0,) * 4, correct=tuple(correct))
                if with_outcomes
                else None,
            )
            for task, correct in BASE.items()
        ]
        evaluations.import_job(session, request, scores, by=maintainer, source={})
    return number


def jobs_of(sessions, number):
    with sessions() as session:
        release = releases.get_release(session, number)
        return [job.state for job in evaluations.list_jobs_of_release(session, release.id)]


def test_a_release_evaluated_with_outcomes_is_not_evaluated_again(sessions, import_base_evaluation):
    number = import_base_evaluation(with_outcomes=True)

    pending = queue_evaluations(sessions, PLAN, {"base": number}, demo_maintainer(sessions))

    assert pending == 0
    assert jobs_of(sessions, number) == ["done"]


def test_a_release_evaluated_before_outcomes_were_kept_is_evaluated_again(
    sessions, import_base_evaluation
):
    number = import_base_evaluation(with_outcomes=False)

    pending = queue_evaluations(sessions, PLAN, {"base": number}, demo_maintainer(sessions))

    assert pending == 1
    assert sorted(jobs_of(sessions, number)) == ["done", "queued"]
    # the queued job counts as pending, and is not queued twice
    assert queue_evaluations(sessions, PLAN, {"base": number}, demo_maintainer(sessions)) == 1
    assert len(jobs_of(sessions, number)) == 2

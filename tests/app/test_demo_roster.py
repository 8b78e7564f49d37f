"""Who trains in each demo run: the held-in contributors until their experts are catalogued,
then one later contributor per run, then no one."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.demo import DemoPlan, roster
from app.federation import Contributor

PLAN = DemoPlan(held_in=("a", "b"), later=("c", "d"), held_out=("z",))
CONTRIBUTORS = [Contributor(name, Path(f"/data/{name}.jsonl")) for name in "abcd"]


def names(contributors) -> list[str]:
    return [c.name for c in contributors]


def test_a_first_run_trains_the_held_in_contributors_and_nobody_joins():
    cast = roster(PLAN, CONTRIBUTORS, set())
    assert names(cast.members) == names(cast.to_train) == ["a", "b"]
    assert cast.joining is None
    assert names(cast.waiting) == ["c", "d"]


def test_a_missing_held_in_expert_is_trained_before_anyone_joins():
    cast = roster(PLAN, CONTRIBUTORS, {"a"})
    assert names(cast.to_train) == ["b"]
    assert cast.joining is None


def test_later_contributors_join_one_per_run_in_the_plans_order():
    second = roster(PLAN, CONTRIBUTORS, {"a", "b"})
    assert second.joining is not None and second.joining.name == "c"
    assert names(second.to_train) == ["c"]
    assert names(second.members) == ["a", "b", "c"]
    assert names(second.waiting) == ["d"]

    third = roster(PLAN, CONTRIBUTORS, {"a", "b", "c"})
    assert names(third.to_train) == ["d"]
    assert names(third.members) == ["a", "b", "c", "d"]
    assert third.waiting == ()


def test_with_every_expert_catalogued_nothing_is_trained():
    cast = roster(PLAN, CONTRIBUTORS, {"a", "b", "c", "d"})
    assert cast.to_train == ()
    assert cast.joining is None
    assert names(cast.members) == ["a", "b", "c", "d"]


def test_retrain_trains_every_member_again_and_lets_no_one_join():
    cast = roster(PLAN, CONTRIBUTORS, {"a", "b", "c"}, retrain=True)
    assert names(cast.to_train) == ["a", "b", "c"]
    assert cast.joining is None
    assert names(cast.waiting) == ["d"]


def test_the_plan_lists_contributors_then_held_out_tasks_for_evaluation():
    assert PLAN.contributor_tasks == ("a", "b", "c", "d")
    assert PLAN.evaluation_tasks == ("a", "b", "c", "d", "z")


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ({"held_in": ("a",), "later": ("a",)}, "'a' is in the plan's held_in and later"),
        ({"held_in": ("a",), "held_out": ("a",), "later": ()}, "held_in and held_out"),
        ({"later": ("x",), "held_out": ("x",)}, "later and held_out"),
    ],
)
def test_a_task_in_two_groups_of_the_plan_is_refused(groups, message):
    with pytest.raises(ValueError, match=message):
        DemoPlan(**groups)


def test_a_plan_needs_at_least_one_expert_per_token():
    with pytest.raises(ValueError, match="top_k must be at least 1, got 0"):
        DemoPlan(top_k=0)

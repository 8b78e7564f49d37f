"""The demo shows the round's progress per contributor: stage, step and loss."""

import io

from rich.console import Console

from app.console import render
from app.demo import NodeStatus, ProgressLines, progress_grid
from app.federation import TrainingProgress

REF = "demo-6618324694786144947/navigate@1"


def lines_printer(every: float = 30.0) -> tuple[ProgressLines, io.StringIO]:
    out = io.StringIO()
    return ProgressLines(Console(file=out, width=200, color_system=None), every=every), out


def test_each_contributor_gets_a_line_with_its_step_and_losses():
    lines, out = lines_printer()

    lines.update(
        [
            NodeStatus("navigate", TrainingProgress("LoRA", 12, 60, 1.23456, 1.1)),
            NodeStatus("hyperbaton"),
        ],
        seconds=45.2,
    )

    assert out.getvalue().splitlines() == [
        "[   45 s] navigate: LoRA step 12/60, loss 1.2346, validation loss 1.1000",
        "[   45 s] hyperbaton: starting (loading the base model and its data)",
    ]


def test_a_training_node_is_reported_again_when_its_step_moved_and_at_each_new_stage():
    lines, out = lines_printer(every=30.0)

    def at(stage: str, step: int, steps: int) -> NodeStatus:
        return NodeStatus("navigate", TrainingProgress(stage, step, steps, 2.0))

    lines.update([at("LoRA", 1, 60)], seconds=10)
    lines.update([at("LoRA", 5, 60)], seconds=25)  # within 30 s of the last line: quiet
    lines.update([at("LoRA", 9, 60)], seconds=41)
    lines.update([at("LoRA", 9, 60)], seconds=75)  # the step has not moved: quiet
    lines.update([at("gates", 1, 12)], seconds=76)
    lines.update([at("gates", 12, 12)], seconds=80)  # done, its reply with the round
    lines.update([at("gates", 12, 12)], seconds=120)
    lines.update([NodeStatus("navigate", catalogued_as=REF)], seconds=130)
    lines.update([NodeStatus("navigate", catalogued_as=REF)], seconds=170)  # no news

    assert out.getvalue().splitlines() == [
        "[   10 s] navigate: LoRA step 1/60, loss 2.0000",
        "[   41 s] navigate: LoRA step 9/60, loss 2.0000",
        "[   76 s] navigate: gates step 1/12, loss 2.0000",
        "[   80 s] navigate: trained (gates step 12/12, loss 2.0000); waiting for the round "
        "to register its expert",
        f"[  130 s] navigate: catalogued as {REF}",
    ]


def test_the_live_table_has_a_row_per_contributor_and_fits_a_narrow_terminal():
    grid = progress_grid(
        "Flower round on 127.0.0.1:53073 (120 s)",
        [
            NodeStatus("sports-understanding", TrainingProgress("LoRA", 7, 60, 0.8123, 0.7)),
            NodeStatus("navigate", TrainingProgress("gates", 3, 12, 0.25), catalogued_as=REF),
            NodeStatus("hyperbaton"),
        ],
    )

    assert grid.rows == (
        ("sports-understanding", "LoRA", "7/60", "0.812", "0.700"),
        ("navigate", "catalogued", "-", "-", "-"),
        ("hyperbaton", "starting", "-", "-", "-"),
    )
    for width in (40, 80):
        out = io.StringIO()
        Console(file=out, width=width, color_system=None).print(render(grid, width))
        assert "…" not in out.getvalue() and "7/60" in out.getvalue()

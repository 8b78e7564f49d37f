"""Demo tables fit any width without cutting a value: a grid when it fits, else blocks."""

import io

import pytest
from rich.console import Console

from app.console import PIPED_WIDTH, Grid, demo_console, natural_width, render

LONG_REF = "demo-16154095640324010502/sports-understanding@1"  # 48 characters
GRID = Grid(
    "leaderboard (accuracy ± standard error)",
    ("task", "#1 phatgoose", "#2 merged", "#3 base"),
    (
        ("sports_understanding", "0.56 ± 0.12", "0.50 ± 0.12", "0.56 ± 0.12"),
        ("code_line_description (held out)", "0.58 ± 0.06", "0.48 ± 0.06", "0.58 ± 0.06"),
        (LONG_REF, "0.613", "0.500", "0.425"),
        ("held-in mean", "0.656", "0.469", "0.425"),
    ),
    strong=frozenset({3}),
)


def printed(grid: Grid, width: int) -> str:
    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None, legacy_windows=False)
    console.print(render(grid, width))
    return out.getvalue()


@pytest.mark.parametrize("width", [40, 60, 200])
def test_no_value_is_cut_at_any_width(width):
    text = printed(GRID, width)

    assert "…" not in text
    assert all(len(line) <= width for line in text.splitlines())
    lines = text.splitlines()
    for row in GRID.rows:
        for value in row:
            if len(value) <= width - 4:  # fits on a line: it is on one line, whole
                assert any(value in line for line in lines), (width, value)
    # The reference wider than 40 columns is folded over lines, every character kept.
    assert LONG_REF in "".join(line.strip() for line in lines)


def test_a_table_that_fits_is_drawn_as_a_grid():
    text = printed(GRID, 200)

    assert "┃ task" in text
    # One line per row: the row's values side by side.
    lines = text.splitlines()
    assert any("sports_understanding" in line and "0.50 ± 0.12" in line for line in lines)


def test_a_table_too_wide_becomes_one_block_per_row():
    text = printed(GRID, 60)
    lines = text.splitlines()

    assert natural_width(render(GRID, 200)) > 60
    start = lines.index("sports_understanding")
    assert lines[start + 1 : start + 4] == [
        "  #1 phatgoose: 0.56 ± 0.12",
        "  #2 merged: 0.50 ± 0.12",
        "  #3 base: 0.56 ± 0.12",
    ]


def test_a_label_and_value_too_wide_for_one_line_go_on_two():
    grid = Grid("t", ("name", "a long column label"), (("x", "0.56 ± 0.12"),))

    lines = printed(grid, 24).splitlines()

    assert lines[-2:] == ["  a long column label:", "    0.56 ± 0.12"]


def test_rows_must_have_a_cell_per_column():
    with pytest.raises(ValueError, match="row 0 of 't' has 1 cells for 2 columns"):
        Grid("t", ("a", "b"), (("only one",),))


def test_piped_output_gets_a_wide_console_unless_columns_says_otherwise(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    assert demo_console().width == PIPED_WIDTH

    monkeypatch.setenv("COLUMNS", "60")
    assert demo_console().width == 60

"""What the demo prints: tables that fit the terminal, or a log file, without cutting a value.

Rich shortens a cell that does not fit to `exa…`; a demo table is only worth printing
whole. A table is drawn as a grid when its natural width fits the line, and otherwise as
one block per row, `column: value` lines under the row's first cell, where a value wider
than the line breaks across lines (folds) but is never cut. Output that is not a terminal
(a pipe, a log file) gets a wide console unless COLUMNS says otherwise.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

from rich.cells import cell_len
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

# Lines of piped output are read in files and pagers, not wrapped by a terminal.
PIPED_WIDTH = 200
INDENT = "  "


def demo_console() -> Console:
    """The demo's console (stderr); wide when stderr is not a terminal and COLUMNS is unset."""
    console = Console(stderr=True)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=True, width=PIPED_WIDTH)
    return console


@dataclass(frozen=True)
class Grid:
    """A table's content: a title, column headers and rows of plain-text cells.

    `strong` holds the indices of rows shown in bold (summaries such as group means).
    """

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    strong: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        for index, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(
                    f"row {index} of {self.title!r} has {len(row)} cells for "
                    f"{len(self.columns)} columns"
                )


def render(grid: Grid, width: int) -> RenderableType:
    """`grid` as a Rich table when it fits in `width` cells, else as blocks of lines."""
    table = _table(grid)
    if natural_width(table) <= width:
        return table
    return _blocks(grid, width)


def natural_width(renderable: RenderableType) -> int:
    """The cells `renderable` takes when nothing constrains it."""
    unconstrained = Console(width=100_000, file=io.StringIO())
    return unconstrained.measure(renderable).maximum


def _table(grid: Grid) -> Table:
    table = Table(title=grid.title)
    for column in grid.columns:
        table.add_column(column, no_wrap=True)
    for index, row in enumerate(grid.rows):
        table.add_row(*row, style="bold" if index in grid.strong else None)
    return table


def _blocks(grid: Grid, width: int) -> Group:
    lines: list[Text] = [_wrapped(grid.title, "bold")]
    for index, row in enumerate(grid.rows):
        style = "bold" if index in grid.strong else ""
        lines.append(_wrapped(row[0], "bold"))
        for column, value in zip(grid.columns[1:], row[1:], strict=True):
            one_line = f"{INDENT}{column}: {value}"
            if cell_len(one_line) <= width:
                lines.append(Text(one_line, style=style))
            else:  # the label on its line, the value whole on the next
                lines.append(_wrapped(f"{INDENT}{column}:", ""))
                lines.append(_wrapped(f"{INDENT * 2}{value}", style))
    return Group(*lines)


def _wrapped(text: str, style: str) -> Text:
    """Wrapped at spaces; a word wider than the line (a long name) is folded, not cut."""
    return Text(text, style=style, overflow="fold")

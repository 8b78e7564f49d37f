"""PNG plots with matplotlib's Agg canvas (no display, no pyplot global state: each plot is
its own `Figure`, so concurrent requests do not share anything)."""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from coordinator.web.analysis import LayerRouting
from coordinator.web.queries import MethodMean

# Beyond this many rows or columns, tick labels are thinned out to stay legible.
_MAX_TICKS = 40
# Up to this many experts and layers, each cell shows its share as a number.
_ANNOTATE_EXPERTS, _ANNOTATE_LAYERS = 12, 32


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def short_layer_label(label: str) -> str:
    """`model.layers.3` -> `3`, `decoder.block.1` -> `decoder 1`."""
    match = re.match(r"^(?:model\.)?(?:(encoder|decoder)\.)?.*?(\d+)$", label)
    if not match:
        return label
    part, number = match.groups()
    return f"{part} {number}" if part else number


def _ticks(count: int) -> list[int]:
    step = max(1, -(-count // _MAX_TICKS))
    return list(range(0, count, step))


def routing_heatmap(routing: LayerRouting, title: str) -> bytes:
    """Experts (rows) x layers (columns): the share of each layer's selections. The colour
    scale runs from 0 to the largest share; small grids print each share in its cell."""
    n_experts, n_layers = len(routing.experts), len(routing.layers)
    width = min(14.0, max(6.5, 3.5 + 0.45 * n_layers))
    height = min(14.0, max(3.0, 1.6 + 0.32 * n_experts))
    matrix = routing.frequencies if n_experts and n_layers else [[0.0]]
    largest = max((max(row) for row in matrix), default=0.0)
    figure = Figure(figsize=(width, height))
    axes = figure.add_subplot()
    image = axes.imshow(
        matrix,
        aspect="auto",
        cmap="viridis",
        vmin=0.0,
        vmax=max(largest, 0.05),
        interpolation="nearest",
    )
    axes.set_xlabel("layer")
    axes.set_ylabel("expert")
    axes.set_title(title, fontsize=10, wrap=True)
    x_ticks, y_ticks = _ticks(n_layers), _ticks(n_experts)
    axes.set_xticks(x_ticks, [short_layer_label(routing.layers[i]) for i in x_ticks], fontsize=8)
    axes.set_yticks(y_ticks, [routing.experts[i] for i in y_ticks], fontsize=8)
    if n_experts <= _ANNOTATE_EXPERTS and n_layers <= _ANNOTATE_LAYERS:
        for e, row in enumerate(routing.frequencies):
            for layer, share in enumerate(row):
                colour = "black" if share > 0.6 * max(largest, 0.05) else "white"
                axes.text(
                    layer, e, f"{share:.2f}", ha="center", va="center", fontsize=7, color=colour
                )
    colorbar = figure.colorbar(image, ax=axes, fraction=0.04, pad=0.02)
    colorbar.set_label("share of the layer's selections", fontsize=8)
    figure.tight_layout()
    return _png(figure)


def method_bars(means: Sequence[MethodMean], title: str) -> bytes:
    """Mean accuracy of each method's best release, with a standard-error bar."""
    figure = Figure(figsize=(7.5, max(2.2, 0.9 + 0.42 * len(means))))
    axes = figure.add_subplot()
    if not means:
        axes.text(0.5, 0.5, "no evaluation results yet", ha="center", va="center")
        axes.set_axis_off()
        return _png(figure)
    ordered = list(reversed(means))  # best at the top
    colours = [
        "#b8860b"
        if m.method == "oracle"
        else "#888888"
        if m.method in ("base", "merged")
        else "#2a6fb0"
        for m in ordered
    ]
    positions = range(len(ordered))
    axes.barh(
        positions,
        [m.mean for m in ordered],
        xerr=[m.stderr for m in ordered],
        color=colours,
        capsize=3,
    )
    axes.set_yticks(list(positions), [f"{m.method}  ({m.label})" for m in ordered], fontsize=8)
    for y, m in zip(positions, ordered, strict=True):
        axes.text(min(m.mean + m.stderr + 0.01, 0.9), y, f"{m.mean:.3f}", va="center", fontsize=8)
    axes.set_xlim(0.0, 1.0)
    axes.set_xlabel("mean accuracy over tasks (± standard error)")
    axes.set_title(title, fontsize=10)
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    return _png(figure)

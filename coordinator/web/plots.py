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
    """Experts (rows) x layers (columns): the share of each layer's selections."""
    n_experts, n_layers = len(routing.experts), len(routing.layers)
    width = min(14.0, max(5.0, 2.8 + 0.32 * n_layers))
    height = min(14.0, max(2.6, 1.4 + 0.28 * n_experts))
    figure = Figure(figsize=(width, height))
    axes = figure.add_subplot()
    image = axes.imshow(
        routing.frequencies if n_experts and n_layers else [[0.0]],
        aspect="auto",
        cmap="viridis",
        vmin=0.0,
        vmax=1.0,
        interpolation="nearest",
    )
    axes.set_xlabel("layer")
    axes.set_ylabel("expert")
    axes.set_title(title, fontsize=10)
    x_ticks, y_ticks = _ticks(n_layers), _ticks(n_experts)
    axes.set_xticks(x_ticks, [short_layer_label(routing.layers[i]) for i in x_ticks], fontsize=8)
    axes.set_yticks(y_ticks, [routing.experts[i] for i in y_ticks], fontsize=8)
    colorbar = figure.colorbar(image, ax=axes, fraction=0.04, pad=0.02)
    colorbar.set_label("share of selections", fontsize=8)
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

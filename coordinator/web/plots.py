"""PNG plots with matplotlib's Agg canvas (no display, no pyplot: each plot is its own
`Figure`), rendered one at a time and cached.

Titles and labels carry user text (task, expert and base model names), so every text
artist is drawn with `parse_math=False`: a `$` never starts mathtext. matplotlib is not
thread-safe beyond that either (its mathtext parser and text layout caches are shared), so
rendering holds one lock; `PNG_CACHE` keeps recent images by a digest of everything they
are drawn from, so a page's images are rendered once, and that digest is their ETag.
"""

from __future__ import annotations

import hashlib
import io
import re
import textwrap
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from coordinator.channels.diff import ChannelPoint
from coordinator.web.analysis import LayerRouting
from coordinator.web.queries import BASELINE_METHODS, MethodMean
from protocol.diff import PackageDiff

# Beyond this many rows or columns, tick labels are thinned out to stay legible.
_MAX_TICKS = 40
# Up to this many experts and layers, each cell shows its share as a number.
_ANNOTATE_EXPERTS, _ANNOTATE_LAYERS = 12, 32


_RENDER_LOCK = threading.RLock()


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


@dataclass(frozen=True)
class CachedPng:
    png: bytes
    etag: str  # a quoted digest of the plot's inputs


def plot_digest(*inputs: object) -> str:
    """A digest of everything a plot is drawn from (its kind, title and data)."""
    return hashlib.sha256(repr(inputs).encode()).hexdigest()[:32]


class PngCache:
    """Least recently used PNGs, bounded in bytes; thread-safe."""

    def __init__(self, max_bytes: int = 32 << 20) -> None:
        self.max_bytes = max_bytes
        self.renders = 0  # images rendered through the cache (tests count them)
        self._images: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, digest: str) -> bytes | None:
        with self._lock:
            png = self._images.get(digest)
            if png is not None:
                self._images.move_to_end(digest)
            return png

    def get_or_render(self, digest: str, render: Callable[[], bytes]) -> CachedPng:
        png = self.get(digest)
        if png is None:
            with _RENDER_LOCK:  # a request that waited here finds the image drawn
                png = self.get(digest)
                if png is None:
                    png = render()
                    self.renders += 1
                    self._put(digest, png)
        return CachedPng(png, f'"{digest}"')

    def _put(self, digest: str, png: bytes) -> None:
        with self._lock:
            if digest in self._images:
                return
            self._images[digest] = png
            self._bytes += len(png)
            while self._bytes > self.max_bytes and len(self._images) > 1:
                _, dropped = self._images.popitem(last=False)
                self._bytes -= len(dropped)

    def clear(self) -> None:
        with self._lock:
            self._images.clear()
            self._bytes = 0


PNG_CACHE = PngCache()


def short_layer_label(label: str) -> str:
    """`model.layers.3` -> `3`, `decoder.block.1` -> `decoder 1`."""
    match = re.match(r"^(?:model\.)?(?:(encoder|decoder)\.)?.*?(\d+)$", label)
    if not match:
        return label
    part, number = match.groups()
    return f"{part} {number}" if part else number


def _wrapped(text: str, columns: int) -> str:
    return "\n".join(
        textwrap.fill(line, columns, break_long_words=True) or line for line in text.split("\n")
    )


def _ticks(count: int) -> list[int]:
    step = max(1, -(-count // _MAX_TICKS))
    return list(range(0, count, step))


def routing_heatmap(routing: LayerRouting, title: str) -> bytes:
    """Experts (rows) x layers (columns): the share of each layer's selections. The colour
    scale runs from 0 to the largest share; small grids print each share in its cell."""
    with _RENDER_LOCK:
        return _routing_heatmap(routing, title)


def _routing_heatmap(routing: LayerRouting, title: str) -> bytes:
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
    # Wrapped here: matplotlib's own wrapping (wrap=True) measures text as mathtext even
    # with parse_math=False.
    axes.set_title(_wrapped(title, int(width * 10)), fontsize=10, parse_math=False)
    x_ticks, y_ticks = _ticks(n_layers), _ticks(n_experts)
    x_labels = [short_layer_label(routing.layers[i]) for i in x_ticks]
    axes.set_xticks(x_ticks, x_labels, fontsize=8, parse_math=False)
    axes.set_yticks(y_ticks, [routing.experts[i] for i in y_ticks], fontsize=8, parse_math=False)
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
    with _RENDER_LOCK:
        return _method_bars(means, title)


def _method_bars(means: Sequence[MethodMean], title: str) -> bytes:
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
        if m.method in BASELINE_METHODS
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
    labels = [f"{m.method}  ({m.label})" for m in ordered]
    axes.set_yticks(list(positions), labels, fontsize=8, parse_math=False)
    for y, m in zip(positions, ordered, strict=True):
        axes.text(min(m.mean + m.stderr + 0.01, 0.9), y, f"{m.mean:.3f}", va="center", fontsize=8)
    axes.set_xlim(0.0, 1.0)
    axes.set_xlabel("mean accuracy over tasks (± standard error)")
    axes.set_title(title, fontsize=10, parse_math=False)
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    return _png(figure)


def diff_by_layer(diff: PackageDiff, title: str) -> bytes:
    """Two panels over the layers of an expert diff: the relative change of each module's
    update (a point per module, the layer's mean as a bar), and the cosine between each
    module's two gates. Modules in only one package have neither and are not drawn."""
    with _RENDER_LOCK:
        return _diff_by_layer(diff, title)


def _diff_by_layer(diff: PackageDiff, title: str) -> bytes:
    layers = [layer.layer for layer in diff.layers]
    position = {label: x for x, label in enumerate(layers)}
    shared = [m for m in diff.modules if m.present == "both"]
    width = min(14.0, max(6.5, 3.5 + 0.35 * len(layers)))
    figure = Figure(figsize=(width, 5.6))
    change_axes, gate_axes = figure.subplots(2, 1, sharex=True)
    change_axes.set_title(_wrapped(title, int(width * 10)), fontsize=10, parse_math=False)
    if not shared:
        change_axes.text(0.5, 0.5, "no module is in both packages", ha="center", va="center")
    changes = [
        (position[m.layer], m.relative_change) for m in shared if m.relative_change is not None
    ]
    if changes:
        change_axes.scatter(*zip(*changes, strict=True), s=14, alpha=0.7, color="#2a6fb0")
    means = [(position[x.layer], x.mean_relative_change) for x in diff.layers]
    drawn = [(x, y) for x, y in means if y is not None]
    if drawn:
        change_axes.scatter(
            *zip(*drawn, strict=True), marker="_", s=260, color="#b3261e", label="layer mean"
        )
        change_axes.legend(fontsize=8, loc="upper right")
    change_axes.set_ylabel("relative change\n‖ΔW_b − ΔW_a‖ / ‖ΔW_a‖", fontsize=8)
    change_axes.set_ylim(bottom=0.0)
    change_axes.grid(axis="y", alpha=0.3)
    cosines = [(position[m.layer], m.gate_cosine) for m in shared if m.gate_cosine is not None]
    if cosines:
        gate_axes.scatter(*zip(*cosines, strict=True), s=14, alpha=0.7, color="#216e39")
    lowest = min((c for _, c in cosines), default=0.0)
    gate_axes.set_ylim(min(0.0, lowest) - 0.05, 1.05)
    gate_axes.axhline(1.0, color="#888888", linewidth=0.8, linestyle=":")
    gate_axes.set_ylabel("gate cosine", fontsize=8)
    gate_axes.set_xlabel("layer")
    gate_axes.grid(axis="y", alpha=0.3)
    ticks = _ticks(len(layers))
    gate_axes.set_xticks(
        ticks, [short_layer_label(layers[i]) for i in ticks], fontsize=8, parse_math=False
    )
    gate_axes.set_xlim(-0.5, max(len(layers), 1) - 0.5)
    figure.tight_layout()
    return _png(figure)


# The lines of a channel's chart: (group, label, colour, line style).
_CHANNEL_LINES = (
    ("held_in", "held-in", "#2a6fb0", "-"),
    ("held_out", "held-out", "#b3261e", "-"),
    ("all", "all tasks", "#888888", ":"),
)


def channel_means(points: Sequence[ChannelPoint], title: str) -> bytes:
    """A channel's releases in the order it pointed at them (x) and their held-in, held-out
    and all-task mean accuracies (y), each with a standard-error bar; a release without an
    evaluation leaves a gap."""
    with _RENDER_LOCK:
        return _channel_means(points, title)


def _channel_means(points: Sequence[ChannelPoint], title: str) -> bytes:
    figure = Figure(figsize=(min(14.0, max(6.5, 3.0 + 0.5 * len(points))), 3.6))
    axes = figure.add_subplot()
    axes.set_title(_wrapped(title, 90), fontsize=10, parse_math=False)
    if not any(point.means for point in points):
        axes.text(0.5, 0.5, "no evaluated release yet", ha="center", va="center")
        axes.set_axis_off()
        return _png(figure)
    for group, label, colour, style in _CHANNEL_LINES:
        drawn = [
            (x, p.means[group], p.stderrs[group]) for x, p in enumerate(points) if group in p.means
        ]
        if not drawn:
            continue
        xs, ys, errors = zip(*drawn, strict=True)
        axes.errorbar(
            xs, ys, yerr=errors, label=label, color=colour, linestyle=style, marker="o", capsize=3
        )
    ticks = _ticks(len(points))
    axes.set_xticks(ticks, [f"#{points[i].release}" for i in ticks], fontsize=8)
    axes.set_xlim(-0.5, len(points) - 0.5)
    axes.set_ylim(0.0, 1.0)
    axes.set_xlabel("release, in the order the channel pointed at it")
    axes.set_ylabel("mean accuracy (± s.e.)", fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    return _png(figure)

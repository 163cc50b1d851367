"""Plots of a run as inline SVG markup (matplotlib's SVG canvas; no pyplot state, no display).

Every function returns the ``<svg>`` element as a string, ready to embed in HTML: the XML prolog
and metadata are dropped, text stays text (``svg.fonttype: none``, the page's fonts draw it),
``xlink:href`` becomes SVG 2 ``href`` (so the SVG namespace is the only URL left), the element
carries ``role="img"``, an ``aria-label`` and a ``<title>``, and its internal ids (clip paths,
markers) are prefixed with ``key`` so that several plots can share one page.
"""

from __future__ import annotations

import html
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from slimkit.prune.sensitivity import SensitivityReport

_RC = {"svg.fonttype": "none", "svg.hashsalt": "slimkit"}  # read when saving
_ID = re.compile(r'(\bid="|url\(#|href="#)([^"()#\s]+)')
MAX_BARS = 80  # layers drawn per bar chart


@dataclass(frozen=True)
class Point:
    """One stage in a scatter plot; ``kept`` and ``failed`` change its marker."""

    label: str
    x: float
    y: float
    kept: bool = False
    failed: bool = False


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasSVG(figure)
    return figure, figure.add_subplot()


def to_svg(figure: Figure, key: str, title: str) -> str:
    """``figure`` as an ``<svg>`` element (see the module docstring)."""
    from matplotlib import rc_context

    buf = io.StringIO()
    with rc_context(_RC):
        figure.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    text = text[text.index("<svg") :].replace(' xmlns:xlink="http://www.w3.org/1999/xlink"', "")
    text = text.replace("xlink:href=", "href=")
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, count=1, flags=re.S)
    ids = {m.group(2) for m in _ID.finditer(text) if m.group(1) == 'id="'}
    text = _ID.sub(
        lambda m: m.group(1) + (f"{key}-" if m.group(2) in ids else "") + m.group(2), text
    )
    label = html.escape(title)
    head = text.index(">") + 1
    return (
        text[: head - 1]
        + f' role="img" aria-label="{label}">\n <title>{label}</title>'
        + text[head:]
    )


def scatter(points: Sequence[Point], *, key: str, title: str, xlabel: str, ylabel: str) -> str:
    """One labelled point per stage, joined in stage order; the kept stage is a star, a stage
    that failed its gate is red."""
    figure, axes = _figure(6.4, 3.8)
    axes.plot([p.x for p in points], [p.y for p in points], color="0.7", linewidth=1, zorder=1)
    for p in points:
        color = "#c62828" if p.failed else "#1565c0"
        marker, size = ("*", 160) if p.kept else ("o", 40)
        axes.scatter([p.x], [p.y], s=size, marker=marker, color=color, zorder=2)
        axes.annotate(p.label, (p.x, p.y), xytext=(5, 5), textcoords="offset points", fontsize=8)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.margins(x=0.15, y=0.2)
    return to_svg(figure, key, title)


def bars(
    labels: Sequence[str],
    series: dict[str, Sequence[float]],
    *,
    key: str,
    title: str,
    xlabel: str,
    stacked: bool = False,
) -> str:
    """Horizontal bars, one row per layer (first layer on top) and one bar per series, side by
    side or ``stacked``. At most 80 layers are drawn."""
    labels = list(labels)[:MAX_BARS]
    n, k = len(labels), max(1, len(series))
    figure, axes = _figure(6.4, 1.0 + 0.22 * n * (1 if stacked else k) ** 0.5)
    height = 0.8 if stacked else 0.8 / k
    left = [0.0] * n
    for i, (name, values) in enumerate(series.items()):
        values = [float(v) for v in list(values)[:n]]
        ys = [row + (0 if stacked else (i - (k - 1) / 2) * height) for row in range(n)]
        axes.barh(ys, values, height=height, left=left if stacked else None, label=name)
        if stacked:
            left = [a + b for a, b in zip(left, values, strict=True)]
    axes.set_yticks(range(n), labels, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel(xlabel)
    axes.set_title(title)
    axes.grid(axis="x", alpha=0.3)
    if len(series) > 1:
        figure.legend(fontsize="x-small", loc="outside lower center", ncol=len(series))
    return to_svg(figure, key, title)


def sensitivity(report: SensitivityReport, *, key: str, title: str, ylabel: str = "") -> str:
    """Every group's metric against the share of its channels (or heads) removed."""
    figure, axes = _figure(6.4, 4.0)
    xs = [0.0, *report.sparsities]
    for root, g in report.groups.items():
        ys = [report.baseline_metric, *g.metrics]
        axes.plot(xs, ys, marker="o", markersize=3, linewidth=1, label=f"{root} ({g.units})")
    axes.axhline(report.baseline_metric, color="grey", linestyle="--", linewidth=0.8)
    axes.set_xlabel("sparsity of the group (share of its channels or heads removed)")
    axes.set_ylabel(ylabel or report.metric_name)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if report.groups:
        axes.legend(fontsize="x-small", ncol=1 + len(report.groups) // 16, loc="lower left")
    return to_svg(figure, key, title)

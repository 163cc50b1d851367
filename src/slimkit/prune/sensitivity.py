"""Sensitivity analysis (PaddleSlim-style) and the allocation it drives.

:func:`measure_sensitivity` prunes one group at a time, on a deep copy, at each channel
``sparsity`` of a grid (0.1 .. 0.9), with the same Torch-Pruning machinery as
:class:`~slimkit.prune.structured.StructuredPruning` (:mod:`slimkit.prune.groups`), and records
the metric ``evaluate(copy)`` gives and the MACs and parameters that really went (measured: a
group also slices its neighbours' inputs). Sparsities that keep the same number of channels
after ``round_to`` share one measurement. The :class:`SensitivityReport` serialises to JSON;
with ``cache=`` it is written there and reused while the fingerprint (weights, grid, channel
selection, example input shapes) matches. The ``evaluate`` function is not part of the
fingerprint: give each eval set its own cache file.

:func:`allocate_sensitivity` (pure, :mod:`slimkit.prune.allocation`, re-exported here) picks
per-group sparsities from the curves that reach a target reduction of MACs or parameters with the
least predicted drop, greedily on marginal drop per unit of cost saved.
:func:`plot_sensitivity` draws the curves (PNG); :func:`run_sensitivity` measures a
:class:`~slimkit.tasks.base.Task`'s model and writes both files.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from slimkit.errors import ConfigError
from slimkit.io import atomic_write_json, atomic_write_with
from slimkit.prune.allocation import (
    AllocationStep,
    GroupCurve,
    allocate_sensitivity,
    check_grid,
    greedy_path,
    path_sparsities,
    predicted_drop,
    predicted_reduction,
)
from slimkit.prune.groups import (
    ChannelSelection,
    Cost,
    GroupTrace,
    apply_records,
    measure_cost,
    removal_count,
    split_inputs,
    trace_groups,
)

if TYPE_CHECKING:
    from slimkit.tasks.base import Task

FORMAT = "slimkit.sensitivity"
FORMAT_VERSION = 1
DEFAULT_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
Metric = Literal["flops", "params"]

# --- the report -----------------------------------------------------------------------------------


@dataclass
class GroupSensitivity:
    """One group's measurements, one entry per grid sparsity: units (channels or heads) kept,
    the metric, and the MACs per sample and parameters removed from the whole model."""

    root: str
    kind: Literal["channels", "heads"]
    units: int
    kept: list[int]
    metrics: list[float]
    macs_removed: list[int]
    params_removed: list[int]


@dataclass
class SensitivityReport:
    """Sensitivity curves of every prunable group (by root module) of one model."""

    sparsities: list[float]
    baseline_metric: float
    baseline_macs: int
    baseline_params: int
    groups: dict[str, GroupSensitivity]
    fingerprint: str = ""
    metric_name: str = "metric"
    selection: dict[str, Any] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def curves(self, metric: Metric) -> dict[str, GroupCurve]:
        """Per group: drop (baseline minus metric) and share of ``metric`` removed."""
        total = max(1, self.baseline_macs if metric == "flops" else self.baseline_params)
        out = {}
        for root, g in self.groups.items():
            removed = g.macs_removed if metric == "flops" else g.params_removed
            out[root] = GroupCurve(
                tuple(self.sparsities),
                tuple(self.baseline_metric - m for m in g.metrics),
                tuple(r / total for r in removed),
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "metric_name": self.metric_name,
            "sparsities": list(self.sparsities),
            "baseline_metric": self.baseline_metric,
            "baseline_macs": self.baseline_macs,
            "baseline_params": self.baseline_params,
            "selection": self.selection,
            "groups": [vars(g) for g in self.groups.values()],
            "skipped": [{"group": root, "reason": why} for root, why in self.skipped],
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "sensitivity report") -> SensitivityReport:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"{source}: not a slimkit sensitivity report (format {FORMAT!r})")
        if data.get("version") != FORMAT_VERSION:
            raise ConfigError(
                f"{source}: sensitivity report version {data.get('version')!r} is not supported "
                f"(expected {FORMAT_VERSION})"
            )
        try:
            sparsities = [float(s) for s in data["sparsities"]]
            groups = {}
            for g in data["groups"]:
                group = GroupSensitivity(
                    str(g["root"]),
                    g["kind"],
                    int(g["units"]),
                    [int(v) for v in g["kept"]],
                    [float(v) for v in g["metrics"]],
                    [int(v) for v in g["macs_removed"]],
                    [int(v) for v in g["params_removed"]],
                )
                lists = (group.kept, group.metrics, group.macs_removed, group.params_removed)
                if any(len(v) != len(sparsities) for v in lists):
                    raise ValueError(f"group {group.root!r} does not have one value per sparsity")
                groups[group.root] = group
            return cls(
                sparsities=sparsities,
                baseline_metric=float(data["baseline_metric"]),
                baseline_macs=int(data["baseline_macs"]),
                baseline_params=int(data["baseline_params"]),
                groups=groups,
                fingerprint=str(data.get("fingerprint", "")),
                metric_name=str(data.get("metric_name", "metric")),
                selection=dict(data.get("selection") or {}),
                skipped=[(str(s["group"]), str(s["reason"])) for s in data.get("skipped", [])],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: malformed sensitivity report ({exc})") from None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the report as JSON, atomically."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SensitivityReport:
        """Read a report written by :meth:`save` (one-line :class:`ConfigError` otherwise)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no sensitivity report here") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: unreadable sensitivity report ({exc})") from None
        return cls.from_dict(data, source=str(path))

    def __str__(self) -> str:
        header = ["group", "units", *(f"{s:g}" for s in self.sparsities)]
        rows = [header, ["(baseline)", "", *(f"{self.baseline_metric:.4f}" for _ in header[2:])]]
        for root, g in self.groups.items():
            rows.append([root, f"{g.units} {g.kind}", *(f"{m:.4f}" for m in g.metrics)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        title = f"{self.metric_name} when one group loses a share of its channels"
        return "\n".join([title, *lines])


# --- measuring ------------------------------------------------------------------------------------


def fingerprint(
    model: nn.Module,
    sparsities: Sequence[float],
    selection: ChannelSelection,
    example_inputs: Any,
) -> str:
    """SHA-256 of the weights and buffers, the grid, the channel selection and the example
    inputs' shapes: what a sensitivity measurement depends on besides ``evaluate``."""
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    args, kwargs = split_inputs(example_inputs)
    shapes = [
        [tuple(t.shape), str(t.dtype)] if isinstance(t, torch.Tensor) else repr(t)
        for t in (*args, *(kwargs[k] for k in sorted(kwargs)))
    ]
    meta = {"sparsities": list(sparsities), "selection": _selection(selection), "inputs": shapes}
    digest.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _selection(selection: ChannelSelection) -> dict[str, Any]:
    data = selection.to_dict()
    return {key: data[key] for key in ChannelSelection.model_fields}


def _cached(path: Path, key: str) -> SensitivityReport | None:
    """The report at ``path`` when it exists, parses and matches ``key``; else None."""
    if not path.exists():
        return None
    try:
        report = SensitivityReport.load(path)
    except ConfigError:
        return None
    return report if report.fingerprint == key else None


def _point(
    trace: GroupTrace, root: str, count: int, evaluate: Callable[[nn.Module], float], base: Cost
) -> tuple[float, int, int] | None:
    """``(metric, macs removed, params removed)`` with ``count`` units of ``root`` removed on a
    copy; None when the group cannot be sliced (its plan then says why)."""
    trace.set_removals({root: count})
    todo = trace.records()
    pruned = copy.deepcopy(trace.model)
    apply_records(pruned, todo, trace.args, trace.kwargs)
    if trace.prunable.get(root) is None:
        return None
    metric = _metric(evaluate(pruned))
    cost = measure_cost(pruned, trace.args, trace.kwargs)
    return metric, base.macs - cost.macs, base.params - cost.params


def _metric(value: Any) -> float:
    try:
        metric = float(value)
    except (TypeError, ValueError):
        metric = math.nan
    if not math.isfinite(metric):
        raise ConfigError(f"evaluate(model) must return a finite number, got {value!r}")
    return metric


def measure_sensitivity(
    model: nn.Module,
    example_inputs: Any,
    evaluate: Callable[[nn.Module], float],
    *,
    config: ChannelSelection | None = None,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    cache: str | os.PathLike[str] | None = None,
    progress: bool = True,
    metric_name: str = "metric",
) -> SensitivityReport:
    """Measure every prunable group's metric (higher is better) at each channel sparsity.

    ``config`` picks groups and channels (scope, importance, round_to, prune_heads, seed; a
    :class:`~slimkit.prune.structured.StructuredPruningConfig` works too). ``model`` is never
    changed: each point prunes a deep copy. ``cache``: a JSON file reused when its fingerprint
    matches, else (re)written. ``progress`` shows a ``rich`` progress bar.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    selection = config if config is not None else ChannelSelection()
    grid = check_grid(sparsities)
    key = fingerprint(model, grid, selection, example_inputs)
    if cache is not None and (hit := _cached(Path(cache), key)) is not None:
        return hit
    args, kwargs = split_inputs(example_inputs)
    trace = trace_groups(model, args, kwargs, selection)
    baseline = _metric(evaluate(model))
    base = measure_cost(model, args, kwargs)
    groups: dict[str, GroupSensitivity] = {}
    todo = list(trace.prunable.values())
    bar = Progress(
        TextColumn("[bold]sensitivity[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[group]}"),
        TimeElapsedColumn(),
        disable=not progress,
    )
    with bar:
        task = bar.add_task("sensitivity", total=len(todo) * len(grid), group="")
        for g in todo:
            plan = g.plan
            bar.update(task, group=plan.root)
            seen: dict[int, tuple[float, int, int] | None] = {0: (baseline, 0, 0)}
            rows = []
            for sparsity in grid:
                count = removal_count(
                    plan.units, plan.units, sparsity, selection.round_to, heads=g.spec is not None
                )
                if count not in seen:
                    seen[count] = _point(trace, plan.root, count, evaluate, base)
                rows.append((plan.units - count, seen[count]))
                bar.advance(task)
                if seen[count] is None:
                    bar.advance(task, len(grid) - len(rows))
                    break
            if any(point is None for _, point in rows):
                continue  # the plan holds the reason; listed below
            kept, points = zip(*rows, strict=True)
            groups[plan.root] = GroupSensitivity(
                plan.root,
                plan.kind,
                plan.units,
                list(kept),
                *(list(column) for column in zip(*points, strict=True)),
            )
    trace.set_removals({})
    report = SensitivityReport(
        sparsities=list(grid),
        baseline_metric=baseline,
        baseline_macs=base.macs,
        baseline_params=base.params,
        groups=groups,
        fingerprint=key,
        metric_name=metric_name,
        selection=_selection(selection),
        skipped=[(g.root, g.skip) for g in trace.plan.groups if g.skip],
    )
    if cache is not None:
        report.save(cache)
    return report


# --- plot and task-level run ----------------------------------------------------------------------


def plot_sensitivity(
    report: SensitivityReport,
    path: str | os.PathLike[str],
    *,
    size: tuple[float, float] = (8.0, 5.0),
    dpi: int = 100,
) -> Path:
    """Line plot of every group's metric against its sparsity, written atomically as a PNG of
    ``size`` inches at ``dpi`` (800 x 500 pixels by default). Uses matplotlib's Agg canvas
    directly: no pyplot state, no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    xs = [0.0, *report.sparsities]
    for root, g in report.groups.items():
        ys = [report.baseline_metric, *g.metrics]
        axes.plot(xs, ys, marker="o", markersize=3, linewidth=1, label=f"{root} ({g.units})")
    axes.axhline(report.baseline_metric, color="grey", linestyle="--", linewidth=0.8)
    axes.set_xlabel("sparsity of the group (share of its channels or heads removed)")
    axes.set_ylabel(report.metric_name)
    axes.set_title(f"sensitivity: {report.metric_name} when one group is pruned")
    axes.grid(alpha=0.3)
    if report.groups:
        columns = 1 + len(report.groups) // 16
        axes.legend(fontsize="x-small", ncol=columns, loc="lower left")
    return atomic_write_with(path, lambda tmp: figure.savefig(tmp, format="png"))


@dataclass(frozen=True)
class SensitivityFiles:
    """What :func:`run_sensitivity` measured and wrote."""

    report: SensitivityReport
    json: Path
    png: Path


def run_sensitivity(
    task: Task,
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    config: ChannelSelection | None = None,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    progress: bool = True,
) -> SensitivityFiles:
    """Measure ``model`` (trained) on ``task.val_loader`` with ``task.metric`` and write
    ``sensitivity.json`` (also the cache: a matching one is reused) and ``sensitivity.png`` into
    ``out_dir``, atomically. The JSON is what ``sensitivity_file`` of structured_prune reads."""
    folder = Path(out_dir)
    report = measure_sensitivity(
        model,
        task.example_inputs,
        lambda m: task.metric(m, task.val_loader),
        config=config,
        sparsities=sparsities,
        cache=folder / "sensitivity.json",
        progress=progress,
        metric_name=task.metric_name,
    )
    png = plot_sensitivity(report, folder / "sensitivity.png")
    return SensitivityFiles(report, folder / "sensitivity.json", png)


__all__ = [
    "DEFAULT_SPARSITIES",
    "AllocationStep",
    "GroupCurve",
    "GroupSensitivity",
    "SensitivityFiles",
    "SensitivityReport",
    "allocate_sensitivity",
    "fingerprint",
    "greedy_path",
    "measure_sensitivity",
    "path_sparsities",
    "plot_sensitivity",
    "predicted_drop",
    "predicted_reduction",
    "run_sensitivity",
]

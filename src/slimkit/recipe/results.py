"""What a run measured: one :class:`StageResult` per stage (and the baseline), and the run.

``RunResult.to_dict()`` is what ``metrics.json`` holds; ``str(RunResult)`` is the table the CLI
prints: one column per stage, a last column with the change from the baseline to the kept model.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console

from slimkit.report.table import make_table


@dataclass
class StageResult:
    """Measurements after one stage (or the baseline).

    ``onnx`` (when the recipe exports ONNX) describes this stage's ONNX file: ``path`` (relative to
    the run folder), ``form`` (``fp32`` or the technique that shaped it), ``bytes``, the task
    metric as ONNX Runtime computes it (``test_metric``), ``integer_ops`` after ORT's graph
    optimisation, ``latency_ms`` per batch size and ``latency_ratio`` against the stage before
    (measured interleaved with it). ``gate`` holds ``passed`` and the ``violations``.
    """

    name: str
    val_metric: float
    test_metric: float
    params: int
    nonzero_params: int
    sparsity: float
    macs: int  # multiply-accumulates per sample (slimkit.measure.flops.count_macs)
    steps: int
    wall_s: float
    techniques: list[dict[str, Any]] = field(default_factory=list)
    onnx: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageResult:
        """Inverse of ``asdict`` after a JSON round trip (batch-size keys back to int)."""
        onnx = data.get("onnx")
        if onnx:
            onnx = dict(onnx)
            for key in ("latency_ms", "latency_ratio"):
                if key in onnx:
                    onnx[key] = _int_keys(onnx[key])
        return cls(**{**data, "onnx": onnx})


@dataclass
class RunResult:
    """A whole run; ``to_dict`` is what ``metrics.json`` holds.

    ``kept`` names the stage whose model was exported (the last one, unless the gate stopped the
    run: then the last stage that passed, or ``baseline``); ``stopped`` says why it stopped early.
    """

    recipe: str
    task: str
    metric_name: str
    run_dir: str
    baseline: StageResult
    stages: list[StageResult]
    artifacts: dict[str, Any]
    wall_s: float
    kept: str = ""
    stopped: str | None = None
    environment: dict[str, Any] = field(default_factory=dict)  # CPU flags, thread counts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        """Inverse of :meth:`to_dict` after a JSON round trip (batch-size keys back to int)."""
        artifacts = json.loads(json.dumps(data.get("artifacts") or {}))
        latency = (artifacts.get("onnx") or {}).get("latency")
        if latency:
            latency["ratio"] = _int_keys(latency.get("ratio", {}))
            medians = latency.get("median_ms", {})
            latency["median_ms"] = {n: _int_keys(v) for n, v in medians.items()}
        return cls(
            recipe=str(data.get("recipe", "")),
            task=str(data.get("task", "")),
            metric_name=str(data.get("metric_name", "metric")),
            run_dir=str(data.get("run_dir", "")),
            baseline=StageResult.from_dict(data["baseline"]),
            stages=[StageResult.from_dict(s) for s in data.get("stages", [])],
            artifacts=artifacts,
            wall_s=float(data.get("wall_s", 0.0)),
            kept=str(data.get("kept", "")),
            stopped=data.get("stopped"),
            environment=dict(data.get("environment") or {}),
        )

    @property
    def final(self) -> StageResult:
        """The kept result (see the class docstring)."""
        for result in [self.baseline, *self.stages]:
            if result.name == self.kept:
                return result
        return self.stages[-1] if self.stages else self.baseline

    @property
    def violations(self) -> list[tuple[str, str]]:
        """``(stage, violation)`` for every gate violation of the run."""
        return [(s.name, v) for s in self.stages for v in (s.gate or {}).get("violations", [])]

    def columns(self) -> list[str]:
        return ["metric", "baseline", *(s.name for s in self.stages), "change"]

    def rows(self) -> list[list[Any]]:
        """One row per measure: the baseline, each stage, and the change to the kept model.

        Sizes, MACs and latencies change as ratios (``x0.25``); metrics and counts as differences.
        """
        m = self.metric_name
        results = [self.baseline, *self.stages]
        base, final = self.baseline, self.final

        def row(label: str, values: list[Any], change: Any) -> list[Any]:
            return [label, *values, change]

        def ratio(after: float | None, before: float | None) -> str:
            return f"x{after / before:.3f}" if after is not None and before else ""

        def onnx_value(result: StageResult, *keys: Any) -> Any:
            value: Any = result.onnx
            for key in keys:
                if not isinstance(value, dict) or key not in value:
                    return None
                value = value[key]
            return value

        rows = [
            row(f"test {m}", [r.test_metric for r in results], final.test_metric - base.test_metric)
        ]
        ort = [onnx_value(r, "test_metric") for r in results]
        if any(v is not None for v in ort):
            change = (ort[results.index(final)] or 0.0) - (ort[0] or 0.0)
            rows.append(row(f"test {m} (ORT)", ["" if v is None else v for v in ort], change))
        rows += [
            row(
                "sparsity (all params)",
                [r.sparsity for r in results],
                final.sparsity - base.sparsity,
            ),
            row(
                "nonzero params",
                [r.nonzero_params for r in results],
                final.nonzero_params - base.nonzero_params,
            ),
            row("params", [r.params for r in results], final.params - base.params),
            row("MACs per sample", [r.macs for r in results], ratio(final.macs, base.macs)),
        ]
        sizes = [onnx_value(r, "bytes") for r in results]
        if any(v is not None for v in sizes):
            rows.append(row("ONNX form", [onnx_value(r, "form") or "" for r in results], ""))
            rows.append(
                row(
                    "ONNX bytes",
                    ["" if v is None else v for v in sizes],
                    ratio(sizes[results.index(final)], sizes[0]),
                )
            )
        packed = self.artifacts.get("packed")
        if packed:
            gap = [""] * (len(results) - 2)
            rows.append(
                [
                    f"checkpoint bytes (packed {packed['values_dtype']})",
                    packed["dense_fp32_bytes"],
                    *gap,
                    packed["bytes"],
                    f"x{packed['ratio']:.3f}",
                ]
            )
        latency = (self.artifacts.get("onnx") or {}).get("latency")
        batches = latency["batch_sizes"] if latency else _stage_batches(results)
        for b in batches:
            values = [onnx_value(r, "latency_ms", b) for r in results]
            if all(v is None for v in values):
                continue
            change = f"x{latency['ratio'][b]:.3f}" if latency else ""
            threads = latency["threads"] if latency else onnx_value(results[0], "threads")
            rows.append(
                row(
                    f"ORT ms batch {b} ({threads} thr)",
                    ["" if v is None else round(v, 4) for v in values],
                    change,
                )
            )
        if any(r.gate for r in self.stages):
            marks = ["ok" if (r.gate or {}).get("passed", True) else "FAILED" for r in self.stages]
            rows.append(row("gate", ["", *marks], (self.stopped and "stopped") or ""))
        rows.append(row("wall time s", [r.wall_s for r in results], ""))
        return rows

    def __str__(self) -> str:
        console = Console(width=120, record=True, file=io.StringIO())
        title = f"{self.recipe}: before / after each stage"
        if self.kept and self.stages and self.kept != self.stages[-1].name:
            title += f" (kept: {self.kept})"
        console.print(make_table(title, self.columns(), self.rows()))
        for stage, violation in self.violations:
            console.print(f"gate: {stage}: {violation}")
        if self.stopped:
            console.print(f"stopped: {self.stopped}")
        return console.export_text()


def _int_keys(values: dict[Any, Any]) -> dict[Any, Any]:
    """Batch-size keys back to int after JSON made them strings."""
    return {int(k) if str(k).isdigit() else k: v for k, v in values.items()}


def _stage_batches(results: list[StageResult]) -> list[Any]:
    for result in results:
        latency = (result.onnx or {}).get("latency_ms")
        if latency:
            return list(latency)
    return []

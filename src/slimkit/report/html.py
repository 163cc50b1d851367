"""The self-contained ``report.html`` of a run, rendered from its ``metrics.json``.

One file that opens offline: inline CSS, plots as inline SVG (:mod:`slimkit.report.plots`), no
URL but the SVG namespace. It shows the run (recipe, task, kept stage, why it stopped), the
per-stage table of :meth:`RunResult.rows` (the one the CLI prints), gate violations, the metric
against size and against ORT latency across stages, per-layer bars of each technique that
reports sparsity, bits or kept channels, the sensitivity curves found in
``stages/*/sensitivity.json``, and every module a technique skipped with the reason.

A small inline script marks the page for headless checks: ``<body data-rendered="ok">`` after
load with ``data-plots`` (SVG plots drawn with a non-zero size), and every script error, console
error or failed load appended to ``<html data-errors>``.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from slimkit.errors import ConfigError
from slimkit.io import atomic_write_text
from slimkit.prune.sensitivity import SensitivityReport
from slimkit.recipe.results import RunResult, StageResult
from slimkit.report import plots
from slimkit.report.table import cell_text

__all__ = ["render_report", "run_from_dict", "write_report"]

REPORT_NAME = "report.html"

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;
max-width:72rem;padding:0 1rem;color:#1b1b1b}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
h3{font-size:1rem}dl.meta{display:grid;grid-template-columns:max-content auto;gap:.2rem 1rem}
dt{color:#555}dd{margin:0}table{border-collapse:collapse;margin:.5rem 0}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}thead th{background:#f4f6f8}
td.failed,.violations{background:#fdecea;color:#b71c1c}
.violations{border:1px solid #f5c6cb;padding:.5rem 1rem}.scroll{overflow-x:auto}
figure.plot{margin:1rem 0}figure.plot svg{max-width:100%;height:auto}
.note{color:#666}dl.totals{display:flex;flex-wrap:wrap;gap:.2rem 1.2rem;font-size:.9em}
dl.totals dt::after{content:":"}dl.totals dd{margin:0 0 0 -.8rem}
"""

_SCRIPT = """
(function () {
  var root = document.documentElement;
  function record(message) {
    root.setAttribute("data-errors", (root.getAttribute("data-errors") || "") + message + "\\n");
  }
  window.onerror = function (message, source, line) { record(message + " (line " + line + ")"); };
  window.addEventListener("error", function (event) {
    var target = event.target;
    if (target && target !== window) { record("failed to load " + (target.src || target.href)); }
  }, true);
  var consoleError = console.error;
  console.error = function () {
    record(Array.prototype.join.call(arguments, " "));
    consoleError.apply(console, arguments);
  };
  window.addEventListener("load", function () {
    var drawn = 0;
    document.querySelectorAll("figure.plot svg").forEach(function (svg) {
      var box = svg.getBoundingClientRect();
      if (box.width > 0 && box.height > 0) { drawn += 1; }
    });
    document.body.dataset.plots = String(drawn);
    document.body.dataset.rendered = "ok";
  });
})();
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def run_from_dict(metrics: dict[str, Any]) -> RunResult:
    """The :class:`RunResult` whose ``to_dict()`` gave ``metrics`` (see ``RunResult.from_dict``);
    ``ConfigError`` when ``metrics`` is not a run result."""
    try:
        return RunResult.from_dict(metrics)
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"metrics: not a slimkit run result ({exc!r})") from None


def _sensitivity_reports(run_dir: Path) -> dict[str, SensitivityReport | str]:
    """Stage folder name -> its sensitivity report, or why it could not be read."""
    out: dict[str, SensitivityReport | str] = {}
    for path in sorted(Path(run_dir).glob("stages/*/sensitivity.json")):
        try:
            out[path.parent.name] = SensitivityReport.load(path)
        except ConfigError as exc:
            out[path.parent.name] = str(exc)
    return out


def _slug(name: str) -> str:
    """``name`` as a piece of an element id (stage names are free text)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def _figure(svg: str, key: str, caption: str) -> str:
    return (
        f'<figure class="plot" id="plot-{_e(key)}">{svg}'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _header(run: RunResult, metrics: dict[str, Any]) -> str:
    latency = (run.artifacts.get("onnx") or {}).get("latency") or {}
    facts: list[tuple[str, Any]] = [
        ("recipe", run.recipe),
        ("task", run.task),
        ("metric", run.metric_name),
        ("stages", len(run.stages)),
        ("kept", run.kept or run.final.name),
    ]
    if run.stopped:
        facts.append(("stopped", run.stopped))
    facts.append(("wall time", f"{run.wall_s:.1f} s"))
    if latency.get("threads") is not None:
        facts.append(("ORT threads", latency["threads"]))
    for key in ("cpu", "threads"):
        if metrics.get(key) is not None:
            facts.append((key, metrics[key]))
    facts += [(k, v) for k, v in (metrics.get("environment") or {}).items()]
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts)
    return f'<h1>slimkit run: {_e(run.recipe)}</h1>\n<dl class="meta">{items}</dl>'


def _summary(run: RunResult) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in run.columns())
    body = []
    for row in run.rows():
        cells = [f"<th>{_e(row[0])}</th>"]
        for value in row[1:]:
            text = cell_text(value)
            failed = ' class="failed"' if text == "FAILED" else ""
            cells.append(f"<td{failed}>{_e(text)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    table = (
        f'<div class="scroll"><table id="summary"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )
    violations = run.violations
    if violations:
        items = "".join(f"<li>{_e(s)}: {_e(v)}</li>" for s, v in violations)
        table += f'<div class="violations" id="violations"><b>gate</b><ul>{items}</ul></div>'
    if run.stopped:
        table += f'<p class="violations">stopped: {_e(run.stopped)}</p>'
    return "<h2>Before / after each stage</h2>\n" + table


def _tradeoffs(run: RunResult) -> str:
    results = [run.baseline, *run.stages]
    m = run.metric_name

    def point(r: StageResult, x: Any, y: float) -> plots.Point:
        failed = not (r.gate or {}).get("passed", True)
        return plots.Point(r.name, float(x), float(y), kept=r.name == run.final.name, failed=failed)

    def ort_metric(r: StageResult) -> float:
        value = _num((r.onnx or {}).get("test_metric"))
        return r.test_metric if value is None else value

    out = []
    with_onnx = [r for r in results if _num((r.onnx or {}).get("bytes")) is not None]
    packed = run.artifacts.get("packed")
    if with_onnx:
        points = [point(r, r.onnx["bytes"], ort_metric(r)) for r in with_onnx]
        xlabel, ylabel = "ONNX file bytes", f"test {m} (ONNX Runtime where measured)"
    elif packed:
        points = [
            point(run.baseline, packed["dense_fp32_bytes"], run.baseline.test_metric),
            point(run.final, packed["bytes"], run.final.test_metric),
        ]
        xlabel, ylabel = "checkpoint bytes (dense fp32 / packed)", f"test {m}"
    else:
        points = [point(r, r.nonzero_params, r.test_metric) for r in results]
        xlabel, ylabel = "nonzero parameters", f"test {m}"
    title = f"{m} vs size"
    svg = plots.scatter(points, key="metric-vs-size", title=title, xlabel=xlabel, ylabel=ylabel)
    out.append(_figure(svg, "metric-vs-size", f"{title}: one point per stage, star = kept"))
    timed = [r for r in results if (r.onnx or {}).get("latency_ms")]
    if timed:
        batch = max(max(int(b) for b in r.onnx["latency_ms"]) for r in timed)
        timed = [r for r in timed if batch in r.onnx["latency_ms"]]
        points = [point(r, r.onnx["latency_ms"][batch], ort_metric(r)) for r in timed]
        title = f"{m} vs ORT latency (batch {batch})"
        xlabel = f"ONNX Runtime median ms per batch of {batch}"
        svg = plots.scatter(
            points, key="metric-vs-latency", title=title, xlabel=xlabel, ylabel=ylabel
        )
        out.append(_figure(svg, "metric-vs-latency", f"{title}: one point per stage"))
    return "<h2>Trade-offs across stages</h2>\n" + "\n".join(out)


def _layer_plot(
    stage: str, index: int, tech: dict[str, Any], sens: SensitivityReport | str | None
) -> str:
    """Per-layer bars of one technique's rows: sparsity, bits, or channels kept / removed."""
    rows = [r for r in tech.get("layers") or [] if isinstance(r, dict)]
    columns = {c for r in rows for c in r}
    labels = [str(r.get("module", r.get("term", i))) for i, r in enumerate(rows)]
    kind = str(tech.get("technique", "technique"))
    key, title = f"layers-{_slug(stage)}-{index}", f"{stage}: {kind} per layer"

    def series(column: str) -> list[float]:
        return [_num(r.get(column)) or 0.0 for r in rows]

    if "sparsity" in columns:
        svg = plots.bars(labels, {"sparsity": series("sparsity")}, key=key, title=title,
                         xlabel="sparsity (share of weights that are zero)")  # fmt: skip
    elif columns & {"bits", "wbits", "abits"}:
        data = {c: series(c) for c in ("bits", "wbits", "abits") if c in columns}
        svg = plots.bars(labels, data, key=key, title=title, xlabel="bits")
    elif columns & {"out_kept", "in_kept"}:
        groups = sens.groups if isinstance(sens, SensitivityReport) else {}
        out, data = series("out_kept"), {}
        removed = [  # known where the layer roots a group whose sensitivity was measured
            groups[n].units - k if n in groups and groups[n].kind == "channels" and k else 0.0
            for n, k in zip(labels, out, strict=True)
        ]
        for name, values in (
            ("output channels kept", out),
            ("output channels removed", removed),
            ("input channels kept", series("in_kept")),
        ):
            if any(values):
                data[name] = values
        svg = plots.bars(labels, data, key=key, title=title, xlabel="channels")
    else:
        return ""
    more = f" (the first {plots.MAX_BARS} of {len(rows)})" if len(rows) > plots.MAX_BARS else ""
    return _figure(svg, key, f"{title}: one row per layer the technique reports{more}")


def _technique(stage: str, index: int, tech: dict[str, Any], sens: Any) -> str:
    kind = _e(tech.get("technique", "technique"))
    parts = [f"<h3>{kind}</h3>"]
    totals = tech.get("totals") or {}
    if totals:
        items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(cell_text(v))}</dd>" for k, v in totals.items())
        parts.append(f'<dl class="totals">{items}</dl>')
    parts.append(_layer_plot(stage, index, tech, sens))
    skipped = tech.get("skipped") or []
    if skipped:
        items = "".join(f"<li>{_skip_item(s)}</li>" for s in skipped)
        parts.append(f'<p>skipped ({len(skipped)}):</p><ul class="skipped">{items}</ul>')
    return "\n".join(p for p in parts if p)


def _skip_item(entry: Any) -> str:
    if not isinstance(entry, dict):
        return _e(entry)
    name = entry.get("module", entry.get("group", ""))
    return f"<code>{_e(name)}</code>: {_e(entry.get('reason', ''))}"


def _sensitivity(name: str, sens: SensitivityReport | str, metric: str) -> str:
    if isinstance(sens, str):
        return f'<p class="note">sensitivity curves not shown: {_e(sens)}</p>'
    if sens.metric_name != "metric":  # the structured stage's measurement names no metric
        metric = sens.metric_name
    title = f"{name}: {metric} when one group is pruned"
    key = f"sensitivity-{_slug(name)}"
    return _figure(plots.sensitivity(sens, key=key, title=title, ylabel=metric), key, title)


def _stages(run: RunResult, reports: dict[str, SensitivityReport | str]) -> str:
    parts = []
    for stage in run.stages:
        sens = reports.get(stage.name)
        body = [_technique(stage.name, i, t, sens) for i, t in enumerate(stage.techniques)]
        if sens is not None:
            body.append(_sensitivity(stage.name, sens, run.metric_name))
        parts.append(f"<h2>Stage {_e(stage.name)}</h2>\n" + "\n".join(body))
    for name in sorted(set(reports) - {s.name for s in run.stages}):
        parts.append(
            f"<h2>Sensitivity ({_e(name)})</h2>\n"
            + _sensitivity(name, reports[name], run.metric_name)
        )
    return "\n".join(parts)


def render_report(metrics: dict[str, Any], run_dir: str | os.PathLike[str]) -> str:
    """The HTML page of a run from its ``metrics.json`` dict (reads the sensitivity reports
    under ``run_dir/stages/*/``)."""
    run = run_from_dict(metrics)
    reports = _sensitivity_reports(Path(run_dir))
    body = "\n".join([_header(run, metrics), _summary(run), _tradeoffs(run), _stages(run, reports)])
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>slimkit: {_e(run.recipe)}</title>\n<style>{_CSS}</style>\n"
        f"<script>{_SCRIPT}</script>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def write_report(run_dir: str | os.PathLike[str], metrics: dict[str, Any] | None = None) -> Path:
    """Write ``run_dir/report.html`` atomically (from ``run_dir/metrics.json`` unless
    ``metrics`` is given) and return its path."""
    run_dir = Path(run_dir)
    if metrics is None:
        path = run_dir / "metrics.json"
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read the run's metrics ({exc})") from None
    return atomic_write_text(run_dir / REPORT_NAME, render_report(metrics, run_dir))

"""report.html: content, escaping and self-containment, and a real render in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from slimkit.errors import ConfigError
from slimkit.prune.sensitivity import GroupSensitivity, SensitivityReport
from slimkit.recipe.results import RunResult
from slimkit.report.html import render_report, run_from_dict, write_report

SVG_NAMESPACE = "http://www.w3.org/2000/svg"
PLOT_IDS = (
    "plot-metric-vs-size",
    "plot-metric-vs-latency",
    "plot-layers-prune_b_-0",
    "plot-layers-int8-0",
    "plot-sensitivity-prune_b_",
)


def _stage(name: str, metric: float, onnx_bytes: int, ms: float, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "val_metric": metric,
        "test_metric": metric,
        "params": 1000,
        "nonzero_params": 600,
        "sparsity": 0.4,
        "macs": 5000,
        "steps": 10,
        "wall_s": 1.5,
        "techniques": [],
        "onnx": {
            "path": f"onnx/{name}.onnx",
            "form": "fp32",
            "bytes": onnx_bytes,
            "test_metric": metric,
            "integer_ops": {},
            "threads": 1,
            "latency_ms": {"1": ms / 10, "32": ms},
        },
        "gate": None,
        **extra,
    }


def _metrics() -> dict[str, Any]:
    """A two-stage run as metrics.json holds it (JSON round trip: batch keys are strings)."""
    prune = _stage(
        "prune <b>",
        0.9,
        3000,
        0.8,
        techniques=[
            {
                "technique": "structured_prune",
                "layers": [
                    {"module": "conv1", "out_kept": 6, "in_kept": "", "params_removed": 40},
                    {"module": "conv2", "out_kept": "", "in_kept": 6, "params_removed": 40},
                ],
                "totals": {"channels_removed": 2},
                "skipped": [{"module": "fc<out>", "reason": "an output layer & <kept>"}],
            }
        ],
        gate={"passed": False, "violations": ["accuracy dropped 0.05 > 0.01 <max>"]},
    )
    int8 = _stage(
        "int8",
        0.88,
        1000,
        0.5,
        techniques=[
            {
                "technique": "static_quant",
                "layers": [{"module": "conv1", "bits": 8}, {"module": "conv2", "bits": 8}],
                "totals": {"layers": 2},
                "skipped": [],
            }
        ],
        gate={"passed": True, "violations": []},
    )
    int8["onnx"]["form"] = "static_quant"
    return {
        "recipe": "tiny <script>alert(1)</script>",
        "task": "digits",
        "metric_name": "accuracy",
        "run_dir": "runs/x",
        "baseline": _stage("baseline", 0.95, 4000, 1.0),
        "stages": [prune, int8],
        "artifacts": {
            "dense": {"path": "model.safetensors", "bytes": 900},
            "packed": {
                "path": "model.packed.safetensors",
                "bytes": 500,
                "dense_fp32_bytes": 4000,
                "ratio": 0.125,
                "values_dtype": "int8",
            },
            "onnx": {
                "model_bytes": 1000,
                "baseline_bytes": 4000,
                "latency": {
                    "threads": 1,
                    "batch_sizes": [1, 32],
                    "median_ms": {
                        "baseline": {"1": 0.1, "32": 1.0},
                        "model": {"1": 0.05, "32": 0.5},
                    },
                    "ratio": {"1": 0.5, "32": 0.5},
                },
            },
        },
        "wall_s": 12.0,
        "kept": "int8",
        "stopped": None,
    }


def _write_sensitivity(run_dir: Path, stage: str) -> None:
    report = SensitivityReport(
        sparsities=[0.25, 0.5, 0.75],
        baseline_metric=0.95,
        baseline_macs=5000,
        baseline_params=1000,
        groups={
            "conv1": GroupSensitivity(
                "conv1", "channels", 8, [6, 4, 2], [0.94, 0.9, 0.6], [1, 2, 3], [1, 2, 3]
            )
        },
        metric_name="accuracy",
    )
    folder = run_dir / "stages" / stage
    folder.mkdir(parents=True)
    report.save(folder / "sensitivity.json")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    _write_sensitivity(tmp_path, "prune <b>")
    (tmp_path / "metrics.json").write_text(json.dumps(_metrics()), encoding="utf-8")
    return tmp_path


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``report.html`` of the hand-made run (rendered once: each plot costs ~0.5 s here)."""
    folder = tmp_path_factory.mktemp("run")
    _write_sensitivity(folder, "prune <b>")
    return write_report(folder, _metrics())


def test_run_from_dict_gives_the_cli_table() -> None:
    run = run_from_dict(_metrics())
    assert isinstance(run, RunResult)
    assert run.columns() == ["metric", "baseline", "prune <b>", "int8", "change"]
    assert "ORT ms batch 32 (1 thr)" in str(run)  # latency ratios found under int batch keys
    with pytest.raises(ConfigError, match="not a slimkit run result"):
        run_from_dict({"stages": []})


def test_report_escapes_and_has_one_column_per_stage(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert "<script>alert(1)" not in text and "tiny &lt;script&gt;alert(1)" in text
    assert "prune <b>" not in text and "prune &lt;b&gt;" in text
    assert "fc&lt;out&gt;" in text and "an output layer &amp; &lt;kept&gt;" in text
    header = re.search(r'<table id="summary"><thead><tr>(.*?)</tr></thead>', text).group(1)
    cells = re.findall(r"<th>(.*?)</th>", header)
    assert cells == ["metric", "baseline", "prune &lt;b&gt;", "int8", "change"]
    body = re.search(r"<tbody>(.*?)</tbody>", text, re.S).group(1)
    assert all(row.count("<t") == len(cells) for row in re.findall(r"<tr>(.*?)</tr>", body))
    assert '<td class="failed">FAILED</td>' in text
    assert 'id="violations"' in text and "0.01 &lt;max&gt;" in text


def test_report_plots_are_inline_svg_and_self_contained(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for plot in PLOT_IDS:
        figure = re.search(rf'<figure class="plot" id="{plot}">(.*?)</figure>', text, re.S)
        assert figure, plot
        assert figure.group(1).startswith("<svg") and "<title>" in figure.group(1)
    assert text.count("<svg") == len(PLOT_IDS)
    urls = set(re.findall(r"(?:https?:)?//[\w.-]+[^\s\"'<>)]*", text))
    assert urls <= {SVG_NAMESPACE}, urls
    assert not re.search(r"<(link|img|iframe)\b|@import|url\((?!#)|src=", text)
    ids = re.findall(r'\bid="([^"]+)"', text)
    assert len(ids) == len(set(ids))  # the plots' clip paths and markers do not collide


def test_report_without_onnx_or_sensitivity(tmp_path: Path) -> None:
    metrics = _metrics()
    for stage in [metrics["baseline"], *metrics["stages"]]:
        stage["onnx"] = None
    del metrics["artifacts"]["onnx"]
    page = render_report(metrics, tmp_path)
    assert 'id="plot-metric-vs-size"' in page and "checkpoint bytes" in page
    assert "plot-metric-vs-latency" not in page and "plot-sensitivity" not in page


def test_write_report_reads_metrics_and_flags_bad_sensitivity(run_dir: Path) -> None:
    bad = run_dir / "stages" / "other"
    bad.mkdir()
    (bad / "sensitivity.json").write_text("{}", encoding="utf-8")
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    page = path.read_text(encoding="utf-8")
    assert "sensitivity curves not shown" in page and "plot-sensitivity-prune_b_" in page
    with pytest.raises(ConfigError, match="cannot read the run's metrics"):
        write_report(run_dir / "missing")


def _chromium() -> str:
    for name in (os.environ.get("SLIMKIT_CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.fail("chromium is not installed: run `make browser` (apt-get install chromium)")


def _open_in_chromium(page: Path, profile: Path) -> tuple[str, str, list[str]]:
    """Load ``page`` in headless Chromium: the ``<html>`` and ``<body>`` attributes of the DOM
    after load, and the console messages Chromium logged."""
    command = [
        _chromium(),
        "--headless",
        "--disable-gpu",
        "--no-sandbox",  # root in a container: no user namespaces for the sandbox
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1200,900",
        "--dump-dom",
        page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    html_tag = re.search(r"<html([^>]*)>", done.stdout)
    body_tag = re.search(r"<body([^>]*)>", done.stdout)
    assert html_tag and body_tag, done.stdout[:500]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return html_tag.group(1), body_tag.group(1), console


def test_report_renders_in_headless_chromium(page: Path, tmp_path: Path) -> None:
    html_attrs, body_attrs, console = _open_in_chromium(page, tmp_path / "profile")
    assert 'data-rendered="ok"' in body_attrs
    assert f'data-plots="{len(PLOT_IDS)}"' in body_attrs  # each plot laid out, non-zero size
    assert "data-errors" not in html_attrs
    assert not console, console


def test_chromium_check_sees_script_errors(page: Path, tmp_path: Path) -> None:
    """The hooks the check relies on do report a broken page."""
    broken = tmp_path / "broken.html"
    text = page.read_text(encoding="utf-8")
    broken.write_text(text.replace("</body>", "<script>notDefined();</script></body>"), "utf-8")
    html_attrs, body_attrs, console = _open_in_chromium(broken, tmp_path / "profile")
    assert 'data-rendered="ok"' in body_attrs
    assert "notDefined is not defined" in html_attrs
    assert any("notDefined" in line for line in console)

"""Sensitivity analysis: measured (not assumed) costs, the JSON report, its cache, the plot,
and the task-level run that writes both files."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from slimkit import ConfigError, Task
from slimkit.measure.flops import count_macs
from slimkit.prune.sensitivity import (
    SensitivityReport,
    measure_sensitivity,
    plot_sensitivity,
    run_sensitivity,
)
from slimkit.prune.structured import StructuredPruning, StructuredPruningConfig

from .conftest import INPUTS, SELECTION, agreement, small_resnet

GRID = (0.25, 0.5, 0.75)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_curves_cover_every_prunable_group_with_measured_costs(curves_report):
    report = curves_report
    assert set(report.groups) == {
        "conv1",
        "layer1.0.conv1",
        "layer2.0.conv1",
        "layer3.0.conv1",
        "layer2.0.downsample.conv",
        "layer3.0.downsample.conv",
    }
    assert dict(report.skipped)["fc"].endswith("output layer: its outputs are the model's outputs")
    assert report.baseline_metric == 1.0  # agreement of the model with itself
    for g in report.groups.values():
        assert g.kept == sorted(g.kept, reverse=True) and g.kept[-1] >= 1
        assert g.macs_removed == sorted(g.macs_removed) and g.macs_removed[0] > 0
        assert all(0.0 <= m <= 1.0 for m in g.metrics)

    # a point is what pruning that group alone really removes, its neighbours' inputs included
    model = small_resnet()
    baseline = count_macs(model, INPUTS).total_macs
    config = StructuredPruningConfig(
        sparsity=0.5, round_to=1, scope={"include": ["layer1.0.conv1"]}
    )
    StructuredPruning(config, example_inputs=INPUTS).apply(model)
    removed = baseline - count_macs(model, INPUTS).total_macs
    group = report.groups["layer1.0.conv1"]
    assert group.macs_removed[report.sparsities.index(0.5)] == removed
    own = 4 * 8 * 9 * 64  # the 4 filters of layer1.0.conv1 alone: 8 inputs, 3x3, 8x8 outputs
    assert removed == 2 * own  # ... and as much again from layer1.0.conv2's inputs


def test_report_json_round_trip(curves_report, tmp_path):
    path = curves_report.save(tmp_path / "s.json")
    loaded = SensitivityReport.load(path)
    assert loaded == curves_report
    assert SensitivityReport.from_dict(json.loads(path.read_text())).to_dict() == (
        curves_report.to_dict()
    )
    assert "layer2.0.conv1" in str(loaded) and "16 channels" in str(loaded)
    curves = loaded.curves("params")
    assert curves["conv1"].costs == tuple(
        r / loaded.baseline_params for r in loaded.groups["conv1"].params_removed
    )


def test_cache_hit_miss_and_stale(tmp_path):
    model, cache = small_resnet(), tmp_path / "cache.json"

    def measure(evaluate, grid=GRID):
        return measure_sensitivity(
            model, INPUTS, evaluate, config=SELECTION, sparsities=grid, cache=cache, progress=False
        )

    miss = agreement(model)
    first = measure(miss)
    assert miss.calls > 1 and cache.exists()

    hit = agreement(model)
    assert measure(hit) == first and hit.calls == 0

    other_grid = agreement(model)
    measure(other_grid, grid=(0.5,))
    assert other_grid.calls > 0  # the grid is part of the key

    with torch.no_grad():
        model.conv1.weight.mul_(1.5)
    stale = agreement(model)
    again = measure(stale)
    assert stale.calls > 0 and again.fingerprint != first.fingerprint
    assert SensitivityReport.load(cache).fingerprint == again.fingerprint  # rewritten

    cache.write_text("{ not json")
    corrupt = agreement(model)
    measure(corrupt)
    assert corrupt.calls > 0


def test_plot_is_a_png_of_the_requested_size(curves_report, tmp_path):
    path = plot_sensitivity(curves_report, tmp_path / "plots" / "s.png")
    assert path.stat().st_size > 5000 and png_size(path) == (800, 500)
    small = plot_sensitivity(curves_report, tmp_path / "small.png", size=(4, 3), dpi=50)
    assert png_size(small) == (200, 150)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files


def test_run_sensitivity_writes_json_and_png_and_reuses_them(tmp_path):
    model = small_resnet()
    batches = [(torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(3)), None)]
    evaluations = []

    def metric(m, loader):
        evaluations.append(1)
        with torch.no_grad():
            return float(-m.eval()(loader[0][0]).var())

    task = Task(
        name="tiny",
        make_model=small_resnet,
        train_loader=lambda seed: batches,
        val_loader=batches,
        test_loader=batches,
        metric=metric,
        example_inputs=INPUTS,
        metric_name="negative variance",
    )
    files = run_sensitivity(
        task, model, tmp_path, config=SELECTION, sparsities=GRID, progress=False
    )
    assert files.json == tmp_path / "sensitivity.json" and files.png == tmp_path / "sensitivity.png"
    assert SensitivityReport.load(files.json) == files.report
    assert files.report.metric_name == "negative variance" and png_size(files.png) == (800, 500)
    count = len(evaluations)
    assert run_sensitivity(task, model, tmp_path, config=SELECTION, sparsities=GRID).report == (
        files.report
    )
    assert len(evaluations) == count  # the JSON doubles as the cache


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsities": (0.5, 1.0)}, r"sparsities must be in \(0, 1\)"),
        ({"sparsities": (0.5, 0.5)}, "sparsities must increase"),
        ({"sparsities": ()}, r"sparsities must be in \(0, 1\)"),
    ],
)
def test_bad_sensitivity_inputs(kwargs, message):
    with pytest.raises(ConfigError, match=message) as error:
        measure_sensitivity(small_resnet(), INPUTS, lambda m: 1.0, progress=False, **kwargs)
    assert "\n" not in str(error.value)


def test_bad_evaluate_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="must return a finite number, got 'high'"):
        measure_sensitivity(small_resnet(), INPUTS, lambda m: "high", progress=False)
    with pytest.raises(ConfigError, match="no sensitivity report here"):
        SensitivityReport.load(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(ConfigError, match="not a slimkit sensitivity report"):
        SensitivityReport.load(tmp_path / "other.json")
    (tmp_path / "short.json").write_text(
        json.dumps({"format": "slimkit.sensitivity", "version": 1, "sparsities": [0.5]})
    )
    with pytest.raises(ConfigError, match="malformed sensitivity report"):
        SensitivityReport.load(tmp_path / "short.json")

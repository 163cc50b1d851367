"""Quantization techniques in recipes: calibration, QAT init, the int8 ONNX form, ORT checks."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import numpy_helper
from rich.console import Console

from slimkit.cli import main
from slimkit.errors import ConfigError, ScopeError
from slimkit.recipe.runner import RunResult, run_recipe
from slimkit.recipe.schema import Recipe

BASE: dict[str, Any] = {
    "name": "quant",
    "seed": 0,
    "baseline": {"epochs": 2, "lr": 0.003},
    "export": {"latency_batch": 16},
}


def recipe(*stages: dict[str, Any], **overrides: Any) -> Recipe:
    return Recipe.from_dict({**BASE, **overrides, "stages": list(stages)})


def run(recipe: Recipe, folder: Path) -> tuple[RunResult, dict[str, Any]]:
    result = run_recipe(recipe, folder, progress=False, console=Console(file=io.StringIO()))
    return result, json.loads((folder / "metrics.json").read_text())


PRUNE = {
    "name": "prune",
    "train": {"epochs": 1},
    "techniques": [{"kind": "magnitude_prune", "sparsity": 0.5}],
}
INT8 = {
    "name": "int8",
    "train": {"epochs": 0},
    "calibration_batches": 4,
    "techniques": [{"kind": "static_quant", "observer": "minmax"}],
}


@pytest.fixture(scope="module")
def pruned_int8(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunResult, dict[str, Any]]:
    return run(recipe(PRUNE, INT8), tmp_path_factory.mktemp("pq") / "run")


def int8_weights(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n: a for n, a in arrays.items() if a.dtype == np.int8 and a.ndim >= 2}


def test_static_stage_exports_int8_that_ort_runs_with_integer_kernels(pruned_int8) -> None:
    result, metrics = pruned_int8
    onnx_info = metrics["artifacts"]["onnx"]
    assert onnx_info["form"] == "static_quant"
    ops = onnx_info["integer_ops"]
    assert ops.get("QLinearConv", 0) >= 9  # every conv of DigitsResNet
    assert ops.get("QGemm", 0) + ops.get("QLinearMatMul", 0) == 1  # the classifier
    assert ops.get("QLinearAdd", 0) == 3  # the residual adds
    # the deployed int8 model (ORT) scores like slimkit's fake-quant emulation of it
    torch_metric = metrics["stages"][-1]["test_metric"]
    assert onnx_info["test_accuracy"] == pytest.approx(torch_metric, abs=0.01)
    assert onnx_info["model_bytes"] < 0.4 * onnx_info["baseline_bytes"]
    # quantization and unstructured pruning change no multiply-accumulates
    from slimkit.measure.flops import count_macs
    from slimkit.models.cnn import DigitsResNet

    macs = count_macs(DigitsResNet(width=16), (torch.zeros(1, 1, 8, 8),)).total_macs
    assert [metrics["baseline"]["macs"]] + [s["macs"] for s in metrics["stages"]] == [macs] * 3
    assert "MACs per sample" in str(result)
    [summary] = metrics["stages"][1]["techniques"]
    assert summary["technique"] == "static_quant"
    assert summary["totals"]["calibrated"] is True


def test_pruned_weights_stay_zero_in_the_int8_model(pruned_int8) -> None:
    result, metrics = pruned_int8
    weights = int8_weights(Path(result.run_dir) / "model.onnx")
    assert len(weights) == 10
    codes = np.concatenate([w.ravel() for w in weights.values()])
    prune_summary = metrics["stages"][0]["techniques"][0]
    assert float((codes == 0).mean()) >= prune_summary["totals"]["sparsity"] - 1e-3


def test_latency_and_table_rows_for_both_batches(pruned_int8) -> None:
    result, metrics = pruned_int8
    latency = metrics["artifacts"]["onnx"]["latency"]
    assert latency["batch_sizes"] == [1, 16] and latency["threads"] == 1
    for name in ("baseline", "model"):
        assert set(latency["median_ms"][name]) == {"1", "16"}  # JSON keys
        assert all(v > 0 for v in latency["median_ms"][name].values())
    table = str(result)
    assert "ORT ms batch 16 (1 thr)" in table and "test accuracy (ORT)" in table
    [form_row] = [line for line in table.splitlines() if "ONNX form" in line]
    assert form_row.count("fp32") == 2 and "static_quant" in form_row


def test_qat_initialises_before_training_then_exports_int8(tmp_path: Path) -> None:
    qat = {
        "name": "qat",
        "train": {"epochs": 1, "lr": 0.0005},
        "calibration_batches": 2,
        "techniques": [{"kind": "qat", "wbits": 4, "abits": 8}],
    }
    _result, metrics = run(recipe(qat, INT8), tmp_path / "run")
    [summary] = metrics["stages"][0]["techniques"]
    assert summary["technique"] == "qat" and summary["totals"]["layers"] == 10
    # ranges came from the calibration batches (ptq init), not from LSQ's first-batch guess
    assert all(row["input_scale"] > 0 for row in summary["layers"])
    assert metrics["artifacts"]["onnx"]["form"] == "static_quant"
    assert metrics["stages"][0]["test_metric"] > 0.5
    assert metrics["artifacts"]["onnx"]["test_accuracy"] > 0.5


def test_dynamic_stage_exports_matmul_integer(tmp_path: Path) -> None:
    dynamic = {
        "name": "dynamic",
        "train": {"epochs": 0},
        "techniques": [{"kind": "dynamic_quant"}],
    }
    _result, metrics = run(recipe(dynamic, export={"latency": False}), tmp_path / "run")
    info = metrics["artifacts"]["onnx"]
    assert info["form"] == "dynamic_quant"
    assert info.get("integer_ops", {}).keys() & {"MatMulInteger", "DynamicQuantizeMatMul"}
    assert "latency" not in info
    assert info["test_accuracy"] == pytest.approx(metrics["stages"][0]["test_metric"], abs=0.02)


def test_plain_recipe_keeps_the_fp32_form(tmp_path: Path) -> None:
    _, metrics = run(
        recipe(PRUNE, export={"latency": False, "onnx_metric": False}), tmp_path / "run"
    )
    info = metrics["artifacts"]["onnx"]
    assert info["form"] == "fp32" and info["integer_ops"] == {}
    assert "test_accuracy" not in info


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("technique", "field"),
    [
        ({"kind": "static_quant", "bits": 9}, "stages.0.techniques.0.static_quant.bits"),
        ({"kind": "static_quant", "bits": 1}, "stages.0.techniques.0.static_quant.bits"),
        ({"kind": "qat", "wbits": 12}, "stages.0.techniques.0.qat.wbits"),
        ({"kind": "static_quant", "observer": "kl"}, "stages.0.techniques.0.static_quant.observer"),
        ({"kind": "static_quant", "fp32_layers": ["re:("]}, "stages.0.techniques.0.static_quant"),
    ],
)
def test_bad_quant_fields_name_the_field(technique: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        recipe({"name": "q", "techniques": [technique]})
    message = str(info.value)
    assert field in message and "\n" not in message


def test_zero_calibration_batches_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"stages\.0\.calibration_batches"):
        recipe({**INT8, "calibration_batches": 0})


def test_fp32_rule_matching_nothing_is_one_line_on_the_cli(tmp_path: Path, capsys) -> None:
    bad = {**INT8, "techniques": [{"kind": "static_quant", "fp32_layers": ["layer9.*"]}]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**BASE, "baseline": {"epochs": 0}, "stages": [bad]}))
    code = main(["compress", str(path), "--run-dir", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("slimkit: error:") and "layer9.*" in err and "matches no module" in err
    with pytest.raises(ScopeError):
        run(Recipe.from_dict({**BASE, "baseline": {"epochs": 0}, "stages": [bad]}), tmp_path / "r")


def test_every_stage_is_exported_and_timed_against_the_one_before(pruned_int8) -> None:
    _result, metrics = pruned_int8
    base, prune, int8 = metrics["baseline"], *metrics["stages"]
    assert [r["onnx"]["form"] for r in (base, prune, int8)] == ["fp32", "fp32", "static_quant"]
    assert [r["onnx"]["path"] for r in (base, prune, int8)] == [
        "onnx/baseline.onnx",
        "onnx/prune.onnx",
        "onnx/int8.onnx",
    ]
    assert "latency_ratio" not in base["onnx"]
    for stage in (prune, int8):
        assert set(stage["onnx"]["latency_ratio"]) == {"1", "16"}
        assert stage["gate"]["passed"] in (True, False)
    # unstructured sparsity does not change the dense fp32 file; int8 does
    assert prune["onnx"]["bytes"] == pytest.approx(base["onnx"]["bytes"], rel=0.01)
    assert int8["onnx"]["bytes"] < 0.4 * prune["onnx"]["bytes"]
    assert int8["onnx"]["integer_ops"]["QLinearConv"] >= 9

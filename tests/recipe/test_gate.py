"""The measured gate: pure violation rules, and a run that stops and keeps the best model."""

from __future__ import annotations

import filecmp
import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from slimkit.recipe.gate import gate_violations
from slimkit.recipe.runner import run_recipe
from slimkit.recipe.schema import Recipe

RULES = {"metric_name": "accuracy", "latency_batch": 64}


def test_a_stage_within_both_bounds_passes() -> None:
    assert (
        gate_violations(
            **RULES,
            baseline_metric=0.99,
            metric=0.985,
            max_metric_drop=0.01,
            latency_ratio=1.04,
            max_latency_ratio=1.05,
        )
        == []
    )


def test_a_drop_exactly_at_the_bound_passes_and_past_it_fails() -> None:
    at = dict(RULES, baseline_metric=0.75, metric=0.5, latency_ratio=None, max_latency_ratio=1.0)
    assert gate_violations(**at, max_metric_drop=0.25) == []
    [message] = gate_violations(**at, max_metric_drop=0.2)
    assert message == (
        "val accuracy 0.5000 is 0.2500 below the baseline 0.7500 (max_metric_drop 0.2000)"
    )


def test_a_slower_stage_fails_and_unmeasured_latency_is_not_judged() -> None:
    slow = dict(RULES, baseline_metric=0.9, metric=0.95, max_metric_drop=0.0)
    [message] = gate_violations(**slow, latency_ratio=1.31, max_latency_ratio=1.05)
    assert "latency at batch 64 is x1.310 the previous stage (max_latency_ratio 1.050)" in message
    assert gate_violations(**slow, latency_ratio=None, max_latency_ratio=1.05) == []
    assert gate_violations(**slow, latency_ratio=3.0, max_latency_ratio=None) == []


def test_no_bounds_never_fail() -> None:
    assert (
        gate_violations(
            **RULES,
            baseline_metric=1.0,
            metric=0.0,
            max_metric_drop=None,
            latency_ratio=10.0,
            max_latency_ratio=None,
        )
        == []
    )


def stages(sparsity: float) -> list[dict]:
    return [
        {
            "name": "light",
            "train": {"epochs": 1},
            "techniques": [{"kind": "magnitude_prune", "sparsity": 0.3}],
        },
        {
            "name": "heavy",
            "train": {"epochs": 0},
            "max_metric_drop": 0.02,  # a stage-level bound overrides the recipe's
            "techniques": [{"kind": "magnitude_prune", "sparsity": sparsity}],
        },
    ]


@pytest.mark.parametrize("on_violation", ["stop", "warn"])
def test_a_failing_stage_is_flagged_and_stop_keeps_the_last_passing_model(
    on_violation: str, tmp_path: Path
) -> None:
    recipe = Recipe.from_dict(
        {
            "name": "gated",
            "baseline": {"epochs": 2, "lr": 0.003},
            "gate": {
                "max_metric_drop": 0.5,
                "max_latency_ratio": None,
                "on_violation": on_violation,
            },
            "export": {"latency": False},
            "stages": stages(0.97),  # 97% one-shot without fine-tuning wrecks the model
        }
    )
    console = Console(file=io.StringIO(), width=200)
    run = run_recipe(recipe, tmp_path / "run", progress=False, console=console)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    light, heavy = metrics["stages"]
    assert light["gate"] == {"passed": True, "violations": []}
    assert heavy["gate"]["passed"] is False
    [violation] = heavy["gate"]["violations"]
    assert "(max_metric_drop 0.0200)" in violation
    assert run.violations == [("heavy", violation)]
    assert f"gate: heavy: {violation}" in str(run)
    assert "gate" in console.file.getvalue()
    kept = "light" if on_violation == "stop" else "heavy"
    assert metrics["kept"] == kept
    assert (metrics["stopped"] is not None) == (on_violation == "stop")
    # model.onnx is the kept stage's model
    assert filecmp.cmp(tmp_path / "run" / "model.onnx", tmp_path / "run" / "onnx" / f"{kept}.onnx")
    assert metrics["artifacts"]["onnx"]["test_accuracy"] == pytest.approx(
        metrics["stages"][0 if kept == "light" else 1]["onnx"]["test_metric"]
    )


def test_stage_named_baseline_is_rejected() -> None:
    from slimkit.errors import ConfigError

    with pytest.raises(ConfigError, match="'baseline' is reserved"):
        Recipe.from_dict({"stages": [{"name": "baseline"}]})

"""The shipped user-task example runs as documented: ``slimkit compress recipe.yaml`` from its
folder, importing the task module that sits next to the recipe."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from rich.console import Console

from slimkit.recipe.runner import run_recipe
from slimkit.recipe.schema import load_recipe
from slimkit.tasks.base import load_task

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_task"


def test_the_custom_task_example_compresses_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(EXAMPLE)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(EXAMPLE))])
    recipe = load_recipe("recipe.yaml")
    # the latency gate depends on the machine; judge only what is deterministic here
    recipe = recipe.model_copy(
        update={"gate": recipe.gate.model_copy(update={"max_latency_ratio": None})}
    )
    run = run_recipe(recipe, tmp_path / "run", progress=False, console=Console(file=io.StringIO()))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["task"] == "wine" and metrics["kept"] == "int8"
    assert metrics["baseline"]["test_metric"] >= 0.9
    prune, int8 = metrics["stages"]
    assert prune["techniques"][0]["totals"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert int8["onnx"]["form"] == "dynamic_quant"
    assert run.final.test_metric >= metrics["baseline"]["test_metric"] - 0.06
    assert int8["onnx"]["test_metric"] == pytest.approx(run.final.test_metric, abs=0.06)


def test_a_missing_task_module_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from slimkit.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "wine_task", raising=False)
    with pytest.raises(ConfigError, match=r"cannot import module 'wine_task'"):
        load_task("wine_task:make_task")

"""The runner end to end on a tiny digits recipe, run folders, and baseline checkpoints."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file, save_file
from torch import nn

from slimkit.errors import CheckpointError, ConfigError
from slimkit.recipe.runner import Runner, RunResult, resolve_run_dir, run_recipe
from slimkit.recipe.schema import Recipe, load_recipe
from slimkit.report.tensorboard import read_scalars
from slimkit.tasks.base import Task, load_task


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_recipe_text: str) -> RunResult:
    folder = tmp_path_factory.mktemp("tiny_run")
    recipe_path = folder / "tiny.yaml"
    recipe_path.write_text(tiny_recipe_text, encoding="utf-8")
    console = Console(file=io.StringIO())
    return run_recipe(load_recipe(recipe_path), folder / "run", progress=False, console=console)


@pytest.fixture(scope="module")
def metrics(run: RunResult) -> dict[str, Any]:
    return json.loads((Path(run.run_dir) / "metrics.json").read_text())


@pytest.fixture(scope="module")
def task() -> Task:
    return load_task("digits")


def test_metrics_json_holds_the_run(run: RunResult, metrics: dict[str, Any]) -> None:
    assert metrics == json.loads(json.dumps(run.to_dict()))
    assert (metrics["recipe"], metrics["task"], metrics["metric_name"]) == (
        "tiny",
        "digits",
        "accuracy",
    )
    assert metrics["baseline"]["steps"] == metrics["stages"][0]["steps"] == 20  # 1257 / 64
    assert [s["name"] for s in metrics["stages"]] == ["prune"]
    for result in (metrics["baseline"], metrics["stages"][0]):
        assert 0.0 <= result["test_metric"] <= 1.0
    assert metrics["baseline"]["sparsity"] == 0.0
    assert 0.4 < metrics["stages"][0]["sparsity"] < 0.5  # biases and norms stay dense


def test_pruned_weights_are_half_zero(run: RunResult, metrics: dict[str, Any]) -> None:
    [summary] = metrics["stages"][0]["techniques"]
    assert summary["technique"] == "magnitude_prune"
    assert summary["totals"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    layers = {row["module"]: row["sparsity"] for row in summary["layers"]}
    assert {"conv1", "layer2.0.downsample.conv", "fc"} <= set(layers)
    assert len(layers) == 10

    dense = load_file(str(Path(run.run_dir) / "model.safetensors"))
    for name, sparsity in layers.items():
        weight = dense[f"{name}.weight"]
        assert float((weight == 0).float().mean()) == pytest.approx(sparsity, abs=1e-3)
        assert sparsity == pytest.approx(0.5, abs=0.01)
    assert int((dense["fc.bias"] == 0).sum()) == 0


def test_export_files_exist(run: RunResult, metrics: dict[str, Any]) -> None:
    folder = Path(run.run_dir)
    for name in ("model.packed.safetensors", "model.safetensors", "model.onnx", "baseline.onnx"):
        assert (folder / name).stat().st_size > 0, name
    packed = metrics["artifacts"]["packed"]
    assert packed["bytes"] == (folder / "model.packed.safetensors").stat().st_size
    assert packed["ratio"] < 0.5  # half the weights gone and fp16 values
    assert metrics["artifacts"]["dense"]["bytes"] == (folder / "model.safetensors").stat().st_size
    onnx.checker.check_model(str(folder / "model.onnx"))
    assert not list(folder.glob(".*.tmp"))


def test_the_run_writes_a_self_contained_report(run: RunResult, metrics: dict[str, Any]) -> None:
    page = (Path(run.run_dir) / "report.html").read_text(encoding="utf-8")
    assert 'id="plot-metric-vs-size"' in page and 'id="plot-metric-vs-latency"' in page
    assert "prune" in page and "<svg" in page
    assert metrics["environment"]["cpu"] == json.loads(json.dumps(metrics["environment"]["cpu"]))
    assert metrics["environment"]["ort_threads"] == 1


def test_run_folder_keeps_the_validated_recipe(run: RunResult, tiny_recipe_text: str) -> None:
    saved = load_recipe(Path(run.run_dir) / "recipe.yaml")
    assert saved == Recipe.from_dict(yaml.safe_load(tiny_recipe_text))


def test_tensorboard_events_hold_sparsity(run: RunResult, metrics: dict[str, Any]) -> None:
    log_dir = Path(run.run_dir) / "tensorboard"
    assert list(log_dir.glob("events.out.tfevents.*"))
    scalars = read_scalars(log_dir)
    overall = scalars["magnitude_prune/sparsity/overall"]
    assert overall[0] == (0, pytest.approx(0.5, abs=0.01))
    assert overall[-1][1] == pytest.approx(0.5, abs=0.01)
    assert scalars["magnitude_prune/sparsity/target"][-1][1] == pytest.approx(0.5)
    assert "magnitude_prune/sparsity/fc" in scalars
    assert "baseline/loss" in scalars and "prune/loss" in scalars
    [(_, test_accuracy)] = scalars["accuracy/test"]
    assert test_accuracy == pytest.approx(metrics["stages"][0]["test_metric"], abs=1e-6)


# --- run folders -------------------------------------------------------------------------------


def test_explicit_run_dir_must_be_new_or_empty(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match=f"run folder {taken} already exists and is not empty"):
        resolve_run_dir("tiny", taken)
    assert (taken / "keep.txt").read_text() == "mine"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="already exists"):
        resolve_run_dir("tiny", a_file)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert resolve_run_dir("tiny", empty) == empty
    nested = tmp_path / "new" / "deeper"
    assert resolve_run_dir("tiny", nested) == nested and nested.is_dir()


def test_default_run_dir_gets_a_free_suffix(tmp_path: Path) -> None:
    first = resolve_run_dir("tiny", None, root=tmp_path)
    assert first == tmp_path / "tiny" and first.is_dir()
    assert resolve_run_dir("tiny", None, root=tmp_path) == first  # still empty: reused
    (first / "metrics.json").write_text("{}")
    second = resolve_run_dir("tiny", None, root=tmp_path)
    assert second == tmp_path / "tiny-2"
    (second / "metrics.json").write_text("{}")
    assert resolve_run_dir("tiny", None, root=tmp_path) == tmp_path / "tiny-3"
    assert (first / "metrics.json").read_text() == "{}"


# --- baseline checkpoints ----------------------------------------------------------------------


def baseline_from(checkpoint: Path, task: Task, tmp_path: Path) -> tuple[nn.Module, int]:
    recipe = Recipe.from_dict(
        {"baseline": {"checkpoint": str(checkpoint)}, "stages": [{"name": "s"}]}
    )
    runner = Runner(
        recipe, tmp_path, progress=False, task=task, console=Console(file=io.StringIO())
    )
    model, result = runner.baseline()
    return model, result.steps


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_corrupt_checkpoint_is_a_one_line_error(suffix: str, task: Task, tmp_path: Path) -> None:
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"this is not a checkpoint\n" * 20)
    with pytest.raises(CheckpointError) as info:
        baseline_from(path, task, tmp_path)
    message = str(info.value)
    assert message.startswith(f"cannot read checkpoint {path}: ")
    assert "\n" not in message
    assert isinstance(info.value, OSError)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_of_another_model_names_the_model(
    suffix: str, task: Task, tmp_path: Path
) -> None:
    path = tmp_path / f"linear{suffix}"
    state = nn.Linear(3, 2).state_dict()
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    with pytest.raises(CheckpointError) as info:
        baseline_from(path, task, tmp_path)
    message = str(info.value)
    assert message.startswith(f"checkpoint {path} does not fit DigitsResNet: ")
    assert "Missing key(s)" in message and "conv1.weight" in message
    assert "\n" not in message


def test_missing_and_non_tensor_checkpoints(task: Task, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        baseline_from(tmp_path / "missing.pt", task, tmp_path)
    listed = tmp_path / "list.pt"
    torch.save([1, 2, 3], listed)
    with pytest.raises(CheckpointError, match="does not hold a state_dict of tensors"):
        baseline_from(listed, task, tmp_path)


def test_a_good_checkpoint_is_loaded_instead_of_training(task: Task, tmp_path: Path) -> None:
    model = task.make_model()
    with torch.no_grad():
        model.fc.weight.fill_(0.25)
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded, steps = baseline_from(path, task, tmp_path)
    assert steps == 0
    assert bool((loaded.fc.weight == 0.25).all())


def test_cosine_lr_schedule_decays_to_zero_over_the_stage():
    from slimkit.recipe.runner import make_lr_schedule, make_optimizer
    from slimkit.recipe.schema import TrainBudget

    param = torch.nn.Parameter(torch.zeros(1))
    budget = TrainBudget(epochs=2, lr=0.1, lr_schedule="cosine")
    optimizer = make_optimizer([param], budget)
    decay = make_lr_schedule(optimizer, budget, steps_per_epoch=5)
    rates = []
    for _ in range(10):
        optimizer.step()
        decay.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(rates))
    constant = TrainBudget(epochs=2, lr=0.1)
    assert make_lr_schedule(make_optimizer([param], constant), constant, 5) is None

"""Structured pruning in recipes: FLOPs targets, sensitivity curves cached in the run folder,
iterative slicing with the optimizer rebuilt, and the learning rate kept on schedule."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from rich.console import Console
from safetensors.torch import load_file

from slimkit import load_pruned
from slimkit.recipe.runner import make_lr_schedule, make_optimizer, make_training, run_recipe
from slimkit.recipe.schema import Recipe, TrainBudget


def run(stage: dict[str, Any], folder: Path) -> dict[str, Any]:
    recipe = Recipe.from_dict(
        {
            "name": "structured",
            "baseline": {"epochs": 2, "lr": 0.003},
            "export": {"latency": False, "onnx_metric": False, "packed": False},
            "stages": [stage],
        }
    )
    run_recipe(recipe, folder, progress=False, console=Console(file=io.StringIO()))
    return json.loads((folder / "metrics.json").read_text())


def test_uniform_to_half_the_flops_shrinks_the_model_and_its_onnx(tmp_path: Path) -> None:
    metrics = run(
        {
            "name": "slim",
            "train": {"epochs": 1},
            "techniques": [
                {"kind": "structured_prune", "target": {"metric": "flops", "reduction": 0.5}}
            ],
        },
        tmp_path / "run",
    )
    base, [slim] = metrics["baseline"], metrics["stages"]
    assert slim["macs"] <= 0.5 * base["macs"]
    assert slim["params"] < 0.6 * base["params"]
    assert slim["onnx"]["bytes"] < 0.6 * base["onnx"]["bytes"]
    [summary] = slim["techniques"]
    assert summary["totals"]["macs_after"] == slim["macs"]
    assert summary["totals"]["macs_reduction"] >= 0.5


def test_sensitivity_allocation_measures_curves_once_into_the_stage_folder(tmp_path: Path) -> None:
    stage = {
        "name": "sens",
        "train": {"epochs": 0},
        "techniques": [
            {
                "kind": "structured_prune",
                "target": {"metric": "flops", "reduction": 0.4},
                "allocation": "sensitivity",
            }
        ],
    }
    metrics = run(stage, tmp_path / "run")
    folder = tmp_path / "run" / "stages" / "sens"
    report = json.loads((folder / "sensitivity.json").read_text())
    assert report["groups"] and len(report["sparsities"]) == 9  # reusable as sensitivity_file
    with Image.open(folder / "sensitivity.png") as image:
        assert image.size == (800, 500)
    [slim] = metrics["stages"]
    assert slim["macs"] <= 0.6 * metrics["baseline"]["macs"]
    # the saved curves drive the same allocation when given back as sensitivity_file
    stage["techniques"][0]["sensitivity_file"] = str(folder / "sensitivity.json")
    again = run(stage, tmp_path / "again")
    assert again["stages"][0]["macs"] == slim["macs"]
    assert not (tmp_path / "again" / "stages" / "sens" / "sensitivity.json").exists()


def test_iterative_slicing_rebuilds_the_optimizer_and_keeps_training(tmp_path: Path) -> None:
    metrics = run(
        {
            "name": "gradual",
            "train": {"epochs": 2, "lr": 0.002, "lr_schedule": "cosine"},
            "techniques": [
                {
                    "kind": "structured_prune",
                    "schedule": {"kind": "polynomial", "final": 0.5, "end": 20, "frequency": 10},
                }
            ],
        },
        tmp_path / "run",
    )
    [stage] = metrics["stages"]
    assert stage["params"] < 0.5 * metrics["baseline"]["params"]
    # it kept learning after the last slice (step 20 of 40): far above chance on 10 classes
    assert stage["test_metric"] > 0.5


def test_rebuilt_training_continues_the_cosine_schedule() -> None:
    budget = TrainBudget(epochs=2, lr=0.1, lr_schedule="cosine")
    param = torch.nn.Parameter(torch.zeros(1))
    reference = make_optimizer([param], budget)
    decay = make_lr_schedule(reference, budget, steps_per_epoch=5)
    rates = []
    for _ in range(10):
        reference.step()
        decay.step()
        rates.append(reference.param_groups[0]["lr"])
    model = torch.nn.Linear(1, 1)
    optimizer, resumed = make_training(model, budget, 5, None, steps_done=4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(rates[3])
    later = []
    for _ in range(6):
        optimizer.step()
        resumed.step()
        later.append(optimizer.param_groups[0]["lr"])
    assert later == pytest.approx(rates[4:], abs=1e-12)


def test_the_stage_writes_a_record_that_rebuilds_the_small_model(tmp_path: Path) -> None:
    from slimkit.models.cnn import DigitsResNet

    run(
        {
            "name": "slim",
            "train": {"epochs": 0},
            "techniques": [{"kind": "structured_prune", "sparsity": 0.5}],
        },
        tmp_path / "run",
    )
    rebuilt = load_pruned(DigitsResNet(width=16), tmp_path / "run" / "stages" / "slim" / "pruned")
    state = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert rebuilt.conv1.out_channels == 8
    for name, tensor in rebuilt.state_dict().items():
        assert torch.equal(tensor, state[name]), name

"""Distillation in recipes: the teacher comes from the run, adapters train, the loss is logged."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from slimkit.core.technique import RunContext
from slimkit.distill import Distillation, DistillationConfig
from slimkit.errors import CheckpointError
from slimkit.recipe.runner import run_recipe
from slimkit.recipe.schema import Recipe
from slimkit.report.tensorboard import read_scalars

KD = {
    "kind": "distill",
    "teacher": "baseline",
    "soft_label": {"loss": "kl", "temperature": 4.0, "weight": 1.0},
    "pairs": [{"student": "layer3", "teacher": "layer3", "loss": "hint", "weight": 0.5}],
    "task_weight": 0.5,
}


def test_prune_with_distillation_from_the_baseline(tmp_path: Path) -> None:
    recipe = Recipe.from_dict(
        {
            "name": "kd",
            "baseline": {"epochs": 2, "lr": 0.003},
            "export": {"latency": False, "onnx_metric": False},
            "stages": [
                {
                    "name": "prune_kd",
                    "train": {"epochs": 1},
                    "techniques": [{"kind": "magnitude_prune", "sparsity": 0.6}, KD],
                }
            ],
        }
    )
    run = run_recipe(recipe, tmp_path / "run", progress=False, console=Console(file=io.StringIO()))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    prune, kd = metrics["stages"][0]["techniques"]
    assert (prune["technique"], kd["technique"]) == ("magnitude_prune", "distill")
    assert kd["totals"]["task_weight"] == 0.5
    rows = {(row["student"], row["teacher"]): row for row in kd["layers"]}
    assert rows[("layer3", "layer3")]["weight"] == 0.5
    assert all(row["last_loss"] > 0 for row in rows.values())  # a pruned student differs
    scalars = read_scalars(tmp_path / "run" / "tensorboard")
    [(_, total)] = scalars["distill/total"][-1:]
    assert total == pytest.approx(kd["totals"]["loss"])
    assert run.final.sparsity > 0.5
    # finalize left a plain student: no hooks, and it exports without the teacher
    assert not any(m._forward_hooks for m in run_model(run).modules())


def run_model(run):
    from slimkit.models.cnn import DigitsResNet

    model = DigitsResNet(width=16)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(Path(run.run_dir) / "model.safetensors")))
    return model


def context(baseline: torch.nn.Module, stage_input: torch.nn.Module) -> RunContext:
    from slimkit.models.cnn import DigitsResNet

    return RunContext(
        baseline=baseline,
        stage_input=stage_input,
        make_model=lambda: DigitsResNet(width=4),
        forward=lambda model, batch: model(batch[0]),
    )


@pytest.mark.parametrize("choice", ["baseline", "previous_stage"])
def test_teacher_choice_is_a_frozen_copy(choice: str) -> None:
    from slimkit.models.cnn import DigitsResNet

    torch.manual_seed(0)
    baseline, stage_input = DigitsResNet(width=4), DigitsResNet(width=4)
    technique = Distillation(DistillationConfig(teacher=choice))
    technique.bind_run(context(baseline, stage_input))
    teacher = technique._require_teacher()
    source = baseline if choice == "baseline" else stage_input
    assert teacher is not source
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for a, b in zip(teacher.state_dict().values(), source.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert technique.task_loss_weight == 1.0


def test_teacher_checkpoint_path_is_loaded_and_a_bad_one_is_one_line(tmp_path: Path) -> None:
    from slimkit.models.cnn import DigitsResNet

    torch.manual_seed(3)
    saved = DigitsResNet(width=4)
    torch.save(saved.state_dict(), tmp_path / "teacher.pt")
    technique = Distillation(DistillationConfig(teacher=str(tmp_path / "teacher.pt")))
    technique.bind_run(context(DigitsResNet(width=4), DigitsResNet(width=4)))
    teacher = technique._require_teacher()
    assert torch.equal(teacher.conv1.weight, saved.conv1.weight)
    missing = Distillation(DistillationConfig(teacher=str(tmp_path / "nope.pt")))
    with pytest.raises(CheckpointError) as info:
        missing.bind_run(context(DigitsResNet(width=4), DigitsResNet(width=4)))
    assert "nope.pt" in str(info.value) and "\n" not in str(info.value)

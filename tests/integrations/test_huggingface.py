"""SlimkitTrainerCallback and SlimkitTrainer under a real transformers.Trainer (CPU, few steps)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

from transformers.modeling_outputs import SequenceClassifierOutput as ModelOutput  # noqa: E402

from slimkit.distill import (  # noqa: E402
    Distillation,
    DistillationConfig,
    FeaturePairConfig,
    SoftLabelConfig,
)
from slimkit.errors import StateError  # noqa: E402
from slimkit.integrations.huggingface import (  # noqa: E402
    STATE_FILE,
    SlimkitTrainer,
    SlimkitTrainerCallback,
    forward_batch,
)
from slimkit.prune import MagnitudePruningConfig  # noqa: E402
from slimkit.quant import QATConfig  # noqa: E402

STEPS = 6
GRADUAL = {"schedule": {"kind": "polynomial", "final": 0.75, "end": STEPS, "frequency": 2}}


class Classifier(nn.Module):
    """What the Trainer expects of a model: keyword inputs, a dict with ``loss`` and ``logits``
    (a ``ModelOutput``, as Hugging Face models return: distillation reads ``.logits``)."""

    def __init__(self, hidden: int = 32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 4))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        logits = self.net(x)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return ModelOutput(loss=loss, logits=logits)


def dataset(size: int = 24) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(size, 16, generator=generator)
    y = torch.randint(0, 4, (size,), generator=generator)
    return [{"x": x[i], "labels": y[i]} for i in range(size)]


def arguments(tmp_path, **overrides) -> transformers.TrainingArguments:
    options = {
        "output_dir": str(tmp_path),
        "max_steps": STEPS,
        "per_device_train_batch_size": 8,
        "learning_rate": 0.1,
        "lr_scheduler_type": "constant",
        "optim": "sgd",
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    options.update(overrides)
    return transformers.TrainingArguments(**options)


def masks(model: nn.Module) -> list[torch.Tensor]:
    return [
        m.parametrizations.weight[0].mask.clone()
        for m in model.modules()
        if parametrize.is_parametrized(m, "weight")
    ]


def prune_run(tmp_path, **overrides) -> tuple[Classifier, SlimkitTrainerCallback, object]:
    model = Classifier()
    callback = SlimkitTrainerCallback(MagnitudePruningConfig(**GRADUAL))
    trainer = transformers.Trainer(
        model=model,
        args=arguments(tmp_path, **overrides),
        train_dataset=dataset(),
        callbacks=[callback],
    )
    return model, callback, trainer


def test_gradual_pruning_reaches_the_target_and_logs_scalars(tmp_path) -> None:
    model, callback, trainer = prune_run(tmp_path)
    # applied at the end of Trainer.__init__, before the optimizer exists
    assert callback.compressor.model is model and parametrize.is_parametrized(model.net[0])
    trainer.train()
    compressor = callback.compressor
    assert compressor.step_count == trainer.state.global_step == STEPS
    assert compressor.techniques[0].layer_sparsity() == {"net.0": 0.75, "net.2": 0.75}
    logged = [h for h in trainer.state.log_history if "magnitude_prune/sparsity/overall" in h]
    assert len(logged) == STEPS  # once per step with logging_steps=1
    assert logged[-1]["magnitude_prune/sparsity/overall"] == pytest.approx(0.75)


def test_checkpoint_resume_restores_the_compressor(tmp_path) -> None:
    full, full_callback, trainer = prune_run(tmp_path / "full")
    trainer.train()

    _, _, trainer = prune_run(tmp_path / "run", save_strategy="steps", save_steps=3)
    trainer.train()
    folder = tmp_path / "run" / "checkpoint-3"
    saved = torch.load(folder / STATE_FILE, weights_only=True)
    assert saved["compressor"]["step_count"] == 3

    resumed, callback, trainer = prune_run(tmp_path / "run")
    trainer.train(resume_from_checkpoint=str(folder))
    assert callback.compressor.state_dict() == full_callback.compressor.state_dict()
    for got, want in zip(masks(resumed), masks(full), strict=True):
        assert torch.equal(got, want)


def test_distillation_loss_and_adapters_go_through_slimkit_trainer(tmp_path) -> None:
    teacher = Classifier(hidden=48, seed=7)
    config = DistillationConfig(
        soft_label=SoftLabelConfig(temperature=2.0),
        pairs=[FeaturePairConfig(student="net.1", teacher="net.1", loss="hint", weight=0.5)],
        task_weight=0.5,
    )
    kd = Distillation(config).bind(teacher, forward_batch)
    student = Classifier()
    data = dataset(8)  # one batch: each step sees the same 8 samples
    batch = {
        "x": torch.stack([d["x"] for d in data]),
        "labels": torch.stack([d["labels"] for d in data]),
    }
    # the expected first-step loss, computed by hand on copies (adapters are seeded)
    expected_kd = Distillation(config).bind(copy.deepcopy(teacher), forward_batch)
    expected_student = copy.deepcopy(student)
    expected_kd.apply(expected_student, example_inputs={"x": batch["x"][:1]})
    with torch.no_grad():
        outputs = expected_student(**batch)
        expected = float(0.5 * outputs["loss"] + expected_kd.loss(outputs, batch))

    trainer = SlimkitTrainer(
        model=student,
        args=arguments(tmp_path, max_steps=2),
        train_dataset=data,
        slimkit=SlimkitTrainerCallback(kd, example_inputs={"x": batch["x"][:1]}),
    )
    adapter = next(iter(kd.adapters.parameters()))
    before = adapter.detach().clone()
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected, rel=1e-4)
    assert any(adapter is p for g in trainer.optimizer.param_groups for p in g["params"])
    assert not torch.equal(before, adapter.detach())  # the adapter trained
    logged = trainer.state.log_history[0]  # SlimkitTrainer.log adds the technique scalars
    assert {"distill/soft_label/kl", "distill/hint/net.1:net.1", "distill/total"} <= set(logged)


def test_callback_added_after_the_optimizer_exists_is_an_error(tmp_path) -> None:
    model = Classifier()
    trainer = transformers.Trainer(model=model, args=arguments(tmp_path), train_dataset=dataset())
    trainer.add_callback(SlimkitTrainerCallback(QATConfig()))  # too late for on_init_end
    with pytest.raises(StateError, match=r"net\.0\.parametrizations\.weight\.0\.scale"):
        trainer.train()

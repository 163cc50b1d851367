"""Hugging Face ``transformers.Trainer``: ``SlimkitTrainerCallback`` and ``SlimkitTrainer``.

The public names are in :mod:`slimkit.integrations.transformers`: ``CompressionCallback`` (this
``SlimkitTrainerCallback``) and ``CompressionTrainer`` (this ``SlimkitTrainer``).

::

    from slimkit.integrations.huggingface import SlimkitTrainer, SlimkitTrainerCallback

    slimkit = SlimkitTrainerCallback([MagnitudePruningConfig(schedule=...)])
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[slimkit])
    trainer.train()

    # a technique that adds a loss (distillation) or owns parameters (adapters): SlimkitTrainer
    kd = Distillation(DistillationConfig(...)).bind(teacher, forward_batch)
    trainer = SlimkitTrainer(model=model, args=args, train_dataset=data, slimkit=[kd])

When the compressor is applied matters: the Trainer builds its optimizer from the model's
parameters inside ``train()``, before any ``on_train_begin``, and loads a checkpoint's weights
before that. So the callback applies the compressor in ``on_init_end``, at the end of
``Trainer.__init__``: the optimizer is then built from the compressed model (QAT scales included)
and a checkpoint of a compressed model loads into matching keys. You may also call
``compressor.apply(model)`` yourself before building the Trainer. A callback added later
(``trainer.add_callback``) applies in ``on_train_begin``, which is fine for magnitude pruning
(its parametrizations keep the weight's Parameter object, so the optimizer's references stay
valid) but not for techniques that create parameters: ``on_train_begin`` checks that the
optimizer holds every parameter ``apply`` created and the techniques' own, and raises a
StateError naming them otherwise.

Hooks: ``on_train_begin`` runs ``before_training`` on ``calibration_batches`` (fresh runs only)
or, when the Trainer resumes at step N, loads the compressor state saved in
``output_dir/checkpoint-N`` (``on_save`` writes ``slimkit_compressor.pt`` into every checkpoint
folder, on rank 0 only under DDP; for a checkpoint elsewhere call ``callback.load(folder)``
before ``train``);
``on_optimizer_step`` (after ``optimizer.step()``, before ``zero_grad``, once per update under
gradient accumulation) calls ``compressor.step()``. A step that replaced parameters (gradual
structured pruning) raises a StateError: use a one-shot schedule, which prunes in ``apply``.
``on_train_end`` runs ``after_training`` (calibration) on ``calibration_batches`` and
``finalize()`` when ``finalize_on_train_end=True``. ``on_log`` adds the technique scalars
(``{kind}/{tag}``) to the logs once per compressor step; loggers registered before the callback
(TensorBoard, W&B: the ``report_to`` ones) see them only through ``SlimkitTrainer``, which adds
them in ``Trainer.log`` before any callback runs.

``SlimkitTrainer`` adds the callback itself and three overrides: ``compute_loss`` returns
``task_loss_weight * task_loss + compressor.loss(outputs, inputs)`` in training (scaled like the
task loss under gradient accumulation), ``create_optimizer`` adds the techniques' own parameters
(distillation adapters) as a param group without weight decay, and ``log`` adds the scalars.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.errors import CheckpointError, StateError
from slimkit.integrations._common import (
    CompressorDriver,
    DriverAccess,
    Techniques,
    held_parameters,
    require,
    shorten,
)

require("transformers", "transformers", "slimkit.integrations.huggingface")
require("accelerate", "accelerate", "the Hugging Face Trainer")
from transformers import Trainer, TrainerCallback  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402

__all__ = ["STATE_FILE", "SlimkitTrainer", "SlimkitTrainerCallback", "forward_batch"]

STATE_FILE = "slimkit_compressor.pt"
"""The file ``on_save`` writes into each checkpoint folder: the compressor's state."""


def forward_batch(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on a Trainer batch: ``model(**batch)`` for a mapping, else ``model(batch)``.

    Bind it as a distillation teacher's forward: ``Distillation(cfg).bind(teacher, forward_batch)``.
    """
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


class SlimkitTrainerCallback(DriverAccess, TrainerCallback):
    """A ``TrainerCallback`` that applies, steps and finalizes a Compressor (module docstring).

    ``compressor``: a Compressor, a technique or technique config, a list of them, or a recipe
    (a Recipe or its YAML path) whose ``stage`` (name or index; needed when the recipe has several
    stages) gives the techniques. ``submodule``: dotted attribute path of the model to compress
    inside the Trainer's model.
    ``calibration_batches``: re-iterable batches for ``before_training``/``after_training``.
    ``example_inputs``: for techniques that trace the model (structured pruning, adapters).
    """

    def __init__(
        self,
        compressor: Techniques,
        *,
        submodule: str | None = None,
        calibration_batches: Iterable[Any] | None = None,
        example_inputs: Any = None,
        finalize_on_train_end: bool = False,
        stage: str | int | None = None,
    ) -> None:
        self.driver = CompressorDriver(
            compressor,
            submodule=submodule,
            calibration_batches=calibration_batches,
            example_inputs=example_inputs,
            finalize_at_end=finalize_on_train_end,
            stage=stage,
        )
        self._logged_step = -1

    # --- public (also compressor, model, parameters, training_loss from DriverAccess) ----------
    def log_scalars(self) -> dict[str, float]:
        """The technique scalars once per compressor step (empty if already logged this step)."""
        step = self.compressor.step_count
        if step == self._logged_step:
            return {}
        scalars = self.driver.scalars()
        self._logged_step = step
        return scalars

    def save(self, checkpoint_dir: str | os.PathLike) -> Path:
        """Write the compressor state into ``checkpoint_dir`` (as ``on_save`` does)."""
        path = Path(checkpoint_dir) / STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.driver.state_dict(), path)
        return path

    def load(self, checkpoint_dir: str | os.PathLike) -> None:
        """Restore the compressor state from ``checkpoint_dir``; the compressor must be applied
        (it is once the Trainer is built). Call before ``trainer.train(resume_from_checkpoint=...)``
        when the checkpoint is not in ``args.output_dir``."""
        path = Path(checkpoint_dir) / STATE_FILE
        if not path.is_file():
            raise CheckpointError(f"no slimkit compressor state at {path}")
        self.driver.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    # --- Trainer events -------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if model is not None:
            self.driver.attach(model)

    def on_train_begin(
        self, args, state, control, model: nn.Module | None = None, optimizer=None, **kwargs
    ):
        if model is None:
            raise StateError("the Trainer gave no model to on_train_begin")
        self.driver.attach(model)
        if optimizer is not None:
            missing = self.driver.missing_parameters([optimizer])
            if missing:
                raise StateError(
                    f"the Trainer's optimizer does not hold slimkit's trainable parameters "
                    f"({shorten(missing)}): pass the callback to Trainer(callbacks=[...]) or apply "
                    "the compressor before building the Trainer, and use SlimkitTrainer for "
                    "techniques' own parameters (adapters)"
                )
        compressor = self.compressor
        if state.global_step == compressor.step_count:
            if state.global_step == 0:
                self.driver.before_training()
        elif compressor.step_count == 0:  # resuming: find the state saved with the checkpoint
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if not (folder / STATE_FILE).is_file():
                raise StateError(
                    f"the Trainer resumes at step {state.global_step} but {folder / STATE_FILE} "
                    "does not exist; call callback.load(checkpoint_dir) before train()"
                )
            self.load(folder)
        if state.global_step != compressor.step_count:
            raise StateError(
                f"the compressor has taken {compressor.step_count} steps but the Trainer starts "
                f"at step {state.global_step}; use a new compressor for a new run"
            )

    def on_optimizer_step(self, args, state, control, **kwargs):
        compressor = self.compressor
        compressor.step()
        if compressor.parameters_replaced:
            raise StateError(
                f"structured pruning replaced parameters at step {compressor.step_count}, which "
                "the Trainer's optimizer cannot follow: use a one-shot schedule (prune in apply, "
                "then fine-tune)"
            )

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        if logs is None:
            return
        scalars = self.log_scalars()
        logs.update(scalars)
        if scalars and state.log_history:
            state.log_history[-1].update(scalars)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.compressor.model is not None:
            self.save(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        self.driver.end()


class SlimkitTrainer(Trainer):
    """A ``transformers.Trainer`` that adds the compressor's loss, parameters and scalars.

    ``slimkit``: a :class:`SlimkitTrainerCallback`, or what it takes (a Compressor, techniques
    or configs; the callback is then built with default options). It is added to the callbacks
    and kept as ``trainer.slimkit``. Every other argument is the Trainer's (pass them by keyword).
    """

    def __init__(self, *args: Any, slimkit: SlimkitTrainerCallback | Techniques, **kwargs: Any):
        callback = (
            slimkit
            if isinstance(slimkit, SlimkitTrainerCallback)
            else SlimkitTrainerCallback(slimkit)
        )
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(c is callback for c in callbacks):
            callbacks.append(callback)
        self.slimkit = callback
        super().__init__(*args, callbacks=callbacks, **kwargs)

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """The Trainer's optimizer, plus a param group for the techniques' own parameters."""
        built_here = self.optimizer is None
        optimizer = super().create_optimizer(*args, **kwargs)
        if built_here:
            held = held_parameters([optimizer])
            extra = [p for p in self.slimkit.parameters() if p.requires_grad and id(p) not in held]
            if extra:
                optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
        return optimizer

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        """The Trainer's loss; in training ``task_loss_weight * loss + compressor.loss(...)``."""
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(
            model, dict(inputs), return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        extra = self.slimkit.compressor.loss(outputs, inputs)
        if self._task_loss_scaled_for_ga(num_items_in_batch):
            extra = extra / self.current_gradient_accumulation_steps
        weight = self.slimkit.compressor.task_loss_weight
        loss = (loss if weight == 1.0 else weight * loss) + extra
        return (loss, outputs) if return_outputs else loss

    def _task_loss_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Whether the Trainer treats the task loss as already normalised over the accumulated
        batch (then it does not divide it by the accumulation steps, and the extra loss, a
        per-batch mean, is divided here); the Trainer's own rule."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return bool(
            (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
            or getattr(self, "compute_loss_func", None) is not None
        )

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the technique scalars (once per compressor step) before the loggers see ``logs``."""
        logs.update(self.slimkit.log_scalars())
        super().log(logs, *args, **kwargs)

"""Hugging Face ``transformers.Trainer``: ``CompressionCallback`` and ``CompressionTrainer``.

::

    from slimkit.integrations.transformers import CompressionCallback, CompressionTrainer

    slimkit = CompressionCallback([MagnitudePruningConfig(schedule=...)])
    # or one stage of a recipe: CompressionCallback("recipe.yaml", stage="prune")
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[slimkit])
    trainer.train()

    # a technique that changes the loss (distillation) or owns parameters (adapters):
    kd = Distillation(DistillationConfig(...)).bind(teacher, forward_batch)
    trainer = CompressionTrainer(model=model, args=args, train_dataset=data, slimkit=[kd])

``CompressionCallback`` applies the techniques when the Trainer is built (so its optimizer sees
QAT scales), calls ``compressor.step()`` after every optimizer step, and runs calibration and
(``finalize_on_train_end=True``) ``finalize`` at the end of training. ``CompressionTrainer`` is a
``Trainer`` that adds the callback itself, the techniques' loss in ``compute_loss``, their own
parameters to the optimizer and their scalars to the logs. The details are in
:mod:`slimkit.integrations.huggingface`, where these are defined (``SlimkitTrainerCallback`` and
``SlimkitTrainer``, the former names, keep working).

DDP: launch the script with ``torchrun --standalone --nproc_per_node N script.py`` (on CPU give
``TrainingArguments(use_cpu=True, ddp_backend="gloo")``). ``TrainingArguments`` joins the process
group torchrun describes; the callback applies the techniques to the plain model at the end of
``Trainer.__init__`` (every rank, its replica), and ``train()`` wraps the compressed model in
``DistributedDataParallel`` (through ``accelerate``). The techniques keep their decisions
identical across ranks (magnitude masks broadcast from rank 0, EMA/Taylor importances and QAT
range statistics averaged) through :mod:`slimkit.distributed`, which uses the process group the
Trainer created; only rank 0 writes the compressor state into checkpoints (the other ranks read
it from the shared ``output_dir`` when resuming). ``examples/hf_trainer_example.py`` runs this
way; ``tests/integrations/test_ddp_integrations.py`` checks that the ranks end bit-identical.

Needs ``transformers`` and ``accelerate`` (a one-line :class:`~slimkit.errors.ConfigError` names
what is missing).
"""

from __future__ import annotations

from slimkit.integrations.huggingface import (
    STATE_FILE,
    SlimkitTrainer,
    SlimkitTrainerCallback,
    forward_batch,
)

CompressionCallback = SlimkitTrainerCallback
"""A ``TrainerCallback`` that applies, steps and finalizes a Compressor."""

CompressionTrainer = SlimkitTrainer
"""A ``Trainer`` that also adds the compressor's loss, parameters and scalars (distillation)."""

__all__ = [
    "STATE_FILE",
    "CompressionCallback",
    "CompressionTrainer",
    "SlimkitTrainer",
    "SlimkitTrainerCallback",
    "forward_batch",
]

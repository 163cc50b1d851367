"""Drive a :class:`~slimkit.core.compressor.Compressor` from the training loops people already use.

* :mod:`slimkit.integrations.lightning`: ``CompressionCallback`` for PyTorch Lightning
  (``pytorch-lightning`` or ``lightning``; ``SlimkitCallback`` is its former name);
* :mod:`slimkit.integrations.transformers`: ``CompressionCallback`` and ``CompressionTrainer``
  (distillation-aware) for the Hugging Face ``transformers.Trainer`` (needs ``accelerate``);
  defined in :mod:`slimkit.integrations.huggingface` as ``SlimkitTrainerCallback`` and
  ``SlimkitTrainer``.

Each callback takes a Compressor, techniques or their configs, or a recipe (a ``Recipe`` or its
YAML path) and ``stage=`` (name or index) to use that stage's techniques. Under DDP use each
framework's own strategy; the techniques synchronise through :mod:`slimkit.distributed`.

Both are optional: import the submodule you need; a missing package is a one-line
:class:`~slimkit.errors.ConfigError` that names what to install. Nothing here is imported by
``import slimkit``.
"""

"""Drive a :class:`~slimkit.core.compressor.Compressor` from the training loops people already use.

* :mod:`slimkit.integrations.lightning`: ``SlimkitCallback`` for PyTorch Lightning
  (``pytorch-lightning`` or ``lightning``);
* :mod:`slimkit.integrations.huggingface`: ``SlimkitTrainerCallback`` and ``SlimkitTrainer`` for
  the Hugging Face ``transformers.Trainer`` (needs ``accelerate``).

Both are optional: import the submodule you need; a missing package is a one-line
:class:`~slimkit.errors.ConfigError` that names what to install. Nothing here is imported by
``import slimkit``.
"""

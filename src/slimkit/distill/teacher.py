"""Teachers: frozen models that are run but never trained.

:func:`freeze` puts a model in eval mode with ``requires_grad=False`` on every parameter;
:func:`frozen_copy` makes a frozen deep copy (self-distillation: the uncompressed model teaches its
pruned or quantized self; copy it *before* any technique is applied, so the copy carries no
slimkit state); :func:`load_teacher` loads a checkpoint of the same architecture into a fresh
model (``weights_only=True``, or safetensors) and freezes it.
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from slimkit.state_dicts import load_into, load_state_dict_file

__all__ = ["freeze", "frozen_copy", "load_teacher"]


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad=False`` on every parameter, in place; returns ``model``."""
    model.eval()
    model.requires_grad_(False)
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` (the model itself is untouched)."""
    return freeze(copy.deepcopy(model))


def load_teacher(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the state dict at ``path`` into ``model`` (strictly) and freeze it.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``. Errors are one-line :class:`CheckpointError`.
    """
    what = "teacher checkpoint"
    load_into(model, load_state_dict_file(path, what), str(path), what)
    return freeze(model)

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

import torch
from torch import nn

from slimkit.errors import CheckpointError

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
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"teacher checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign files raise many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read teacher checkpoint {path}: {first}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"teacher checkpoint {path} does not hold a state_dict of tensors")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(
            f"teacher checkpoint {path} does not fit {type(model).__name__}: {detail}"
        ) from None
    return freeze(model)

"""Reading state dicts from users' files: ``.safetensors`` or torch files (``weights_only``).

Every problem (a missing, corrupt or foreign file, a state dict that does not fit the model) is
one :class:`~slimkit.errors.CheckpointError` line naming the file; ``what`` prefixes it (e.g.
``"teacher checkpoint"``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from slimkit.errors import CheckpointError, first_line

__all__ = ["load_into", "load_state_dict_file"]


def load_state_dict_file(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or a torch file (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign files raise many types
        raise CheckpointError(f"cannot read {what} {path}: {first_line(exc)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{what} {path} does not hold a state_dict of tensors")
    return state


def load_into(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, what: str = "checkpoint"
) -> None:
    """``load_state_dict`` (strict) with a one-line :class:`CheckpointError` on any mismatch."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(
            f"{what} {source} does not fit {type(model).__name__}: {detail}"
        ) from None

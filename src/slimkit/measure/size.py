"""Sizes of models and checkpoints: bytes on disk, bytes in memory, parameter counts."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import safetensors.torch
import torch
from torch import nn
from torch.nn.utils import parametrize

from slimkit.errors import CheckpointError


def file_size(path: str | os.PathLike[str]) -> int:
    """Return the size of the file at ``path`` in bytes."""
    target = Path(path)
    if not target.is_file():
        raise CheckpointError(f"file not found: {target}")
    return target.stat().st_size


def state_dict_nbytes(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Sum of ``numel * element_size`` over the tensors (tied tensors count once per key)."""
    return sum(t.numel() * t.element_size() for t in state_dict.values())


def dense_checkpoint_bytes(module_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> int:
    """Bytes of a safetensors file of the state dict with every floating tensor cast to float32.

    Measured by serialising with ``safetensors.torch.save``; other tensors keep their dtype.
    """
    state_dict = (
        module_or_state_dict.state_dict()
        if isinstance(module_or_state_dict, nn.Module)
        else module_or_state_dict
    )
    dense = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        dense[name] = tensor.clone(memory_format=torch.contiguous_format)
    return len(safetensors.torch.save(dense))


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements; tied parameters count once.

    Pruned tensors (``torch.nn.utils.prune``'s ``weight_orig``) and parametrized tensors count
    as the tensor the module computes with, not the stored original.
    """
    return sum(t.numel() for t in _effective_parameters(module))


def count_nonzero_parameters(module: nn.Module) -> int:
    """Number of nonzero parameter elements, counted like :func:`count_parameters`."""
    with torch.no_grad():
        return sum(int(torch.count_nonzero(t)) for t in _effective_parameters(module))


def _effective_parameters(module: nn.Module) -> Iterator[torch.Tensor]:
    seen: set[int] = set()
    for owner in module.modules():
        if isinstance(owner, parametrize.ParametrizationList):
            continue  # counted through the module that owns the parametrization
        if parametrize.is_parametrized(owner):
            for name, plist in owner.parametrizations.items():
                originals = [p for p in plist.parameters(recurse=False)]
                if all(id(p) in seen for p in originals):
                    continue
                seen.update(id(p) for p in originals)
                yield getattr(owner, name)
        for name, param in owner.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            base = name.removesuffix("_orig")
            if base != name and f"{base}_mask" in owner._buffers:
                yield getattr(owner, base)
            else:
                yield param

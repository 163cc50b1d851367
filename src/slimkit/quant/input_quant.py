"""Input quantizers on forward pre-hooks: static PTQ for models ``torch.fx`` cannot trace.

``StaticQuantization`` in ``mode="hooks"`` gives each selected Conv/Linear a child
:class:`~slimkit.quant.fake.ActivationQuantizer` named ``input_quantizer`` and the forward
pre-hook :func:`quantize_input`, which replaces the module's first positional input by the
quantizer's output. No dataflow graph is needed, so Hugging Face transformers, models with Python
control flow, containers such as ``nn.Sequential`` and modules called several times (one
quantizer observes every call) all work; the model's own ``forward`` runs.

The quantizer is a submodule of the layer it feeds, so ``state_dict`` (keys
``<layer>.input_quantizer.scale``, ...), ``.to()``, ``deepcopy`` and ``torch.save`` carry it,
and the hook, a plain module-level function, finds it through the module it is called with.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimkit.errors import UnsupportedModuleError
from slimkit.quant.fake import ActivationQuantizer

__all__ = [
    "INPUT_QUANTIZER",
    "add_input_quantizer",
    "input_quantizer_of",
    "quantize_input",
    "remove_input_quantizers",
]

INPUT_QUANTIZER = "input_quantizer"


def input_quantizer_of(module: nn.Module) -> ActivationQuantizer | None:
    """The :class:`ActivationQuantizer` on ``module``'s input, if one was added."""
    quantizer = module._modules.get(INPUT_QUANTIZER)
    return quantizer if isinstance(quantizer, ActivationQuantizer) else None


def quantize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: ``module(x, ...)`` runs as ``module(module.input_quantizer(x), ...)``."""
    quantizer = input_quantizer_of(module)
    if quantizer is None:
        return args
    if not args or not isinstance(args[0], torch.Tensor):
        got = type(args[0]).__name__ if args else "no positional input"
        raise UnsupportedModuleError(
            f"static_quant (hooks): {type(module).__name__} must get its input tensor as "
            f"the first positional argument, got {got}"
        )
    return (quantizer(args[0]), *args[1:])


def add_input_quantizer(module: nn.Module, quantizer: ActivationQuantizer) -> None:
    """Quantize the first positional input of ``module`` with ``quantizer`` from now on."""
    module.add_module(INPUT_QUANTIZER, quantizer)
    module.register_forward_pre_hook(quantize_input)


def remove_input_quantizers(model: nn.Module) -> int:
    """Remove every input quantizer and :func:`quantize_input` hook under ``model``; return how
    many layers had one."""
    removed = 0
    for module in model.modules():
        hooks = module._forward_pre_hooks
        for handle_id in [i for i, hook in hooks.items() if hook is quantize_input]:
            del hooks[handle_id]
            module._forward_pre_hooks_with_kwargs.pop(handle_id, None)
        if input_quantizer_of(module) is not None:
            del module._modules[INPUT_QUANTIZER]
            removed += 1
    return removed

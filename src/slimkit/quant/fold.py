"""Fold BatchNorm into the convolution before it, as inference engines do before quantizing.

In eval mode ``bn(conv(x)) = gamma * (conv(x) - mean) / sqrt(var + eps) + beta`` is one affine map
per output channel, so it can be baked into the conv's weight and bias. Quantizing the folded
conv is what ONNX Runtime runs: folding after quantization would change the weight grid.

>>> conv, bn = nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2).eval()
>>> folded = fold_batchnorm(nn.Sequential(conv, bn))
>>> type(folded[1]).__name__
'Identity'
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from slimkit.core.scope import set_submodule
from slimkit.errors import UnsupportedModuleError

__all__ = ["find_conv_bn_pairs", "fold_batchnorm", "fold_batchnorm_", "fold_bn_into_conv"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_MATCHING_BN = dict(zip(CONV_TYPES, BN_TYPES, strict=True))


def fold_bn_into_conv(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_mean: torch.Tensor,
    bn_var: torch.Tensor,
    bn_eps: float,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv ``(weight, bias)`` that equal conv followed by eval-mode BatchNorm.

    ``weight`` has the output channels on axis 0 (``Conv{1,2,3}d``, any ``groups``); a missing
    ``bias``, ``bn_weight`` (gamma) or ``bn_bias`` (beta) counts as 0, 1 and 0. Computed in
    float64 and returned in ``weight``'s dtype:
    ``w' = w * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.

    >>> w, b = fold_bn_into_conv(torch.ones(1, 1, 1), None, torch.tensor([1.0]),
    ...                          torch.tensor([4.0]), 0.0, torch.tensor([2.0]), torch.tensor([3.0]))
    >>> w.flatten().tolist(), b.tolist()
    ([1.0], [2.0])
    """
    dtype = weight.dtype
    mean, var = bn_mean.detach().double(), bn_var.detach().double()
    gamma = torch.ones_like(mean) if bn_weight is None else bn_weight.detach().double()
    beta = torch.zeros_like(mean) if bn_bias is None else bn_bias.detach().double()
    b = torch.zeros_like(mean) if bias is None else bias.detach().double()
    factor = gamma / torch.sqrt(var + bn_eps)
    w = weight.detach().double() * factor.reshape(-1, *([1] * (weight.dim() - 1)))
    return w.to(dtype), ((b - mean) * factor + beta).to(dtype)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    kind = next((k for k in CONV_TYPES if isinstance(conv, k)), None)
    return (
        kind is not None
        and isinstance(bn, _MATCHING_BN[kind])
        and bn.running_mean is not None
        and bn.num_features == conv.out_channels
    )


def _pairs_by_tracing(model: nn.Module) -> list[tuple[str, str]]:
    graph = fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], BN_TYPES):
            continue
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv_name, bn_name = str(src.target), str(node.target)
        if calls[conv_name] == 1 and calls[bn_name] == 1:
            if _foldable(modules[conv_name], modules[bn_name]):
                pairs.append((conv_name, bn_name))
    return pairs


def _pairs_by_order(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (a_name, a), (b_name, b) in itertools.pairwise(children):
            if _foldable(a, b):
                dot = f"{prefix}." if prefix else ""
                pairs.append((dot + a_name, dot + b_name))
    return pairs


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv_name, bn_name)`` pairs where the BN's only input is a conv output used only by it.

    Found on a ``torch.fx`` trace of ``model``; when the model cannot be traced, consecutive
    children of ``nn.Sequential`` containers are used instead. BatchNorm without running
    statistics, or a module called more than once, is never paired.
    """
    try:
        return _pairs_by_tracing(model)
    except Exception:
        return _pairs_by_order(model)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every conv -> BatchNorm pair folded.

    Each folded BatchNorm is replaced by ``nn.Identity`` (names stay valid) and its conv gets a
    bias. Pairs are found by :func:`find_conv_bn_pairs`. The input model is not modified; see
    :func:`fold_batchnorm_` for the in-place variant.
    """
    return fold_batchnorm_(copy.deepcopy(model))


@torch.no_grad()
def fold_batchnorm_(model: nn.Module) -> nn.Module:
    """:func:`fold_batchnorm` in place: switch ``model`` to eval mode, fold, return ``model``.

    Raises :class:`UnsupportedModuleError` for a conv whose weight or bias is parametrized.
    """
    model.eval()
    for conv_name, bn_name in find_conv_bn_pairs(model):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if parametrize.is_parametrized(conv):
            raise UnsupportedModuleError(
                f"cannot fold {bn_name!r} into {conv_name!r}: the conv has parametrizations "
                f"({', '.join(conv.parametrizations)}); remove them first (in a recipe: "
                "quantize in a stage after the pruning stage)"
            )
        weight, bias = fold_bn_into_conv(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        grad = conv.weight.requires_grad
        conv.weight = nn.Parameter(weight, requires_grad=grad)
        conv.bias = nn.Parameter(bias, requires_grad=grad)
        set_submodule(model, bn_name, nn.Identity())
    return model

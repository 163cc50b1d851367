"""Small reference models for tests, examples and benchmarks, and a registry to build them by name.

>>> import torch
>>> model = make_model("digits_resnet", width=8)
>>> model(torch.zeros(2, 1, 8, 8)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from torch import nn

from slimkit.errors import ConfigError
from slimkit.models.cnn import (
    BasicBlock,
    Bottleneck,
    ConvBNAct,
    DigitsResNet,
    EfficientNet,
    InvertedResidual,
    MBConv,
    MobileNetV2,
    ResNet,
    SqueezeExcitation,
    efficientnet_tiny,
    mobilenetv2_tiny,
    resnet_tiny,
)
from slimkit.models.transformer import (
    MLP,
    Attention,
    BertClassifier,
    EncoderBlock,
    ViT,
    bert_tiny_encoder,
    vit_tiny,
)

MODELS: dict[str, Callable[..., nn.Module]] = {
    "digits_resnet": DigitsResNet,
    "resnet_tiny": resnet_tiny,
    "mobilenetv2_tiny": mobilenetv2_tiny,
    "efficientnet_tiny": efficientnet_tiny,
    "vit_tiny": vit_tiny,
    "bert_tiny": bert_tiny_encoder,
}
"""Model factories by name; add an entry to register your own."""


def make_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs``; unknown names raise ConfigError."""
    try:
        factory = MODELS[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), MODELS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown model {name!r}; expected one of {sorted(MODELS)}.{hint}"
        ) from None
    return factory(**kwargs)


__all__ = [
    "MLP",
    "MODELS",
    "Attention",
    "BasicBlock",
    "BertClassifier",
    "Bottleneck",
    "ConvBNAct",
    "DigitsResNet",
    "EfficientNet",
    "EncoderBlock",
    "InvertedResidual",
    "MBConv",
    "MobileNetV2",
    "ResNet",
    "SqueezeExcitation",
    "ViT",
    "bert_tiny_encoder",
    "efficientnet_tiny",
    "make_model",
    "mobilenetv2_tiny",
    "resnet_tiny",
    "vit_tiny",
]

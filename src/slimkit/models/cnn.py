"""Small reference CNNs (ResNet, MobileNetV2, EfficientNet) sized for 8x8 digits by default.

Plain ``torch.nn`` only; nothing here imports slimkit, so a compressed model still runs without it.
Every model takes NCHW float input. ``width`` is always an integer base width (the stem's output
channels); later stages are fixed multiples of it, so ``width=4`` gives a tiny model for tests.
Initialisation draws only from torch's global RNG, so ``torch.manual_seed`` makes it reproducible.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from slimkit.errors import ConfigError

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ConvBNAct",
    "DigitsResNet",
    "EfficientNet",
    "InvertedResidual",
    "MBConv",
    "MobileNetV2",
    "ResNet",
    "SqueezeExcitation",
    "efficientnet_tiny",
    "mobilenetv2_tiny",
    "resnet_tiny",
]


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs, unit BatchNorm, default Linear: the torchvision recipe."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class ConvBNAct(nn.Sequential):
    """``conv`` -> ``bn`` -> optional ``act``, with "same" padding for odd kernels."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: type[nn.Module] | None = nn.ReLU,
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["conv"] = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        )
        layers["bn"] = nn.BatchNorm2d(out_channels)
        if act is not None:
            layers["act"] = act()
        super().__init__(layers)


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    """The 1x1 conv + BN shortcut, or None when the identity already fits."""
    if stride == 1 and in_channels == out_channels:
        return None
    return ConvBNAct(in_channels, out_channels, kernel_size=1, stride=stride, act=None)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual add; ``expansion`` is 1."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = _downsample(in_channels, out_channels, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand to ``planes * 4``, residual add."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = _downsample(in_channels, out_channels, stride)
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class ResNet(nn.Module):
    """A ResNet for small images: 3x3 stem (no max-pool), stages, global average pool, ``fc``.

    Stage ``i`` has ``layers[i]`` blocks of ``widths[i]`` planes; every stage after the first
    starts with a stride-2 block. Module names follow torchvision (``conv1``, ``layer1``, ``fc``).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        widths: Sequence[int],
        *,
        in_channels: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths) or not layers:
            raise ConfigError(
                f"layers and widths must be non-empty and equally long, got {list(layers)} "
                f"and {list(widths)}"
            )
        for name, values in (("layers", layers), ("widths", widths)):
            for value in values:
                _check_positive(f"every entry of {name}", value)
        _check_positive("in_channels", in_channels)
        _check_positive("num_classes", num_classes)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        channels = widths[0]
        for index, (count, planes) in enumerate(zip(layers, widths, strict=True)):
            blocks = []
            for position in range(count):
                stride = 2 if index > 0 and position == 0 else 1
                blocks.append(block(channels, planes, stride))
                channels = planes * block.expansion
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for index in range(self.num_stages):
            x = getattr(self, f"layer{index + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class DigitsResNet(ResNet):
    """The default digits model: three BasicBlocks of ``width``, ``2*width`` and ``4*width``
    channels, the last two with stride 2 and a 1x1 downsample shortcut (8x8 -> 4x4 -> 2x2).

    About 78k parameters at ``width=16``; reaches ~97-99% test accuracy on digits in 3-5 epochs.
    """

    def __init__(self, width: int = 16, num_classes: int = 10, in_channels: int = 1) -> None:
        _check_positive("width", width)
        super().__init__(
            BasicBlock,
            layers=(1, 1, 1),
            widths=(width, 2 * width, 4 * width),
            in_channels=in_channels,
            num_classes=num_classes,
        )


def resnet_tiny(
    block: str = "basic",
    *,
    width: int = 16,
    layers: Sequence[int] = (1, 1, 1),
    in_channels: int = 1,
    num_classes: int = 10,
) -> ResNet:
    """A ResNet with ``len(layers)`` stages of ``width * 2**i`` planes.

    ``block`` is ``"basic"`` (:class:`BasicBlock`) or ``"bottleneck"`` (:class:`Bottleneck`).
    """
    blocks: dict[str, type[BasicBlock] | type[Bottleneck]] = {
        "basic": BasicBlock,
        "bottleneck": Bottleneck,
    }
    if block not in blocks:
        raise ConfigError(f"block must be one of {sorted(blocks)}, got {block!r}")
    _check_positive("width", width)
    widths = [width * 2**index for index in range(len(layers))]
    return ResNet(blocks[block], layers, widths, in_channels=in_channels, num_classes=num_classes)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 ``expand`` (skipped at ratio 1), 3x3 depthwise ``dw``, linear 1x1
    ``project``; residual add when ``stride == 1`` and channels match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        self.expand = (
            ConvBNAct(in_channels, hidden, kernel_size=1, act=nn.ReLU6)
            if expand_ratio != 1
            else None
        )
        self.dw = ConvBNAct(
            hidden, hidden, kernel_size=3, stride=stride, groups=hidden, act=nn.ReLU6
        )
        self.project = ConvBNAct(hidden, out_channels, kernel_size=1, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else self.expand(x)
        out = self.project(self.dw(out))
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2: ``features`` (stem, inverted residual stages, 1x1 head conv), ``classifier``.

    ``stages`` rows are ``(expand_ratio, out_channels, repeats, first_stride)``.
    """

    def __init__(
        self,
        stages: Sequence[tuple[int, int, int, int]],
        *,
        stem_channels: int,
        last_channels: int,
        in_channels: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        features: list[nn.Module] = [ConvBNAct(in_channels, stem_channels, 3, act=nn.ReLU6)]
        channels = stem_channels
        for expand_ratio, out_channels, repeats, first_stride in stages:
            for repeat in range(repeats):
                stride = first_stride if repeat == 0 else 1
                features.append(InvertedResidual(channels, out_channels, stride, expand_ratio))
                channels = out_channels
        features.append(ConvBNAct(channels, last_channels, kernel_size=1, act=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenetv2_tiny(
    *, width: int = 16, in_channels: int = 1, num_classes: int = 10
) -> MobileNetV2:
    """MobileNetV2 for 8x8 inputs: stages of ``width``, ``1.5*width`` (stride 2), ``2*width``."""
    _check_positive("width", width)
    mid = max(1, (3 * width) // 2)
    stages = [(1, width, 1, 1), (4, mid, 2, 2), (4, 2 * width, 2, 1)]
    return MobileNetV2(
        stages,
        stem_channels=width,
        last_channels=4 * width,
        in_channels=in_channels,
        num_classes=num_classes,
    )


class SqueezeExcitation(nn.Module):
    """Channel gate: global average pool, 1x1 ``fc1``, SiLU, 1x1 ``fc2``, sigmoid, multiply."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class MBConv(nn.Module):
    """EfficientNet block: 1x1 ``expand`` (skipped at ratio 1), depthwise ``dw``, ``se``, linear
    ``project``; SiLU activations; residual add when ``stride == 1`` and channels match."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        expand_ratio: int,
        kernel_size: int = 3,
        se_ratio: float = 0.25,
    ) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        self.expand = (
            ConvBNAct(in_channels, hidden, kernel_size=1, act=nn.SiLU)
            if expand_ratio != 1
            else None
        )
        self.dw = ConvBNAct(hidden, hidden, kernel_size, stride=stride, groups=hidden, act=nn.SiLU)
        self.se = SqueezeExcitation(hidden, max(1, int(in_channels * se_ratio)))
        self.project = ConvBNAct(hidden, out_channels, kernel_size=1, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else self.expand(x)
        out = self.project(self.se(self.dw(out)))
        return x + out if self.use_residual else out


class EfficientNet(nn.Module):
    """EfficientNet: ``features`` (stem, MBConv stages, 1x1 head conv), ``classifier``.

    ``stages`` rows are ``(expand_ratio, out_channels, repeats, first_stride, kernel_size)``.
    """

    def __init__(
        self,
        stages: Sequence[tuple[int, int, int, int, int]],
        *,
        stem_channels: int,
        last_channels: int,
        in_channels: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        features: list[nn.Module] = [ConvBNAct(in_channels, stem_channels, 3, act=nn.SiLU)]
        channels = stem_channels
        for expand_ratio, out_channels, repeats, first_stride, kernel_size in stages:
            for repeat in range(repeats):
                stride = first_stride if repeat == 0 else 1
                features.append(MBConv(channels, out_channels, stride, expand_ratio, kernel_size))
                channels = out_channels
        features.append(ConvBNAct(channels, last_channels, kernel_size=1, act=nn.SiLU))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def efficientnet_tiny(
    *, width: int = 16, in_channels: int = 1, num_classes: int = 10
) -> EfficientNet:
    """EfficientNet for 8x8 inputs: MBConv stages of ``width``, ``1.5*width`` (stride 2, 3x3)
    and ``2.5*width`` (5x5)."""
    _check_positive("width", width)
    mid = max(1, (3 * width) // 2)
    wide = max(1, (5 * width) // 2)
    stages = [(1, width, 1, 1, 3), (4, mid, 2, 2, 3), (4, wide, 1, 1, 5)]
    return EfficientNet(
        stages,
        stem_channels=width,
        last_channels=4 * width,
        in_channels=in_channels,
        num_classes=num_classes,
    )

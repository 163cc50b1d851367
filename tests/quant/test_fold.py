"""BatchNorm folding: the pure formula against torch, whole models, pair detection, fallbacks."""

from __future__ import annotations

import copy
import doctest

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from slimkit.errors import UnsupportedModuleError
from slimkit.models.cnn import DigitsResNet, mobilenetv2_tiny
from slimkit.quant import fold
from slimkit.quant.fold import (
    find_conv_bn_pairs,
    fold_batchnorm,
    fold_batchnorm_,
    fold_bn_into_conv,
)


def _random_bn(bn: nn.Module) -> nn.Module:
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3.0)
        if bn.affine:
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
    return bn.eval()


@pytest.mark.parametrize(
    ("conv", "bn", "shape"),
    [
        (nn.Conv1d(3, 4, 3, bias=True), nn.BatchNorm1d(4), (2, 3, 9)),
        (nn.Conv2d(4, 6, 3, groups=2, bias=False), nn.BatchNorm2d(6), (2, 4, 7, 7)),
        (nn.Conv2d(5, 5, 3, groups=5), nn.BatchNorm2d(5, affine=False), (2, 5, 6, 6)),
        (nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3, eps=1e-3), (1, 2, 4, 4, 4)),
    ],
)
def test_fold_bn_into_conv_matches_conv_then_bn(conv, bn, shape):
    torch.manual_seed(0)
    bn = _random_bn(bn)
    x = torch.randn(shape)
    w, b = fold_bn_into_conv(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    assert w.shape == conv.weight.shape and b.shape == (conv.out_channels,)
    assert w.dtype == conv.weight.dtype == b.dtype
    with torch.no_grad():
        want = bn(conv(x))
        got = conv._conv_forward(x, w, b)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _with_real_statistics(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.rand(32, 1, 8, 8) * 2)
    return model.eval()


@pytest.mark.parametrize("factory", [DigitsResNet, mobilenetv2_tiny])
def test_fold_batchnorm_keeps_outputs(factory):
    model = _with_real_statistics(factory())
    reference = copy.deepcopy(model)
    folded = fold_batchnorm(model)
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=0)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(find_conv_bn_pairs(model)) == len(bns) > 0
    assert all(isinstance(folded.get_submodule(n), nn.Identity) for n in bns)
    # the input is untouched
    for (name, a), (_, b) in zip(
        model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_fold_batchnorm_in_place_and_copy_differ_only_in_identity():
    model = _with_real_statistics(DigitsResNet(width=4))
    copied = fold_batchnorm(model)
    same = fold_batchnorm_(model)
    assert same is model and not model.training
    assert model.conv1.bias is not None and isinstance(model.bn1, nn.Identity)
    torch.testing.assert_close(model.conv1.weight, copied.conv1.weight)


class _Shared(nn.Module):
    """conv output used twice (BN and a skip): folding would change the skip, so no pair."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm2d(2)
        self.conv2 = nn.Conv2d(2, 2, 1)
        self.bn2 = nn.BatchNorm2d(2)
        self.bn_no_stats = nn.BatchNorm2d(2, track_running_stats=False)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y + self.bn_no_stats(self.conv2(x)) + self.bn2(x)


def test_pairs_need_a_single_use_conv_output_and_running_stats():
    model = _Shared()
    assert find_conv_bn_pairs(model) == []
    folded = fold_batchnorm(model)
    assert isinstance(folded.bn, nn.BatchNorm2d) and isinstance(folded.bn_no_stats, nn.BatchNorm2d)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU())
        self.head = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1))  # BN first: no pair

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow defeats torch.fx
            x = x * 2
        return self.head(self.body(x))


def test_untraceable_models_fall_back_to_sequential_order():
    model = _Untraceable()
    _random_bn(model.body[1])
    _random_bn(model.head[0])
    assert find_conv_bn_pairs(model) == [("body.0", "body.1")]
    folded = fold_batchnorm(model)
    x = torch.rand(2, 1, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), atol=1e-5, rtol=0)
    assert isinstance(folded.body[1], nn.Identity) and isinstance(folded.head[0], nn.BatchNorm2d)


def test_parametrized_conv_is_refused_by_name():
    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    parametrize.register_parametrization(model[0], "weight", Double())
    with pytest.raises(UnsupportedModuleError, match=r"'1' into '0'.*parametrizations"):
        fold_batchnorm(model)


def test_docstring_examples():
    assert doctest.testmod(fold).failed == 0

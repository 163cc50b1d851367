"""Tests for the reference models: shapes, seeding, sizes, ONNX parity and block structure."""

from __future__ import annotations

import doctest
import io
import sys
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import slimkit.models
from slimkit.errors import ConfigError
from slimkit.models import (
    MODELS,
    Attention,
    BasicBlock,
    BertClassifier,
    Bottleneck,
    DigitsResNet,
    InvertedResidual,
    MBConv,
    SqueezeExcitation,
    bert_tiny_encoder,
    make_model,
    resnet_tiny,
    vit_tiny,
)

IMAGE_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "digits_resnet": ("digits_resnet", {"width": 4}),
    "resnet_basic": ("resnet_tiny", {"block": "basic", "width": 4}),
    "resnet_bottleneck": ("resnet_tiny", {"block": "bottleneck", "width": 4}),
    "mobilenetv2": ("mobilenetv2_tiny", {"width": 4}),
    "efficientnet": ("efficientnet_tiny", {"width": 4}),
    "vit": ("vit_tiny", {"width": 16, "num_heads": 2, "depth": 1}),
}
BERT_TINY = {
    "vocab_size": 50,
    "hidden_size": 16,
    "num_layers": 1,
    "num_heads": 2,
    "intermediate_size": 32,
    "max_position": 32,
}


def _build(case: str, seed: int = 0, **extra: Any) -> nn.Module:
    name, kwargs = IMAGE_CASES[case]
    torch.manual_seed(seed)
    return make_model(name, **kwargs, **extra)


def _warm_batchnorm(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Give BatchNorm real running statistics so an eval-mode model is not near-constant."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(example)
    return model.eval()


def _onnx_session(model: nn.Module, args: tuple[torch.Tensor, ...], names: list[str], axes: dict):
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=names,
            output_names=["logits"],
            dynamic_axes={**axes, "logits": {0: "batch"}},
        )
    return ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])


def _count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_image_model_forward_shape_and_channels(case: str) -> None:
    model = _build(case, num_classes=7, in_channels=3)
    assert model(torch.rand(5, 3, 8, 8)).shape == (5, 7)


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_image_model_init_is_seeded(case: str) -> None:
    first, again, other = _build(case, seed=1), _build(case, seed=1), _build(case, seed=2)
    pairs = list(zip(first.state_dict().values(), again.state_dict().values(), strict=True))
    assert all(torch.equal(a, b) for a, b in pairs)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), other.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize(
    ("name", "kwargs", "low", "high"),
    [
        ("digits_resnet", {}, 60_000, 100_000),
        ("resnet_tiny", {"block": "basic"}, 60_000, 100_000),
        ("resnet_tiny", {"block": "bottleneck"}, 100_000, 250_000),
        ("mobilenetv2_tiny", {}, 15_000, 60_000),
        ("efficientnet_tiny", {}, 15_000, 60_000),
        ("vit_tiny", {}, 40_000, 100_000),
        ("bert_tiny", {}, 100_000, 200_000),
    ],
)
def test_default_parameter_counts(name: str, kwargs: dict[str, Any], low: int, high: int) -> None:
    assert low <= _count(make_model(name, **kwargs)) <= high


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_image_model_onnx_matches_torch(case: str) -> None:
    torch.manual_seed(0)
    model = _warm_batchnorm(_build(case), torch.rand(16, 1, 8, 8))
    session = _onnx_session(model, (torch.rand(2, 1, 8, 8),), ["x"], {"x": {0: "batch"}})
    for batch in (1, 4):
        x = torch.rand(batch, 1, 8, 8)
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = session.run(None, {"x": x.numpy()})
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert not np.allclose(expected[0], expected[1])  # the model really depends on its input


def _bert(seed: int = 0, **extra: Any) -> BertClassifier:
    torch.manual_seed(seed)
    return bert_tiny_encoder(**{**BERT_TINY, **extra})


def test_bert_classifier_shape_seed_and_padding_mask() -> None:
    model = _bert(num_classes=3).eval()
    assert isinstance(model, BertClassifier)
    assert model.encoder.config._attn_implementation == "eager"
    ids = torch.randint(0, 50, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[:, 6:] = 0
    with torch.no_grad():
        logits = model(ids, mask)
        altered = ids.clone()
        altered[:, 6:] = (altered[:, 6:] + 1) % 50
        assert logits.shape == (2, 3)
        torch.testing.assert_close(model(altered, mask), logits)  # padding is ignored
        assert model(ids).shape == (2, 3)
    again = _bert(num_classes=3).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids, mask), logits, rtol=0, atol=0)


def test_bert_onnx_matches_torch() -> None:
    model = _bert().eval()
    ids = torch.randint(0, 50, (2, 12))
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    session = _onnx_session(
        model, (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"], axes
    )
    for batch, seq in ((1, 12), (4, 12), (4, 7)):
        ids = torch.randint(0, 50, (batch, seq))
        mask = torch.ones_like(ids)
        mask[-1, seq // 2 :] = 0
        with torch.no_grad():
            expected = model(ids, mask).numpy()
        (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_bert_without_transformers_raises_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ConfigError, match="pip install transformers"):
        bert_tiny_encoder()


def test_digits_resnet_has_strided_blocks_with_1x1_downsample() -> None:
    model = DigitsResNet(width=4)
    blocks = [module for module in model.modules() if isinstance(module, BasicBlock)]
    assert len(blocks) == 3
    assert blocks[0].downsample is None
    for block in blocks[1:]:
        assert block.conv1.stride == (2, 2)
        assert block.downsample.conv.kernel_size == (1, 1)
        assert block.downsample.conv.stride == (2, 2)


def test_basic_block_adds_the_identity() -> None:
    block = BasicBlock(4, 4).eval()
    nn.init.zeros_(block.bn2.weight)  # the residual branch now outputs exactly zero
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(block(x), torch.relu(x))


def test_resnet_bottleneck_structure() -> None:
    model = resnet_tiny("bottleneck", width=4, layers=(2, 1))
    blocks = [module for module in model.modules() if isinstance(module, Bottleneck)]
    assert len(blocks) == 3
    first = blocks[0]
    assert first.conv1.kernel_size == (1, 1) and first.conv3.kernel_size == (1, 1)
    assert first.downsample.conv.kernel_size == (1, 1)  # 4 -> 16 channels at stride 1
    assert first.conv3.out_channels == 4 * Bottleneck.expansion
    assert blocks[1].downsample is None
    assert blocks[2].conv2.stride == (2, 2) and blocks[2].downsample.conv.stride == (2, 2)


def test_mobilenetv2_has_depthwise_inverted_residuals() -> None:
    model = make_model("mobilenetv2_tiny", width=4)
    blocks = [module for module in model.modules() if isinstance(module, InvertedResidual)]
    assert any(block.use_residual for block in blocks)
    assert any(block.dw.conv.stride == (2, 2) and not block.use_residual for block in blocks)
    for block in blocks:
        conv = block.dw.conv
        assert conv.groups == conv.in_channels == conv.out_channels
        assert isinstance(block.dw.act, nn.ReLU6)
        assert not hasattr(block.project, "act")  # linear bottleneck
    assert any(block.expand is not None for block in blocks)


def test_efficientnet_has_se_and_swish() -> None:
    model = make_model("efficientnet_tiny", width=4)
    blocks = [module for module in model.modules() if isinstance(module, MBConv)]
    assert blocks and all(isinstance(block.se, SqueezeExcitation) for block in blocks)
    assert all(block.dw.conv.groups == block.dw.conv.in_channels for block in blocks)
    assert any(block.dw.conv.kernel_size == (5, 5) for block in blocks)
    assert any(isinstance(module, nn.SiLU) for module in model.modules())
    se = blocks[0].se
    x = torch.rand(2, se.fc1.in_channels, 4, 4)
    gate = torch.sigmoid(se.fc2(torch.nn.functional.silu(se.fc1(x.mean((2, 3), keepdim=True)))))
    torch.testing.assert_close(se(x), x * gate)


def test_vit_uses_explicit_projections() -> None:
    model = vit_tiny(width=16, num_heads=2, depth=2)
    assert not any(isinstance(module, nn.MultiheadAttention) for module in model.modules())
    attentions = [module for module in model.modules() if isinstance(module, Attention)]
    assert len(attentions) == 2
    assert all((a.num_heads, a.head_dim) == (2, 8) for a in attentions)
    assert model.pos_embed.shape == (1, 1 + 16, 16)  # cls + (8 / 2) ** 2 patches


def test_attention_heads_can_be_pruned_by_slicing() -> None:
    torch.manual_seed(0)
    attention = Attention(dim=16, num_heads=4)
    keep = torch.arange(attention.head_dim, 4 * attention.head_dim)  # drop head 0
    pruned = Attention(dim=16, num_heads=3, head_dim=attention.head_dim)
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(pruned, name).weight.copy_(getattr(attention, name).weight[keep])
            getattr(pruned, name).bias.copy_(getattr(attention, name).bias[keep])
        pruned.out_proj.weight.copy_(attention.out_proj.weight[:, keep])
        pruned.out_proj.bias.copy_(attention.out_proj.bias)
        attention.out_proj.weight[:, : attention.head_dim] = 0  # silence head 0 in the original
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(pruned(x), attention(x))


@pytest.mark.parametrize(
    ("factory", "kwargs"),
    [
        (resnet_tiny, {"block": "wide"}),
        (resnet_tiny, {"width": 0}),
        (DigitsResNet, {"width": 2.5}),
        (vit_tiny, {"width": 10, "num_heads": 4}),
        (vit_tiny, {"patch_size": 3}),
        (bert_tiny_encoder, {"hidden_size": 10, "num_heads": 4}),
    ],
)
def test_bad_arguments_raise_config_error(factory: Callable[..., nn.Module], kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        factory(**kwargs)


def test_make_model_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'vit_tiny'") as info:
        make_model("vit_tiyn")
    assert all(name in str(info.value) for name in MODELS)
    assert isinstance(info.value, ValueError)


def test_registry_entries_build_modules() -> None:
    assert set(MODELS) == {
        "digits_resnet",
        "resnet_tiny",
        "mobilenetv2_tiny",
        "efficientnet_tiny",
        "vit_tiny",
        "bert_tiny",
    }
    assert isinstance(make_model("bert_tiny", **BERT_TINY), BertClassifier)


def test_docstring_examples_run() -> None:
    result = doctest.testmod(slimkit.models, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0

"""Static PTQ in ``mode="hooks"``: input quantizers on pre-hooks for models torch.fx cannot trace.

Asserted: config validation, one ``input_quantizer`` per selected layer (containers, control
flow and shared modules included), calibrated qparams equal the observed range, the emulation
is exactly "fake-quantize the input and the weight, then the float layer", state dict /
deepcopy / strip round trips, and one-line errors.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from slimkit.core.scope import Scope
from slimkit.errors import ConfigError, StateError, UnsupportedModuleError
from slimkit.quant.affine import fake_quantize
from slimkit.quant.fake import ActivationQuantizer, quantizer_of
from slimkit.quant.input_quant import input_quantizer_of, quantize_input, remove_input_quantizers
from slimkit.quant.ptq import (
    StaticQuantization,
    StaticQuantizationConfig,
    quantize_static,
    strip_quantization,
)

HOOKS = StaticQuantizationConfig(mode="hooks")


class Branchy(nn.Module):
    """Data-dependent control flow (torch.fx cannot trace it) and a module called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 16)
        self.head = nn.Sequential(nn.GELU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(x))
        if h.sum() > 0:
            h = h + self.fc2(h)
        return self.head(self.fc2(h))


def _batches(n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 6, generator=generator) for _ in range(n)]


def test_config_mode_round_trip():
    assert StaticQuantizationConfig().mode == "graph"
    assert StaticQuantizationConfig.from_dict(HOOKS.to_dict()) == HOOKS
    with pytest.raises(ConfigError, match="mode"):
        StaticQuantizationConfig(mode="fx")


def test_untraceable_model_gets_one_input_quantizer_per_layer():
    torch.manual_seed(0)
    model = Branchy().eval()
    with pytest.raises(UnsupportedModuleError, match="mode='hooks'"):
        StaticQuantization().apply(copy.deepcopy(model))  # graph mode names the way out
    technique = StaticQuantization(HOOKS)
    technique.apply(model)
    layers = ["fc1", "fc2", "head.1"]
    assert technique.selection.names == layers
    for name in layers:
        assert isinstance(input_quantizer_of(model.get_submodule(name)), ActivationQuantizer)
    assert not hasattr(model, "activation_quantizers")
    batches = _batches()
    technique.calibrate(model, batches)
    # fc1 sees the raw batches: the minmax range gives its qparams exactly
    lo = min(float(b.min()) for b in batches)
    hi = max(float(b.max()) for b in batches)
    q = model.fc1.input_quantizer
    assert float(q.scale) == pytest.approx((hi - lo) / 255, rel=1e-6)
    assert int(q.zero_point) == round(-lo / ((hi - lo) / 255))
    summary = technique.summary()
    assert [row[0] for row in summary.rows] == layers
    assert summary.rows[0][3] == pytest.approx(float(q.scale)) and summary.totals["calibrated"]


@torch.no_grad()
def test_emulation_is_fake_quantized_input_and_weight_through_the_float_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    quantized = quantize_static(model, _batches(), HOOKS)  # nn.Sequential keeps working
    x = _batches(1, seed=5)[0]
    h = x
    for index in (0, 2):
        layer = quantized[index]
        q, wq = layer.input_quantizer, quantizer_of(layer, "weight")
        x_q = fake_quantize(h, q.scale, q.zero_point, q.spec)
        w = layer.parametrizations.weight.original
        w_q = fake_quantize(w, wq.scale, wq.zero_point, wq.spec, axis=0)
        h = F.linear(x_q, w_q, layer.bias)  # the bias is already on its int32 grid
        h = torch.relu(h) if index == 0 else h
    torch.testing.assert_close(quantized(x), h, atol=0, rtol=0)
    error = (quantized(x) - model(x)).abs().max() / model(x).abs().max()
    assert 1e-4 < error < 0.03  # really quantized, and close


@torch.no_grad()
def test_state_dict_deepcopy_and_strip_round_trip():
    torch.manual_seed(0)
    model = Branchy().eval()
    quantized = quantize_static(model, _batches(), HOOKS)
    x = _batches(1, seed=9)[0]
    want = quantized(x)
    keys = set(quantized.state_dict())
    assert {"fc1.input_quantizer.scale", "head.1.input_quantizer.zero_point"} <= keys

    fresh = Branchy().eval()
    StaticQuantization(HOOKS).apply(fresh)
    fresh.load_state_dict(quantized.state_dict())
    torch.testing.assert_close(fresh(x), want, atol=0, rtol=0)

    copied = copy.deepcopy(quantized)
    copied.fc1.input_quantizer.enabled = False  # the copy's hook uses the copy's quantizer
    assert not torch.equal(copied(x), want)
    torch.testing.assert_close(quantized(x), want, atol=0, rtol=0)

    stripped = strip_quantization(copy.deepcopy(quantized))
    torch.testing.assert_close(stripped(x), model(x), atol=1e-6, rtol=0)
    assert all(input_quantizer_of(m) is None for m in stripped.modules())
    assert not any(quantize_input in m._forward_pre_hooks.values() for m in stripped.modules())
    assert type(stripped.fc1) is nn.Linear and remove_input_quantizers(stripped) == 0


def test_scope_excludes_and_errors_are_one_line():
    torch.manual_seed(0)
    config = StaticQuantizationConfig(mode="hooks", scope=Scope(exclude=("fc2",)))
    quantized = quantize_static(Branchy().eval(), _batches(), config)
    assert input_quantizer_of(quantized.fc2) is None
    assert quantizer_of(quantized.fc2, "weight") is None

    technique = StaticQuantization(HOOKS)
    model = Branchy().eval()
    technique.apply(model)
    with pytest.raises(StateError, match="already has an input quantizer"):
        StaticQuantization(HOOKS).apply(model)

    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(input=x)

    keyword = Keyword()
    StaticQuantization(HOOKS).apply(keyword)
    with pytest.raises(UnsupportedModuleError, match="first positional argument") as exc:
        keyword(torch.randn(2, 4))
    assert "\n" not in str(exc.value)

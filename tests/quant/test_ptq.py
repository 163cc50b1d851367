"""Static PTQ: config, quantizer placement, calibration, accuracy on digits, state and errors."""

from __future__ import annotations

import copy
import doctest
import itertools
import typing

import pytest
import torch
from torch import nn

from slimkit.core.compressor import Compressor
from slimkit.core.scope import Scope
from slimkit.core.technique import make_technique
from slimkit.errors import ConfigError, ScopeError, StateError, UnsupportedModuleError
from slimkit.models.cnn import DigitsResNet, mobilenetv2_tiny
from slimkit.quant import fake, ptq
from slimkit.quant.fake import ActivationQuantizer, activation_spec
from slimkit.quant.fold import fold_batchnorm
from slimkit.quant.observers import OBSERVERS
from slimkit.quant.ptq import (
    StaticQuantization,
    StaticQuantizationConfig,
    quantize_static,
    strip_quantization,
)
from slimkit.tasks.data import evaluate_accuracy, load_digits_split


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(seed=0).loaders(batch_size=64, seed=0)


@pytest.fixture(scope="module")
def calibration(digits):
    return list(itertools.islice(digits.train, 8))


def _warm(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, 1, 8, 8))
    return model.eval()


# --- config -------------------------------------------------------------------------------------
def test_config_defaults_round_trip_and_registry():
    config = StaticQuantizationConfig()
    assert (config.kind, config.observer, config.bits, config.per_channel) == (
        "static_quant",
        "minmax",
        8,
        True,
    )
    assert config.post_quant and not config.reduce_range and config.fp32_layers == ()
    custom = StaticQuantizationConfig(
        observer="percentile",
        observer_options={"percentile": 99.9},
        fp32_layers=["fc"],
        scope=Scope(exclude=("conv1",)),
    )
    assert StaticQuantizationConfig.from_dict(custom.to_dict()) == custom
    assert isinstance(make_technique(custom), StaticQuantization)
    assert set(typing.get_args(ptq.ObserverName)) == set(OBSERVERS)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"bits": 9}, "bits"),
        ({"bits": 1}, "bits"),
        ({"observer": "max"}, "observer"),
        ({"bits": 2, "reduce_range": True}, "reduce_range"),
        ({"per_chanel": False}, "unknown field"),
        ({"observer_options": {"bogus": 1}}, "unknown option"),
        ({"observer": "percentile", "observer_options": {"percentile": 20}}, "percentile"),
    ],
)
def test_config_rejects_bad_values(fields, match):
    with pytest.raises(ConfigError, match=match):
        StaticQuantizationConfig(**fields)


def test_fp32_layers_rules():
    with pytest.raises(ScopeError, match="invalid regex"):
        StaticQuantizationConfig(fp32_layers=["re:("])
    technique = StaticQuantization(StaticQuantizationConfig(fp32_layers=["layer9"]))
    with pytest.raises(ScopeError, match=r"fp32_layers rule 'layer9' matches no module.*layer"):
        technique.apply(DigitsResNet(width=4))
    plan = StaticQuantization(StaticQuantizationConfig(fp32_layers=["layer3", "fc"])).plan(
        DigitsResNet(width=4)
    )
    floats = {name for name, why in plan.skipped if "fp32_layers" in why}
    assert floats == {"fc", "layer3.0.conv1", "layer3.0.conv2", "layer3.0.downsample.conv"}
    assert "layer2.0.conv1" in plan.names and "fc" not in plan.names


# --- placement ----------------------------------------------------------------------------------
def test_resnet_quantizer_placement():
    model = _warm(DigitsResNet(width=4))
    technique = StaticQuantization()
    technique.apply(model)
    technique.apply(model)  # idempotent
    keys = set(model.activation_quantizers)
    # input, stem relu, per block: relu1, conv2 out (before add), relu2 after add; 2 shortcuts
    assert keys == {
        "x",
        "relu",
        "avgpool",
        "fc",
        *(f"layer{i}_0_{n}" for i in (1, 2, 3) for n in ("relu1", "bn2", "relu2")),
        "layer2_0_downsample_bn",
        "layer3_0_downsample_bn",
    }
    code = model.forward.__self__.code
    assert "activation_quantizers.avgpool(flatten, observe = False)" in code  # reshape reuses
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(technique.selection.names) == 10
    for name in technique.selection.names:
        module = model.get_submodule(name)
        assert fake.quantizer_of(module, "weight") is not None
        assert fake.quantizer_of(module, "bias") is not None
    with pytest.raises(StateError, match="already applied"):
        technique.apply(DigitsResNet(width=4))
    with pytest.raises(StateError, match="already has activation_quantizers"):
        StaticQuantization().apply(model)


def test_activation_quantizer_modes_and_straight_through_gradient():
    q = ActivationQuantizer(activation_spec(), "minmax")
    x = torch.linspace(-1, 3, 50)
    assert q.mode == "observing" and torch.equal(q(x), x)
    q(torch.tensor([5.0]), observe=False)  # not recorded
    q.freeze()
    assert q.mode == "quantizing" and q.is_calibrated and bool(q.calibrated)
    assert float(q.scale) == pytest.approx(4 / 255) and int(q.zero_point) == 64
    x = torch.tensor([-2.0, 0.011, 1.0, 4.0], requires_grad=True)
    y = q(x)
    y.sum().backward()
    codes = [-64, 1, 64, 191]  # 4.0 clips to the largest code, 255 - 64
    assert y.detach().tolist() == pytest.approx([c * 4 / 255 for c in codes], abs=1e-6)
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]  # clipped values get no gradient
    q.enabled = False
    assert q.mode == "disabled" and torch.equal(q(x), x)
    fresh = ActivationQuantizer()
    fresh.load_state_dict(q.state_dict())
    assert fresh.mode == "quantizing" and torch.equal(fresh.scale, q.scale)
    with pytest.raises(StateError, match="seen no data"):
        ActivationQuantizer().freeze()
    with pytest.raises(ConfigError, match="per tensor"):
        ActivationQuantizer(fake.weight_spec())


# --- calibration and accuracy -------------------------------------------------------------------
def test_resnet_int8_accuracy_within_one_point(trained_digits_model, digits, calibration):
    model = trained_digits_model("resnet")
    fp32 = evaluate_accuracy(model, digits.test)
    quantized = quantize_static(model, calibration)
    int8 = evaluate_accuracy(quantized, digits.test)
    print(f"DigitsResNet digits test accuracy: fp32 {fp32:.4f}, int8 fake-quant {int8:.4f}")
    assert fp32 > 0.9
    assert abs(fp32 - int8) <= 0.01
    assert isinstance(model.bn1, nn.BatchNorm2d)  # quantize_static leaves its input alone


def test_every_observer_calibrates(calibration):
    model = _warm(DigitsResNet(width=4))
    x = calibration[0][0][:16]
    reference = fold_batchnorm(model)(x)
    for name in ("minmax", "moving_average", "percentile", "mse", "entropy"):
        quantized = quantize_static(model, calibration[:2], StaticQuantizationConfig(observer=name))
        assert all(q.is_calibrated for q in quantized.activation_quantizers.values())
        out = quantized(x)
        assert torch.isfinite(out).all() and not torch.equal(out, reference)
        assert (out - reference).abs().max() < 0.5 * reference.abs().max()


def test_calibrate_streams_num_batches_and_progress(calibration):
    model = DigitsResNet(width=4)
    technique = StaticQuantization()
    technique.apply(model)
    seen = []

    def loader():
        for batch in calibration:
            seen.append(batch)
            yield batch

    technique.calibrate(model, loader(), num_batches=3, progress=True)
    assert len(seen) == 3 and technique.calibrated
    assert int(model.activation_quantizers["x"].observer.num_batches) == 3
    summary = technique.summary().to_dict()
    assert summary["totals"]["calibrated"] and len(summary["layers"]) == 10
    assert summary["layers"][0]["input_zero_point"] == 0  # digits pixels are >= 0
    with pytest.raises(StateError, match="already calibrated"):
        technique.calibrate(model, calibration)


def test_calibration_errors():
    model = DigitsResNet(width=4)
    technique = StaticQuantization()
    with pytest.raises(StateError, match="apply"):
        technique.summary()
    technique.apply(model)
    with pytest.raises(ConfigError, match="calibration loader yielded no batches"):
        technique.calibrate(model, [])
    with pytest.raises(ConfigError, match="num_batches"):
        technique.calibrate(model, [torch.rand(2, 1, 8, 8)], num_batches=0)
    with pytest.raises(ConfigError, match="got str"):
        technique.calibrate(model, ["not a batch"])
    with pytest.raises(StateError, match="the model this technique was applied to"):
        technique.calibrate(DigitsResNet(width=4), [torch.rand(2, 1, 8, 8)])
    with pytest.raises(StateError, match="before finalize"):
        technique.finalize(model)
    with pytest.raises(ConfigError, match="calibration loader yielded no batches"):
        quantize_static(DigitsResNet(width=4), iter(()))


def test_dict_batches_and_low_bits():
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, features):
            return self.fc2(torch.relu(self.fc1(features)))

    torch.manual_seed(0)
    model = Keyword()
    batches = [{"features": torch.randn(32, 6)} for _ in range(2)]
    x = torch.randn(64, 6)
    errors = {}
    for bits in (8, 4, 2):
        quantized = quantize_static(model, batches, StaticQuantizationConfig(bits=bits))
        with torch.no_grad():
            errors[bits] = float((quantized(features=x) - model(x)).abs().mean())
    assert errors[8] < errors[4] < errors[2]


def test_untraceable_and_shared_modules_are_refused():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    class Twice(Branchy):
        def forward(self, x):
            return self.fc(self.fc(x))

    with pytest.raises(UnsupportedModuleError, match=r"cannot be traced by torch\.fx"):
        StaticQuantization().apply(Branchy())
    with pytest.raises(UnsupportedModuleError, match="fc are called more than once"):
        StaticQuantization().apply(Twice())
    model = Twice()  # excluding the shared module is the way out
    StaticQuantization(StaticQuantizationConfig(scope=Scope(exclude=("fc",)))).apply(model)


# --- state --------------------------------------------------------------------------------------
def test_state_dict_resume_deepcopy_and_strip(calibration):
    model = _warm(DigitsResNet(width=4))
    quantized = quantize_static(model, calibration[:2])
    x = calibration[2][0][:8]
    want = quantized(x)
    fresh = DigitsResNet(width=4)
    technique = StaticQuantization()
    technique.apply(fresh)
    fresh.load_state_dict(quantized.state_dict())
    torch.testing.assert_close(fresh(x), want, atol=0, rtol=0)
    technique.load_state_dict({"kind": "static_quant", "current_step": 0, "calibrated": True})
    assert technique.finalize(fresh) is fresh
    assert technique.state_dict()["calibrated"]

    stripped = strip_quantization(copy.deepcopy(quantized))
    torch.testing.assert_close(stripped(x), fold_batchnorm(model)(x), atol=1e-5, rtol=0)
    assert "activation_quantizers" not in dict(stripped.named_children())
    assert type(stripped.conv1) is nn.Conv2d and "forward" not in stripped.__dict__
    torch.testing.assert_close(quantized(x), want, atol=0, rtol=0)  # the original still works


def test_gradients_flow_for_later_qat(calibration):
    quantized = quantize_static(_warm(DigitsResNet(width=4)), calibration[:1])
    quantized.train()
    loss = quantized(calibration[1][0]).logsumexp(dim=1).mean()
    loss.backward()
    weight = quantized.layer2[0].conv1.parametrizations.weight.original
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_compressor_drives_the_technique(calibration):
    model = _warm(mobilenetv2_tiny(width=4))
    compressor = Compressor([StaticQuantizationConfig()]).apply(model)
    technique = compressor.techniques[0]
    technique.calibrate(model, calibration[:2])
    assert compressor.finalize() is model
    totals = technique.summary().totals
    assert totals["layers"] == 17 and totals["activation_quantizers"] > 17


def test_docstring_examples():
    for module in (fake, ptq):
        assert doctest.testmod(module).failed == 0

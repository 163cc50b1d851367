"""LSQ / LSQ+ fake quantization: forward, hand-computed and reference gradients, the module."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

from slimkit.errors import ConfigError
from slimkit.quant import lsq
from slimkit.quant.affine import QuantSpec, fake_quantize, qparams_from_range
from slimkit.quant.fake import activation_spec, weight_spec
from slimkit.quant.lsq import LSQQuantizer, lsq_fake_quantize, lsq_grad_scale


def _reference(x, scale, zero_point, qmin, qmax, g, axis=None):
    """LSQ/LSQ+ written with plain autograd (the paper's detach tricks) for comparison."""
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    s = scale * g + (scale - scale * g).detach()
    z = zero_point * g + (zero_point - zero_point * g).detach()
    z = z + (torch.round(z) - z).detach()
    v = torch.clamp(x / s + z, qmin, qmax)
    v = v + (torch.round(v) - v).detach()
    return (v - z) * s


def test_doctests() -> None:
    assert doctest.testmod(lsq).failed == 0


@pytest.mark.parametrize(
    ("spec", "axis"),
    [
        (weight_spec(4), 0),
        (weight_spec(8, per_channel=False), None),
        (activation_spec(3), None),
        (QuantSpec(bits=8, signed=True), None),
    ],
)
def test_forward_equals_affine_fake_quantize(spec: QuantSpec, axis: int | None) -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 5, 3) * 2
    low, high = (x.amin(dim=(1, 2)), x.amax(dim=(1, 2))) if axis == 0 else (-1.5, 2.0)
    scale, zero_point = qparams_from_range(low, high, spec)
    expected = fake_quantize(x, scale, zero_point, spec, axis)
    out = lsq_fake_quantize(x, scale, zero_point.float(), spec.qmin, spec.qmax, 0.1, axis)
    assert torch.equal(out, expected)


def test_scale_gradient_matches_hand_computed_value() -> None:
    # 2-bit signed grid [-2, 1], scale 0.5: x / s = [-2.6, -0.4, 0.52, 1.8, 10.0]
    x = torch.tensor([-1.3, -0.2, 0.26, 0.9, 5.0], requires_grad=True)
    scale = torch.tensor(0.5, requires_grad=True)
    zero_point = torch.tensor(0.0, requires_grad=True)
    lsq_fake_quantize(x, scale, zero_point, -2, 1, grad_scale=0.5).sum().backward()
    # below -> qmin; inside -> round(v) - v; above -> qmax
    by_hand = (-2 + (0 + 0.4) + (1 - 0.52) + 1 + 1) * 0.5
    assert scale.grad.item() == pytest.approx(by_hand, abs=1e-6)
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    assert zero_point.grad.item() == pytest.approx(-0.5 * 3 * 0.5)  # -s per clipped value, * g


def test_scale_gradient_matches_finite_difference_where_clipped() -> None:
    """Where every value clips the output is ``(qmax - z) * s``, so the true derivative is exact."""
    x = torch.tensor([4.0, 7.0, -9.0], dtype=torch.float64)
    scale = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    zero_point = torch.tensor(0.0, dtype=torch.float64)
    lsq_fake_quantize(x, scale, zero_point, -4, 3).sum().backward()
    eps = 1e-6

    def f(s: float) -> float:
        return float(
            lsq_fake_quantize(x, torch.tensor(s, dtype=torch.float64), zero_point, -4, 3).sum()
        )

    finite = (f(0.3 + eps) - f(0.3 - eps)) / (2 * eps)
    assert scale.grad.item() == pytest.approx(finite, rel=1e-6)


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_gradients_match_autograd_reference(axis: int | None) -> None:
    torch.manual_seed(1)
    x = (torch.randn(4, 6, dtype=torch.float64) * 3).requires_grad_()
    channels = 1 if axis is None else x.shape[axis]
    shape = () if axis is None else (channels,)
    scale = (torch.rand(shape, dtype=torch.float64) * 0.5 + 0.2).requires_grad_()
    zero_point = torch.full(shape, 3.0, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(4, 6, dtype=torch.float64)
    g = lsq_grad_scale(x.numel() // channels, 15)

    ours = lsq_fake_quantize(x, scale, zero_point, 0, 15, g, axis)
    grads = torch.autograd.grad((ours * upstream).sum(), (x, scale, zero_point))
    ref = _reference(x, scale, zero_point, 0, 15, g, axis)
    expected = torch.autograd.grad((ref * upstream).sum(), (x, scale, zero_point))
    assert torch.allclose(ours, ref)
    for got, want in zip(grads, expected, strict=True):
        assert torch.allclose(got, want)


def test_ste_gradient_is_zero_outside_the_range_per_channel() -> None:
    x = torch.tensor([[0.1, 5.0, -5.0], [0.2, -0.2, 9.0]], requires_grad=True)
    scale = torch.tensor([0.1, 1.0])
    lsq_fake_quantize(x, scale, torch.zeros(2), -8, 7, axis=0).sum().backward()
    assert x.grad.tolist() == [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]


def test_zero_is_exact_on_the_symmetric_grid() -> None:
    weight = torch.randn(8, 4, 3, 3)
    weight[:, :2] = 0.0
    quantizer = LSQQuantizer(weight_spec(2), 8)
    quantizer.init_lsq(weight)
    assert torch.equal(quantizer(weight)[:, :2], torch.zeros(8, 2, 3, 3))


def test_module_state_and_inits() -> None:
    spec = weight_spec(4)
    quantizer = LSQQuantizer(spec, 3)
    assert isinstance(quantizer.scale, torch.nn.Parameter)
    assert not bool(quantizer.initialized)
    weight = torch.randn(3, 10)
    quantizer.init_lsq(weight)
    expected = 2 * weight.abs().mean(dim=1) / math.sqrt(spec.qmax)
    assert torch.allclose(quantizer.scale.detach(), expected)
    quantizer.init_from_range(weight.amin(dim=1), weight.amax(dim=1))
    scale, _ = qparams_from_range(weight.amin(dim=1), weight.amax(dim=1), spec)
    assert torch.equal(quantizer.scale.detach(), scale)
    assert torch.equal(quantizer.zero_point, torch.zeros(3))


def test_first_forward_initializes_and_learned_zero_point_is_a_parameter() -> None:
    quantizer = LSQQuantizer(activation_spec(8), learn_zero_point=True)
    assert isinstance(quantizer.zero_point, torch.nn.Parameter)
    x = torch.rand(64) * 4 - 1
    out = quantizer(x)
    assert bool(quantizer.initialized)
    assert float(quantizer.zero_point.detach()) > 0  # the negative values are on the grid
    out.sum().backward()
    assert quantizer.scale.grad is not None and quantizer.zero_point.grad is not None


def test_state_dict_round_trip() -> None:
    source = LSQQuantizer(activation_spec(4), learn_zero_point=True)
    source.init_from_range(torch.tensor(-0.5), torch.tensor(3.0))
    target = LSQQuantizer(activation_spec(4), learn_zero_point=True)
    target.load_state_dict(source.state_dict())
    assert set(source.state_dict()) == {"scale", "zero_point", "initialized"}
    x = torch.linspace(-1, 4, 50)
    assert torch.equal(source(x), target(x))
    assert bool(target.initialized)


def test_invalid_arguments() -> None:
    with pytest.raises(ConfigError, match="learned zero_point"):
        LSQQuantizer(weight_spec(8), 4, learn_zero_point=True)
    with pytest.raises(ConfigError, match="per_group"):
        LSQQuantizer(QuantSpec(bits=4, granularity="per_group", group_size=4))
    with pytest.raises(ConfigError, match="channels"):
        LSQQuantizer(weight_spec(8))
    with pytest.raises(ConfigError, match="qmin"):
        lsq_fake_quantize(torch.ones(2), torch.tensor(1.0), torch.tensor(0.0), 3, 3)
    with pytest.raises(ConfigError, match="per-channel"):
        lsq_fake_quantize(torch.ones(2, 3), torch.ones(2), torch.zeros(2), -8, 7, axis=1)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_learning_the_scale_reduces_quantization_error(bits: int) -> None:
    torch.manual_seed(bits)
    x = torch.randn(4096)
    quantizer = LSQQuantizer(QuantSpec(bits=bits, signed=True, symmetric=True))
    quantizer.init_from_tensor_range(x)  # min/max: too coarse a step for a Gaussian

    def mse() -> float:
        with torch.no_grad():
            return float(((quantizer(x) - x) ** 2).mean())

    initial = mse()
    optimizer = torch.optim.Adam(quantizer.parameters(), lr=0.01)
    for _ in range(150):
        optimizer.zero_grad()
        ((quantizer(x) - x) ** 2).mean().backward()
        optimizer.step()
    print(f"{bits}-bit MSE: min/max scale {initial:.5f} -> learned {mse():.5f}")
    assert mse() < 0.8 * initial

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


class _WrittenOut(torch.autograd.Function):
    """The module docstring's LSQ/LSQ+ formulas written out term by term (the implementation
    before the fused, fewer-pass one), to check that one against."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, g, axis):
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        s = lsq._view(scale, x, axis).to(dtype)
        z = torch.round(lsq._view(zero_point, x, axis).to(dtype))
        ratio = x.to(dtype) / s
        rounded = torch.round(ratio)
        ctx.save_for_backward(ratio, rounded, s, z, scale, zero_point)
        ctx.qparams = (qmin, qmax, g, axis)
        return (((rounded + z).clamp(qmin, qmax) - z) * s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        ratio, rounded, s, z, scale, zero_point = ctx.saved_tensors
        qmin, qmax, g, axis = ctx.qparams
        v = ratio + z
        below, above = v < qmin, v > qmax
        inside = ~(below | above)
        grad = grad_out.to(ratio.dtype)
        local_s = torch.where(inside, rounded - ratio, torch.where(below, qmin - z, qmax - z))
        local_z = torch.where(inside, torch.zeros_like(v), -s.expand_as(v))
        return (
            (grad * inside).to(grad_out.dtype),
            lsq._reduce(grad * local_s * g, scale.shape, axis).to(scale.dtype),
            lsq._reduce(grad * local_z * g, zero_point.shape, axis).to(zero_point.dtype),
            None,
            None,
            None,
            None,
        )


def _with_edges(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, axis) -> torch.Tensor:
    """``x`` with some values put exactly on grid points, half steps and the clipping edges."""
    s = lsq._view(scale.detach(), x, axis)
    grid = torch.randint(qmin - 2, qmax + 3, x.shape).to(x.dtype)
    half = torch.rand(x.shape) < 0.5
    edges = (grid + torch.where(half, 0.5, 0.0).to(x.dtype)) * s
    pick = torch.rand(x.shape) < 0.2
    return torch.where(pick, edges.to(x.dtype), x)


CASES = [
    # shape, axis, qmin, qmax, zero point, learn zero point, dtype, layout
    ((16, 8, 5, 5), None, 0, 255, 0.0, False, torch.float32, "contiguous"),
    ((16, 8, 5, 5), None, 0, 255, 37.0, True, torch.float32, "contiguous"),
    ((16, 8, 5, 5), None, 0, 15, 3.4, True, torch.float32, "channels_last"),
    ((12, 8, 3, 3), 0, -127, 127, 0.0, False, torch.float32, "contiguous"),
    ((12, 8, 3, 3), 0, -7, 7, 0.0, False, torch.float32, "channels_last"),
    ((12, 8), 1, -8, 7, 2.0, True, torch.float32, "contiguous"),
    ((9, 12), 0, -8, 7, 1.0, True, torch.float32, "transposed"),
    ((10, 6), 0, -4, 3, 1.0, True, torch.float64, "contiguous"),
    ((10, 6), None, 0, 255, 5.0, True, torch.bfloat16, "contiguous"),
    ((10, 6), 0, -127, 127, 0.0, False, torch.float16, "contiguous"),
]


def _case(shape, axis, zero, learn_zp, dtype, layout, seed):
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64) * 3
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.t().contiguous().t()
    channels = 1 if axis is None else shape[axis]
    qshape = () if axis is None else (channels,)
    scale = torch.rand(qshape) * 0.05 + 0.01
    zero_point = torch.full(qshape, zero) + (torch.rand(qshape) - 0.5 if zero % 1 else 0.0)
    return x.to(dtype), scale, zero_point.requires_grad_(learn_zp)


@pytest.mark.parametrize(
    ("shape", "axis", "qmin", "qmax", "zero", "learn_zp", "dtype", "layout"), CASES
)
def test_fewer_pass_function_matches_the_written_out_formulas(
    shape, axis, qmin, qmax, zero, learn_zp, dtype, layout
) -> None:
    x, scale, zero_point = _case(shape, axis, zero, learn_zp, dtype, layout, seed=len(shape))
    x = _with_edges(x, scale, qmin, qmax, axis).requires_grad_()
    scale.requires_grad_()
    g = lsq_grad_scale(x.numel() // max(1, scale.numel()), qmax)
    upstream = torch.randn(shape, dtype=torch.float64).to(dtype)
    inputs = (x, scale, zero_point) if learn_zp else (x, scale)

    ours = lsq_fake_quantize(x, scale, zero_point, qmin, qmax, g, axis)
    got = torch.autograd.grad((ours * upstream).sum(), inputs)
    ref = _WrittenOut.apply(x, scale, zero_point, qmin, qmax, g, axis)
    want = torch.autograd.grad((ref * upstream).sum(), inputs)

    assert ours.dtype == dtype and torch.equal(ours, ref)  # bit for bit
    assert torch.equal(got[0], want[0])  # the straight-through mask, bit for bit
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    for ours_q, ref_q in zip(got[1:], want[1:], strict=True):  # sums in another order
        assert ours_q.shape == ref_q.shape and ours_q.dtype == ref_q.dtype
        assert torch.allclose(ours_q, ref_q, rtol=tolerance, atol=tolerance * ref_q.abs().max())


def test_gradients_only_for_the_inputs_that_need_them() -> None:
    x, scale, zero_point = _case((6, 5), 0, 1.0, False, torch.float32, "contiguous", 3)
    scale.requires_grad_()
    ref_scale = scale.detach().clone().requires_grad_()
    lsq_fake_quantize(x, scale, zero_point, -8, 7, 0.3, 0).sum().backward()
    _WrittenOut.apply(x, ref_scale, zero_point, -8, 7, 0.3, 0).sum().backward()
    assert x.grad is None and zero_point.grad is None
    assert torch.allclose(scale.grad, ref_scale.grad, rtol=1e-5, atol=1e-6)
    # only x: the straight-through estimator, no scale gradient is formed
    x.requires_grad_()
    out = lsq_fake_quantize(x, scale.detach(), zero_point, -8, 7, 0.3, 0)
    (grad_x,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(
        grad_x,
        torch.autograd.grad(
            _WrittenOut.apply(x, scale.detach(), zero_point, -8, 7, 0.3, 0).sum(), x
        )[0],
    )


def test_no_grad_forward_is_the_same_values() -> None:
    x, scale, zero_point = _case((8, 4, 3, 3), 0, 0.0, False, torch.float32, "contiguous", 5)
    x.requires_grad_()
    with_grad = lsq_fake_quantize(x, scale, zero_point, -127, 127, 0.1, 0)
    with torch.no_grad():
        without = lsq_fake_quantize(x, scale, zero_point, -127, 127, 0.1, 0)
    assert with_grad.requires_grad and not without.requires_grad
    assert torch.equal(with_grad, without)


def test_initialized_flag_follows_the_buffer() -> None:
    """The cached flag (no device read per forward) sees every way the buffer can change."""
    x = torch.linspace(-1, 4, 50)
    trained = LSQQuantizer(activation_spec(8))
    trained(x)  # the first forward initializes it
    assert trained.is_initialized() and bool(trained.initialized)
    with torch.no_grad():
        trained.scale.fill_(0.123)

    fresh = LSQQuantizer(activation_spec(8))
    assert not fresh.is_initialized()  # cached as False
    fresh.load_state_dict(trained.state_dict())
    assert fresh.is_initialized()
    fresh(x)  # no re-initialization: the loaded scale stays
    assert float(fresh.scale.detach()) == pytest.approx(0.123)

    fresh.load_state_dict(LSQQuantizer(activation_spec(8)).state_dict())  # an uninitialized state
    assert not fresh.is_initialized()
    fresh(x)
    assert fresh.is_initialized() and float(fresh.scale.detach()) != pytest.approx(0.123)

    fresh.initialized.fill_(False)
    assert not fresh.is_initialized()
    fresh.initialized = torch.tensor(True)  # a new buffer tensor
    assert fresh.is_initialized()


def test_initialized_flag_survives_copies() -> None:
    import copy
    import io

    quantizer = LSQQuantizer(activation_spec(8))
    assert not quantizer.is_initialized()  # cache the uninitialized state, then initialize
    quantizer.init_lsq(torch.rand(20))
    for clone in (
        copy.deepcopy(quantizer),
        torch.load(io.BytesIO(_saved(quantizer)), weights_only=False),
    ):
        assert clone.is_initialized() and bool(clone.initialized)
        scale = float(clone.scale.detach())
        clone(torch.rand(20) * 100)  # would re-initialize if the flag were wrong
        assert float(clone.scale.detach()) == scale


def _saved(module: torch.nn.Module) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(module, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("learn_zero_point", [False, True])
def test_module_scale_gradient_goes_through_abs_and_the_clamp(learn_zero_point: bool) -> None:
    """The module quantizes with ``scale.abs().clamp_min(eps)``: its gradients are those of the
    written-out formulas composed with that, also for negative and below-eps raw scales."""
    torch.manual_seed(7)
    if learn_zero_point:
        quantizer = LSQQuantizer(activation_spec(8), learn_zero_point=True)
        x = (torch.rand(32, 5) * 4 - 1).requires_grad_()
        quantizer.init_lsq(x)
        raw = torch.tensor(-quantizer.scale.item())  # a negative raw scale: |s| is used
    else:
        quantizer = LSQQuantizer(weight_spec(4), 6)
        x = torch.randn(6, 5, requires_grad=True)
        quantizer.init_lsq(x)
        raw = quantizer.scale.detach().clone()
        raw[1], raw[2], raw[3] = -raw[1], 1e-12, -1e-12  # negative, below eps (both signs)
    with torch.no_grad():
        quantizer.scale.copy_(raw)
    upstream = torch.randn(x.shape)
    out = quantizer(x)
    got = torch.autograd.grad((out * upstream).sum(), (x, *quantizer.parameters()))

    scale = quantizer.scale.detach().clone().requires_grad_()
    zero_point = quantizer.zero_point.detach().clone().requires_grad_(learn_zero_point)
    spec, g = quantizer.spec, quantizer.grad_scale(x)
    ref = _WrittenOut.apply(
        x, scale.abs().clamp_min(1e-8), zero_point, spec.qmin, spec.qmax, g, quantizer.axis
    )
    inputs = (x, scale, zero_point) if learn_zero_point else (x, scale)
    want = torch.autograd.grad((ref * upstream).sum(), inputs)
    assert torch.equal(out, ref)
    assert torch.equal(got[0], want[0])
    for ours, theirs in zip(got[1:], want[1:], strict=True):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    if not learn_zero_point:
        assert got[1][2] == 0 and got[1][3] == 0  # clamped: no gradient


def test_a_split_batch_counts_every_process_share_in_the_gradient_scale(monkeypatch):
    """Under DDP each process quantizes its share of the batch; LSQ's g = 1/sqrt(n * qmax)
    must count the whole batch or N processes learn activation scales sqrt(N) times faster
    than one process on the same global batch. Weights (not split) keep their own count."""
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    share = torch.rand(16, 4, 8, 8)
    activations = LSQQuantizer(spec, split_batch=True)
    weights = LSQQuantizer(spec)
    one_process = activations.grad_scale(torch.rand(32, 4, 8, 8))
    assert one_process == pytest.approx(1 / math.sqrt(32 * 4 * 8 * 8 * 255))
    monkeypatch.setattr(lsq, "world_size", lambda: 2)
    assert activations.grad_scale(share) == pytest.approx(one_process)
    assert weights.grad_scale(share) == pytest.approx(1 / math.sqrt(16 * 4 * 8 * 8 * 255))

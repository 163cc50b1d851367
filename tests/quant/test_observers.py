"""Contract tests run for every registered observer, plus method-specific checks."""

from __future__ import annotations

import contextlib
import doctest
import io
from collections import Counter

import numpy as np
import pytest
import torch
from onnxruntime.quantization.calibrate import HistogramCollector

from slimkit.errors import ConfigError, SlimkitError, StateError
from slimkit.quant import affine, observers
from slimkit.quant.affine import QuantSpec, fake_quantize, qparams_from_range
from slimkit.quant.observers import OBSERVERS, Observer, _sawtooth_integral, make_observer

ALL = sorted(OBSERVERS)
HISTOGRAM = ["entropy", "mse", "percentile"]
SPECS = {
    "int8": QuantSpec(),
    "int8-sym": QuantSpec(symmetric=True),
    "uint8": QuantSpec(signed=False),
    "uint8-sym": QuantSpec(signed=False, symmetric=True),
    "int4-narrow": QuantSpec(bits=4, symmetric=True, narrow_range=True),
}
# Histogram observers fed the same data in 1 or 4 batches differ only by resolution (bins up to
# 2x wider). Their ranges then agree within these fractions of max|x| (measured worst cases over
# 10 seeds: 0.1 %, 2 %, 16 %: the 8-bit KL minimum is flat and moves with the bin grid) and
# their fake-quant errors within 25 %.
STREAM_TOL = {"minmax": 0.0, "percentile": 0.005, "mse": 0.03, "entropy": 0.2}


def normal(n: int, seed: int, shift: float = 0.0, std: float = 1.0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * std + shift


def calibrated(name: str, spec: QuantSpec, x: torch.Tensor, batches: int = 4, **kw) -> Observer:
    obs = make_observer(name, spec, **kw)
    for batch in x.chunk(batches):
        obs(batch)
    return obs


# ---------------------------------------------------------------- contract, all observers


@pytest.mark.parametrize("name", ALL)
def test_forward_returns_the_input_unchanged(name):
    x = normal(1000, 0).requires_grad_()
    before = x.detach().clone()
    obs = make_observer(name, QuantSpec())
    assert obs(x) is x
    assert torch.equal(x.detach(), before)
    assert obs.observed and int(obs.num_batches) == 1


@pytest.mark.parametrize("spec_id", sorted(SPECS))
@pytest.mark.parametrize("shift", [0.0, 0.5, -5.0], ids=["centered", "relu", "negative"])
@pytest.mark.parametrize("name", ALL)
def test_range_and_qparams_contract(name, spec_id, shift):
    spec = SPECS[spec_id]
    x = normal(20_000, 1, shift=shift)
    if shift > 0:
        x = x.clamp(min=0)  # as after ReLU: 31 % exact zeros and a positive tail
    obs = calibrated(name, spec, x)
    lo, hi = obs.compute_range()
    dmin, dmax = float(x.min()), float(x.max())
    if name == "minmax":
        assert (float(lo), float(hi)) == (dmin, dmax)
    elif name == "moving_average":
        assert dmin <= float(lo) <= float(hi) <= dmax
    else:
        assert min(dmin, 0.0) <= float(lo) <= 0.0 <= float(hi) <= max(dmax, 0.0)
    scale, zp = obs.compute_qparams()
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32
    assert float(scale) > 0 and spec.qmin <= int(zp) <= spec.qmax
    assert torch.equal(fake_quantize(torch.zeros(2), scale, zp, spec), torch.zeros(2))


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip_reproduces_qparams(name):
    spec = QuantSpec(signed=False)
    obs = calibrated(name, spec, normal(5000, 2, shift=1.0))
    buffer = io.BytesIO()
    torch.save(obs.state_dict(), buffer)
    buffer.seek(0)
    fresh = make_observer(name, spec)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for ours, theirs in zip(obs.compute_qparams(), fresh.compute_qparams(), strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", ALL)
def test_state_moves_with_to(name):
    obs = calibrated(name, QuantSpec(symmetric=True), normal(5000, 9))
    expected = obs.compute_qparams()
    moved = obs.to("cpu").to(torch.float64)
    assert all(b.dtype in (torch.float64, torch.int64) for b in moved.buffers())
    for ours, theirs in zip(expected, moved.compute_qparams(), strict=True):
        assert torch.equal(ours, theirs)
    moved(normal(100, 10))  # keeps calibrating after the move


@pytest.mark.parametrize("name", ["minmax", "moving_average"])
@pytest.mark.parametrize("granularity", ["per_channel", "per_group"])
def test_per_channel_state_dict_round_trip(name, granularity):
    spec = QuantSpec(
        granularity=granularity, axis=1, group_size=4 if granularity == "per_group" else None
    )
    obs = make_observer(name, spec)
    for seed in range(3):
        obs(normal(48, seed).reshape(4, 12))
    expected_shape = (12,) if granularity == "per_channel" else (4, 3)
    assert obs.compute_range()[0].shape == expected_shape
    fresh = make_observer(name, spec)
    fresh.load_state_dict(obs.state_dict())
    for ours, theirs in zip(obs.compute_qparams(), fresh.compute_qparams(), strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", ALL)
def test_unobserved_raises_state_error(name):
    obs = make_observer(name, QuantSpec())
    obs(torch.empty(0))  # an empty batch is not data
    assert not obs.observed
    with pytest.raises(StateError, match=f"observer '{name}' has seen no data"):
        obs.compute_range()
    with pytest.raises(StateError):
        obs.compute_qparams()


@pytest.mark.parametrize("name", ALL)
def test_all_zero_data_then_growth(name):
    obs = make_observer(name, QuantSpec())
    obs(torch.zeros(100))
    scale, zp = obs.compute_qparams()
    assert float(scale) == 1.0 and int(zp) == 0
    obs(normal(1000, 3))
    lo, hi = obs.compute_range()
    assert float(lo) < 0 < float(hi)


@pytest.mark.parametrize("name", ["minmax", *HISTOGRAM])
@pytest.mark.parametrize("spec_id", ["int8", "int8-sym", "int4-narrow"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_batch_and_four_batches_agree(name, spec_id, seed):
    spec = SPECS[spec_id]
    x = normal(40_000, seed, shift=0.3)
    x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(seed))]
    whole = calibrated(name, spec, x, batches=1)
    split = calibrated(name, spec, x, batches=4)
    gap = (torch.stack(whole.compute_range()) - torch.stack(split.compute_range())).abs().max()
    assert float(gap) <= STREAM_TOL[name] * float(x.abs().max())

    def error(obs: Observer) -> float:
        scale, zp = obs.compute_qparams()
        return float(((fake_quantize(x, scale, zp, spec) - x) ** 2).mean())

    assert error(split) <= 1.25 * error(whole) and error(whole) <= 1.25 * error(split)


def test_minmax_per_channel_streaming_is_exact():
    spec = QuantSpec(granularity="per_channel", axis=1)
    x = normal(4 * 8 * 5, 4).reshape(4, 8, 5)
    lo, hi = calibrated("minmax", spec, x, batches=4).compute_range()
    assert torch.equal(lo, x.amin(dim=(0, 2))) and torch.equal(hi, x.amax(dim=(0, 2)))


# ---------------------------------------------------------------- registry and validation


def test_registry_is_explicit_and_names_match():
    assert ALL == ["entropy", "minmax", "moving_average", "mse", "percentile"]
    for name, cls in OBSERVERS.items():
        assert issubclass(cls, Observer) and cls.name == name


def test_make_observer_errors_list_valid_choices():
    with pytest.raises(ConfigError, match="unknown observer 'minmx'; valid names: entropy, minmax"):
        make_observer("minmx", QuantSpec())
    with pytest.raises(ConfigError, match=r"percentil.*valid: axis, percentile, bins"):
        make_observer("percentile", QuantSpec(), percentil=99.0)
    with pytest.raises(ConfigError, match="QuantSpec"):
        make_observer("minmax", {"bits": 8})


@pytest.mark.parametrize("name", HISTOGRAM)
def test_histogram_observers_are_per_tensor_only(name):
    with pytest.raises(ConfigError, match=r"per_tensor.*per_channel"):
        make_observer(name, QuantSpec(granularity="per_channel"))


@pytest.mark.parametrize(
    ("name", "kwargs", "field"),
    [
        ("moving_average", {"averaging_constant": 0.0}, "averaging_constant"),
        ("percentile", {"percentile": 101}, "percentile"),
        ("entropy", {"bins": 1001}, "bins"),
        ("minmax", {"axis": 1}, "axis"),
    ],
)
def test_option_validation(name, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        make_observer(name, QuantSpec(), **kwargs)


def test_bad_batches_are_rejected():
    obs = make_observer("minmax", QuantSpec())
    with pytest.raises(ConfigError, match="float tensor"):
        obs(torch.arange(3))
    with pytest.raises(SlimkitError, match="nan or inf"):
        obs(torch.tensor([1.0, float("nan")]))
    per_channel = make_observer("minmax", QuantSpec(granularity="per_channel"))
    per_channel(torch.zeros(3, 2))
    with pytest.raises(ConfigError, match="channel count"):
        per_channel(torch.zeros(4, 2))


def test_moving_average_follows_torch_ao_update():
    obs = make_observer("moving_average", QuantSpec(), averaging_constant=0.5)
    obs(torch.tensor([-2.0, 2.0]))
    obs(torch.tensor([0.0, 6.0]))
    lo, hi = obs.compute_range()
    assert (float(lo), float(hi)) == (-1.0, 4.0)


def test_histogram_growth_is_exact_and_bounded():
    obs = make_observer("percentile", QuantSpec(), bins=64)
    first, second = [-1.0, 0.0, 0.3, 0.9], [3.0, -7.0, 0.01]
    obs(torch.tensor(first))
    obs(torch.tensor(second))  # the threshold doubles from 1 to 8, merging bins pairwise
    assert float(obs.threshold) == 8.0 and obs.histogram.numel() == 128
    direct = torch.zeros(128, dtype=torch.float64)
    for value in first + second:
        direct[64 + int(np.floor(value / (8.0 / 64)))] += 1
    assert torch.equal(obs.histogram, direct)


def test_docstring_examples_run():
    for module in (affine, observers):
        assert doctest.testmod(module).failed == 0


# ---------------------------------------------------------------- method-specific behaviour


@pytest.fixture(scope="module")
def outlier_data() -> tuple[torch.Tensor, torch.Tensor]:
    """One million N(0, 1) values and two at 100 (rare, huge outliers)."""
    bulk = normal(1_000_000, 5)
    return torch.cat([bulk, torch.tensor([100.0, 100.0])]), bulk


@pytest.mark.parametrize(
    ("bits", "name", "kwargs"),
    [
        (8, "percentile", {}),
        (8, "mse", {}),
        (8, "entropy", {"bins": 4096}),  # 2048 bins cannot resolve a bulk 22x below the max
        (4, "percentile", {}),
        (4, "mse", {}),
        (4, "entropy", {}),
    ],
)
def test_clipping_observers_ignore_rare_outliers(outlier_data, bits, name, kwargs):
    x, bulk = outlier_data
    spec = QuantSpec(bits=bits, symmetric=True)
    obs = calibrated(name, spec, x, **kwargs)
    _, hi = obs.compute_range()
    assert float(hi) < 30.0

    def bulk_mse(o: Observer) -> float:
        scale, zp = o.compute_qparams()
        return float(((fake_quantize(bulk, scale, zp, spec) - bulk) ** 2).mean())

    assert bulk_mse(obs) < bulk_mse(calibrated("minmax", spec, x)) / 5


def test_entropy_threshold_floor_at_default_bins(outlier_data):
    x, _ = outlier_data
    _, hi = calibrated("entropy", QuantSpec(symmetric=True), x).compute_range()
    assert float(hi) >= 128 / 2048 * 100  # documented limit: n_q / bins * max|x|


@pytest.mark.parametrize("symmetric", [True, False])
def test_entropy_on_normal_data_clips_between_2_and_6_sigma(symmetric):
    x = normal(200_000, 6, std=2.0)
    lo, hi = calibrated("entropy", QuantSpec(symmetric=symmetric), x).compute_range()
    assert 2 * 2.0 <= float(hi) <= 6 * 2.0 and -6 * 2.0 <= float(lo) <= -2 * 2.0


def _tensorrt_entropy_reference(hist: np.ndarray, n_q: int) -> int:
    """Straight loop form of TensorRT's entropy search; returns the chosen width in bins."""
    hist = hist.astype(np.float64).copy()
    hist[0] = hist[1]
    best, best_kl = None, np.inf
    for width in range(n_q, hist.size + 1):
        group = [k * n_q // width for k in range(width)]
        nonzero = [k for k in range(width) if hist[k] > 0]
        sums, counts = Counter(), Counter()
        for k in nonzero:
            sums[group[k]] += hist[k]
            counts[group[k]] += 1
        q = np.zeros(width)
        for k in nonzero:
            q[k] = sums[group[k]] / counts[group[k]]
        p = hist[:width].copy()
        p[-1] += hist[width:].sum()
        p, q = p / p.sum(), q / q.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = float(np.sum(np.where(p > 0, p * np.log(p / q), 0.0)))
        if kl <= best_kl:  # ties go to the larger threshold
            best, best_kl = width, kl
    return best


@pytest.mark.parametrize(("bits", "seed"), [(8, 0), (6, 1), (4, 2)])
def test_entropy_matches_tensorrt_reference_loop(bits, seed):
    spec = QuantSpec(bits=bits, symmetric=True)
    u = torch.rand(30_000, generator=torch.Generator().manual_seed(seed)) - 0.5
    x = -u.sign() * torch.log1p(-2 * u.abs()) if seed else normal(30_000, seed)  # Laplace
    obs = calibrated("entropy", spec, x, batches=1, bins=256)
    abs_hist = obs.histogram[256:] + obs.histogram[:256].flip(0)  # |x| in 256 bins
    width = _tensorrt_entropy_reference(abs_hist.numpy(), 2 ** (bits - 1))
    expected = width * float(obs.threshold) / 256
    assert float(obs.compute_range()[1]) == pytest.approx(min(expected, float(x.max())))


@pytest.mark.parametrize("seed", [0, 2, 3])
def test_entropy_exact_ties_go_to_the_larger_threshold(seed):
    # Pixel-like data: a few discrete levels k/16 and many exact zeros (replaced by bin 1, which
    # is empty). Keeping only the first level (all p mass in one bin) and keeping everything
    # both give KL = 0 exactly; the prefix-sum scores differ by rounding noise (~1e-16), which
    # must not pick the degenerate 1/16 range (it did, with 7-bit unsigned codes: n_q = 128).
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(1, 17, (30_000,), generator=g).float() / 16
    x = torch.where(torch.rand(30_000, generator=g) < 0.6, torch.zeros(()), levels)
    spec = QuantSpec(signed=False, reduce_range=True)
    obs = calibrated("entropy", spec, x, batches=1)
    with np.errstate(invalid="ignore"):  # candidates whose q is empty score nan there
        width = _tensorrt_entropy_reference(obs._abs_histogram().numpy(), 128)
    assert width == 2048
    assert float(obs.compute_range()[1]) == pytest.approx(1.0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_matches_onnxruntime_within_one_bin(symmetric):
    # 100_003 samples: no percentile falls exactly on a sample count, where ORT's float
    # cumsum of fractions and our exact cdf may round to neighbouring samples.
    x = normal(100_003, 7, shift=0.5)
    obs = calibrated("percentile", QuantSpec(symmetric=symmetric), x, batches=1)
    collector = HistogramCollector("percentile", symmetric, 2048, 128, 99.99, "same")
    with contextlib.redirect_stdout(io.StringIO()):
        collector.collect({"x": x.numpy()})
        ort_lo, ort_hi = collector.compute_collection_result()["x"][:2]
    # ORT bins |x| into 2048 bins (symmetric) or x into 2048 bins over [-max|x|, max|x|]
    width = float(x.abs().max()) / 2048 * (1 if symmetric else 2)
    lo, hi = obs.compute_range()
    assert abs(float(lo) - float(ort_lo)) <= width * 1.01
    assert abs(float(hi) - float(ort_hi)) <= width * 1.01


@pytest.mark.parametrize("spec_id", ["int8", "int8-sym", "int4-narrow", "uint8"])
def test_mse_is_near_the_brute_force_optimum(spec_id):
    spec = SPECS[spec_id]
    x = normal(50_000, 8, shift=0.5, std=1.5)
    lo, hi = calibrated("mse", spec, x).compute_range()

    def mse(lo_: float, hi_: float) -> float:
        scale, zp = qparams_from_range(lo_, hi_, spec)
        return float(((fake_quantize(x, scale, zp, spec) - x) ** 2).mean())

    dmin, dmax = float(x.min()), float(x.max())
    fractions = np.linspace(0.05, 1.0, 60)
    if spec.symmetric:
        best = min(mse(-f * dmax, f * dmax) for f in fractions)
    else:
        best = min(mse(a * dmin, b * dmax) for a in fractions[::3] for b in fractions[::3])
    assert mse(float(lo), float(hi)) <= best * 1.03


def test_mse_rounding_error_integral_is_exact():
    step = torch.tensor([[0.3], [1.7]], dtype=torch.float64)
    a = torch.tensor([[-2.05, 0.1, 3.0]], dtype=torch.float64)
    b = a + torch.tensor([[0.4, 2.5, 0.05]], dtype=torch.float64)
    exact = _sawtooth_integral(b, step) - _sawtooth_integral(a, step)
    grid = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    s = a[..., None] + (b - a)[..., None] * grid  # (2, 3, n) points in each [a, b]
    err = (s - step[..., None] * torch.round(s / step[..., None])) ** 2
    numeric = torch.trapezoid(err, s, dim=-1)
    assert torch.allclose(exact, numeric, rtol=1e-6, atol=1e-12)

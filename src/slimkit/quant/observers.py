"""Calibration observers: streaming estimators of the range a tensor is quantized to.

An observer is an ``nn.Module`` placed where a tensor flows during calibration. ``forward(x)``
folds one batch into its statistics (never keeping the batch) and returns ``x`` unchanged;
``compute_range()`` gives ``(min, max)`` and ``compute_qparams()`` the ``(scale, zero_point)``
from :func:`~slimkit.quant.affine.qparams_from_range`. State lives in buffers, so
``state_dict``, ``.to()`` and ``torch.save`` work.

>>> import torch
>>> from slimkit.quant.affine import QuantSpec
>>> obs = make_observer("minmax", QuantSpec(bits=8, signed=False))
>>> _ = obs(torch.tensor([-1.0, 0.5, 3.0]))
>>> [round(float(v), 4) for v in obs.compute_qparams()]
[0.0157, 64.0]

Histogram observers (``percentile``, ``mse``, ``entropy``) are per-tensor. They share one
histogram of ``2 * bins`` equal bins over ``[-T, T]``, where ``T`` is the first batch's
``max|x|``. When a later batch exceeds ``T``, ``T`` doubles (as often as needed) and pairs of
bins merge exactly, so memory is fixed and no count is smeared. Splitting the same data into
batches therefore changes only the resolution (bins up to 2x wider than with one batch). On
normal data the ranges then move by under 0.5 % of ``max|x|`` for percentile, 3 % for mse and
20 % for entropy, whose 8-bit KL minimum is flat (fake-quant error within 25 %).

Several processes (``torch.distributed``) each calibrate on their share of the data, then
:meth:`Observer.synchronize` merges the statistics on every rank before the range is computed:
min/max reduce exactly (MIN/MAX), moving averages are averaged, histograms are summed. So that
histograms share bin edges, inside a process group the first threshold is rounded up to a power
of two: every rank's grid is then a power-of-two coarsening of the finest one, and each rank
merges bin pairs up to the largest threshold (exact) before the counts are added.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar

import torch
from torch import nn

from slimkit.distributed import all_reduce_, is_distributed
from slimkit.errors import ConfigError, SlimkitError, StateError
from slimkit.quant.affine import QuantSpec, qparams_from_range, tensor_range

__all__ = [
    "OBSERVERS",
    "EntropyObserver",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageObserver",
    "Observer",
    "PercentileObserver",
    "make_observer",
]

_CHUNK_ELEMENTS = 1 << 21  # (candidate, bin) pairs evaluated at once by the MSE search
_KL_TIE = 1e-12  # nats: entropy scores this close to the minimum are ties (float noise)
_KL_CANDIDATES = 256  # entropy thresholds scored at once (bounds the search's memory)


class Observer(nn.Module):
    """Base class: streams batches into buffers and turns them into a range.

    Args:
        spec: the quantization grid. per_tensor, per_channel (along ``axis``, default
            ``spec.axis``) and per_group (last dim) are reduced as in
            :func:`~slimkit.quant.affine.tensor_range`.
        axis: overrides ``spec.axis``; only valid for per_channel specs.

    Subclasses implement ``_observe(x, batch_min, batch_max)`` and ``_compute_range()``.
    Buffers ``min_val``/``max_val`` hold the observer's running range; ``num_batches`` counts.
    """

    name: ClassVar[str] = "observer"

    def __init__(self, spec: QuantSpec, *, axis: int | None = None) -> None:
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise ConfigError(f"spec must be a QuantSpec, got {type(spec).__name__}")
        if axis is not None and spec.granularity != "per_channel":
            raise ConfigError(
                f"axis is only valid with granularity='per_channel', got {spec.granularity!r}"
            )
        self.spec = spec
        self.axis = spec.axis if spec.granularity == "per_channel" and axis is None else axis
        per_tensor = spec.granularity == "per_tensor"
        inf = torch.tensor(float("inf")) if per_tensor else torch.empty(0)
        self.register_buffer("min_val", inf.clone())
        self.register_buffer("max_val", -inf)
        self.register_buffer("num_batches", torch.tensor(0, dtype=torch.long))

    @property
    def observed(self) -> bool:
        """Whether at least one non-empty batch was seen."""
        return bool(self.num_batches > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fold the batch ``x`` into the statistics; return ``x`` itself."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(f"observer {self.name!r} needs a float tensor, got {got}")
        if x.numel() == 0:
            return x
        with torch.no_grad():
            data = x.detach().to(device=self.min_val.device, dtype=torch.float32)
            lo, hi = tensor_range(data, self.spec, axis=self.axis)
            if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
                raise SlimkitError(f"observer {self.name!r} got nan or inf in a calibration batch")
            if self.observed and lo.shape != self.min_val.shape:
                raise ConfigError(
                    f"observer {self.name!r} saw ranges of shape {tuple(lo.shape)} after "
                    f"{tuple(self.min_val.shape)}: the channel count must not change"
                )
            self._observe(data, lo, hi)
            self.num_batches += 1
        return x

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(min, max)`` range to quantize to (float32 tensors, per-channel shaped)."""
        if not self.observed:
            raise StateError(
                f"observer {self.name!r} has seen no data: calibrate with at least one batch"
            )
        return self._compute_range()

    def compute_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` for :meth:`compute_range` under ``self.spec``."""
        return qparams_from_range(*self.compute_range(), self.spec)

    @torch.no_grad()
    def synchronize(self) -> None:
        """Merge every rank's statistics into this observer (no-op in a single process).

        Call it on every rank of the default process group, for the same observers in the same
        order, after calibrating and before :meth:`compute_range`; afterwards every rank holds
        the same statistics. Ranks that saw no data take part too.
        """
        if is_distributed():
            self._synchronize()

    def _synchronize(self) -> None:
        """Running min/max: exact over the union of every rank's data."""
        self._agree_shape()
        n = self.min_val.numel()
        pair = torch.cat([-self.min_val.reshape(-1), self.max_val.reshape(-1)])
        all_reduce_(pair, "max")
        self.min_val = (-pair[:n]).reshape(self.min_val.shape)
        self.max_val = pair[n:].reshape(self.max_val.shape)
        all_reduce_(self.num_batches, "sum")

    def _agree_shape(self) -> None:
        """Per-channel ranges of a rank that saw nothing are sized like the others'."""
        if self.spec.granularity == "per_tensor":
            return
        shapes = [None] * torch.distributed.get_world_size()
        mine = tuple(self.min_val.shape) if self.observed else None
        torch.distributed.all_gather_object(shapes, mine)
        seen = sorted({s for s in shapes if s is not None})
        if len(seen) > 1:
            raise ConfigError(
                f"observer {self.name!r} saw ranges of shapes {seen} on different ranks: the "
                "channel count must be the same everywhere"
            )
        if seen and mine is None:
            self.min_val = torch.full(seen[0], float("inf"), device=self.min_val.device)
            self.max_val = torch.full(seen[0], float("-inf"), device=self.max_val.device)

    def extra_repr(self) -> str:
        return f"spec={self.spec}, axis={self.axis}"

    def _observe(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        raise NotImplementedError

    def _compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val.clone(), self.max_val.clone()

    def _update_running(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.observed:
            lo, hi = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        self.min_val, self.max_val = lo.clone(), hi.clone()

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        # Per-channel/per-group ranges are sized by the first batch; size them from the file.
        if self.spec.granularity != "per_tensor":
            for name in ("min_val", "max_val"):
                if prefix + name in state_dict:
                    self._buffers[name] = self._buffers[name].new_empty(
                        state_dict[prefix + name].shape
                    )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MinMaxObserver(Observer):
    """Running minimum and maximum of everything seen (exact, order independent)."""

    name = "minmax"

    def _observe(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self._update_running(lo, hi)


class MovingAverageObserver(Observer):
    """Exponential moving average of each batch's min and max, as ``torch.ao``'s observer.

    ``min <- min + averaging_constant * (batch_min - min)``; the first batch sets the range.
    The result depends on batch order and size by design.
    """

    name = "moving_average"

    def __init__(
        self, spec: QuantSpec, *, axis: int | None = None, averaging_constant: float = 0.01
    ) -> None:
        super().__init__(spec, axis=axis)
        if not isinstance(averaging_constant, (int, float)) or not 0 < averaging_constant <= 1:
            raise ConfigError(
                f"averaging_constant must be a number in (0, 1], got {averaging_constant!r}"
            )
        self.averaging_constant = float(averaging_constant)

    def _observe(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.observed:
            c = self.averaging_constant
            lo = self.min_val + c * (lo - self.min_val)
            hi = self.max_val + c * (hi - self.max_val)
        self.min_val, self.max_val = lo.clone(), hi.clone()

    def _synchronize(self) -> None:
        """The mean of the averaged ranges of the ranks that saw data."""
        self._agree_shape()
        seen = self.observed
        lo = self.min_val.reshape(-1) if seen else torch.zeros_like(self.min_val.reshape(-1))
        hi = self.max_val.reshape(-1) if seen else torch.zeros_like(self.max_val.reshape(-1))
        sums = torch.cat([lo, hi, torch.tensor([float(seen)], device=lo.device)])
        all_reduce_(sums, "sum")
        ranks = float(sums[-1])
        if ranks > 0:
            n = self.min_val.numel()
            self.min_val = (sums[:n] / ranks).reshape(self.min_val.shape)
            self.max_val = (sums[n : 2 * n] / ranks).reshape(self.max_val.shape)
        all_reduce_(self.num_batches, "sum")


class _HistogramObserver(Observer):
    """Per-tensor observer over a streamed, fixed-size histogram (see the module docstring).

    Buffers: ``histogram`` (``2 * bins`` float64 counts over ``[-threshold, threshold]``),
    ``threshold`` and the exact running ``min_val``/``max_val``. Ranges returned by subclasses
    lie within ``[min(min_val, 0), max(max_val, 0)]`` and contain 0.
    """

    def __init__(self, spec: QuantSpec, *, axis: int | None = None, bins: int = 2048) -> None:
        super().__init__(spec, axis=axis)
        if spec.granularity != "per_tensor":
            raise ConfigError(
                f"observer {self.name!r} supports only granularity='per_tensor', "
                f"got {spec.granularity!r}"
            )
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 16 or bins % 2:
            raise ConfigError(f"bins must be an even integer >= 16, got {bins!r}")
        self.bins = bins
        self.register_buffer("histogram", torch.zeros(2 * bins, dtype=torch.float64))
        self.register_buffer("threshold", torch.tensor(0.0, dtype=torch.float64))

    def _observe(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self._update_running(lo, hi)
        n, amax = self.bins, float(torch.maximum(-lo, hi))
        t = float(self.threshold) if self.num_batches > 0 else 0.0
        if t == 0.0:  # all mass so far is exactly 0, which stays in bin n for any threshold
            t = _power_of_two_above(amax) if is_distributed() else amax
        t = self._grow(t, amax)
        self.threshold.fill_(t)
        if t == 0.0:
            self.histogram[n] += x.numel()
            return
        idx = torch.floor(x.reshape(-1).double() * (n / t)).long() + n
        self.histogram += torch.bincount(idx.clamp_(0, 2 * n - 1), minlength=2 * n).double()

    def _grow(self, t: float, limit: float) -> float:
        """Double the range from ``t`` until it reaches ``limit``, merging bin pairs (exact)."""
        n = self.bins
        while t < limit:
            merged = self.histogram.view(n, 2).sum(dim=1)
            self.histogram.zero_()
            self.histogram[n // 2 : n // 2 + n] = merged
            t *= 2.0
        return t

    def _synchronize(self) -> None:
        """Exact min/max, then every rank's histogram on the widest grid, summed."""
        super()._synchronize()
        top = self.threshold.clone()
        all_reduce_(top, "max")
        t, limit = float(self.threshold), float(top)
        if t > 0.0 and self._grow(t, limit) != limit:
            raise StateError(
                f"observer {self.name!r}: the ranks' histogram ranges {t:g} and {limit:g} do not "
                "nest; calibrate after the process group is initialised"
            )
        self.threshold.fill_(limit)
        all_reduce_(self.histogram, "sum")

    def _abs_histogram(self) -> torch.Tensor:
        """Counts of ``|x|`` in ``bins`` bins over ``[0, threshold]``."""
        n = self.bins
        return self.histogram[n:] + self.histogram[:n].flip(0)

    def _limits(self) -> tuple[float, float]:
        return min(float(self.min_val), 0.0), max(float(self.max_val), 0.0)

    def _finish(self, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
        lo_lim, hi_lim = self._limits()
        lo, hi = min(max(lo, lo_lim), 0.0), max(min(hi, hi_lim), 0.0)
        dev = self.min_val.device
        return torch.tensor(lo, device=dev), torch.tensor(hi, device=dev)


class PercentileObserver(_HistogramObserver):
    """Clip to a percentile of the streamed histogram (ORT's percentile calibration).

    Symmetric specs: the ``percentile`` of ``|x|``, range ``(-t, t)``. Asymmetric specs:
    ``(100 - percentile) / 2`` % is cut from each tail. Bin edges are chosen so that at most
    that fraction falls outside.
    """

    name = "percentile"

    def __init__(
        self,
        spec: QuantSpec,
        *,
        axis: int | None = None,
        percentile: float = 99.99,
        bins: int = 2048,
    ) -> None:
        super().__init__(spec, axis=axis, bins=bins)
        if not isinstance(percentile, (int, float)) or not 50 <= percentile <= 100:
            raise ConfigError(f"percentile must be a number in [50, 100], got {percentile!r}")
        self.percentile = float(percentile)

    def _compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        t, n = float(self.threshold), self.bins
        width = t / n
        if self.spec.symmetric:
            cdf = _cdf(self._abs_histogram())
            idx = _first_at_least(cdf, self.percentile / 100)
            return self._finish(-(idx + 1) * width, (idx + 1) * width)
        cdf, cut = _cdf(self.histogram), (100 - self.percentile) / 200
        left, right = _first_at_least(cdf, cut), _first_at_least(cdf, 1 - cut)
        return self._finish(-t + left * width, -t + (right + 1) * width)


def _power_of_two_above(value: float) -> float:
    """The smallest power of two ``>= value`` (``value`` itself for 0)."""
    if value <= 0.0:
        return value
    mantissa, exponent = math.frexp(value)  # value = mantissa * 2**exponent, 0.5 <= mantissa < 1
    return value if mantissa == 0.5 else math.ldexp(1.0, exponent)


def _cdf(hist: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(hist, 0) / hist.sum()


def _first_at_least(cdf: torch.Tensor, q: float) -> int:
    idx = int(torch.searchsorted(cdf, torch.tensor([q], dtype=cdf.dtype, device=cdf.device)))
    return min(idx, cdf.numel() - 1)


class MSEObserver(_HistogramObserver):
    """Clip to the range minimising the expected squared quantization error on the histogram.

    Each bin's count is spread uniformly over the bin and the error of a candidate range is
    integrated exactly under that model (rounding inside the candidate's grid, clipping outside
    it, using the candidate's real qparams). Symmetric specs search ``t`` on 128 steps of
    ``max|x|``, asymmetric specs ``(lo, hi)`` on a 33 x 33 grid (on 16x merged bins), then
    refine around the best point on 2x merged bins. All values count, outliers included: a few
    far outliers among few samples keep the range wide.
    """

    name = "mse"

    def _compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo_lim, hi_lim = self._limits()
        if lo_lim == hi_lim:
            return self._finish(0.0, 0.0)
        coarse, fine = self._bins(merge=16), self._bins(merge=2)
        if self.spec.symmetric:
            t_lim = max(-lo_lim, hi_lim)
            ts = torch.linspace(t_lim / 128, t_lim, 128, dtype=torch.float64)
            _, t = self._best(coarse, -ts, ts)
            ts = torch.linspace(t - t_lim / 128, t + t_lim / 128, 33, dtype=torch.float64)
            ts = ts.clamp(t_lim / 1024, t_lim)
            return self._finish(*self._best(fine, -ts, ts))
        grid = torch.linspace(0, 1, 33, dtype=torch.float64)
        lo, hi = self._best(coarse, *_pairs(grid * lo_lim, grid * hi_lim))
        d_lo, d_hi = lo_lim / 32, hi_lim / 32
        los = torch.linspace(lo - d_lo, lo + d_lo, 17, dtype=torch.float64).clamp(lo_lim, 0)
        his = torch.linspace(hi - d_hi, hi + d_hi, 17, dtype=torch.float64).clamp(0, hi_lim)
        return self._finish(*self._best(fine, *_pairs(los, his)))

    def _bins(self, merge: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Non-empty bins as (counts, left edges, right edges), ``merge`` bins merged."""
        counts = self.histogram.view(-1, merge).sum(dim=1)
        t = float(self.threshold)
        edges = torch.linspace(-t, t, counts.numel() + 1, dtype=torch.float64, device=counts.device)
        used = counts > 0
        return counts[used], edges[:-1][used], edges[1:][used]

    def _best(self, bins, los: torch.Tensor, his: torch.Tensor) -> tuple[float, float]:
        keep = his - los > 0
        los, his = los[keep].to(bins[0].device), his[keep].to(bins[0].device)
        step = max(1, _CHUNK_ELEMENTS // max(1, bins[0].numel()))
        errors = torch.cat(
            [
                self._error(bins, los[i : i + step], his[i : i + step])
                for i in range(0, los.numel(), step)
            ]
        )
        best = int(torch.argmin(errors))
        return float(los[best]), float(his[best])

    def _error(self, bins, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Expected sum of squared errors of each candidate range ``[lo[i], hi[i]]``."""
        counts, a, b = bins
        scale, zp = qparams_from_range(lo, hi, self.spec)
        step = scale.double()[:, None]
        g_lo = (self.spec.qmin - zp.double()[:, None]) * step  # the grid's ends
        g_hi = (self.spec.qmax - zp.double()[:, None]) * step
        below = torch.minimum(torch.maximum(g_lo, a), b)  # [a, below] clips to g_lo
        above = torch.maximum(torch.minimum(g_hi, b), a)  # [above, b] clips to g_hi
        clip = (g_lo - a) ** 3 - (g_lo - below) ** 3 + (b - g_hi) ** 3 - (above - g_hi) ** 3
        inner = _sawtooth_integral(above, step) - _sawtooth_integral(below, step)
        inner = torch.where(above > below, inner, torch.zeros_like(inner))
        return ((clip / 3 + inner) * (counts / (b - a))).sum(dim=1)


def _pairs(los: torch.Tensor, his: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = torch.meshgrid(los, his, indexing="ij")
    return lo.reshape(-1), hi.reshape(-1)


def _sawtooth_integral(u: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``∫ (s - step * round(s / step))**2 ds`` from ``-step/2`` to ``u`` (a rounding-error CDF)."""
    v = u / step + 0.5
    periods = torch.floor(v)
    r = (v - periods - 0.5) * step
    return periods * step**3 / 12 + (r**3 + (step / 2) ** 3) / 3


class EntropyObserver(_HistogramObserver):
    """KL-divergence calibration as TensorRT's (``pytorch-quantization`` entropy method).

    On the ``|x|`` histogram (``bins`` bins, default 2048; its first bin is replaced by the
    second as TensorRT does, so a spike of exact zeros does not dominate), every threshold of
    ``i`` bins, ``n_q <= i <= bins``, is scored: the reference ``p`` is the first ``i`` bins
    with the tail added to the last; ``q`` merges those bins into ``n_q`` quantization bins and
    spreads each back evenly over its non-empty bins. The threshold with minimal ``KL(p || q)``
    wins; ties (scores within 1e-12 nats: exact ties that rounding splits) go to the largest.
    ``n_q`` is the number of codes on one side of zero (128 for int8), or all codes for
    asymmetric specs on non-negative data. The range is ``(-t, t)``
    clipped to the data. The smallest threshold it can pick is ``n_q / bins * max|x|``: raise
    ``bins`` when outliers lie more than ``bins / n_q`` times beyond the bulk. ONNX Runtime's
    ``EntropyCalibrater`` is a variant (it splits ``num_quantized_bins`` over both signs).
    """

    name = "entropy"

    def _compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        levels = self.spec.qmax - self.spec.qmin + 1
        one_sided = not self.spec.symmetric and float(self.min_val) >= 0
        n_q = levels if one_sided else levels // 2
        hist = self._abs_histogram().clone()
        hist[0] = hist[1]
        if float(self.threshold) == 0.0 or n_q >= self.bins:
            return self._finish(-float(self.threshold), float(self.threshold))
        cands = torch.arange(n_q, self.bins + 1, device=hist.device)
        kl = torch.cat([_kl_scores(hist, c, n_q) for c in cands.split(_KL_CANDIDATES)])
        # ties (exact KL equalities the prefix sums round apart) go to the largest threshold
        ties = torch.nonzero(kl <= kl.min() + _KL_TIE)
        best = int(ties[-1]) if ties.numel() else cands.numel() - 1
        t = int(cands[best]) * float(self.threshold) / self.bins
        return self._finish(-t, t)


def _kl_scores(hist: torch.Tensor, widths: torch.Tensor, n_q: int) -> torch.Tensor:
    """KL(p || q) of keeping the first ``w`` bins of ``hist``, for each ``w`` in ``widths``.

    Computed per quantization bin from prefix sums: with ``S_j`` the count and ``C_j`` the
    non-empty bins of group ``j``, ``sum_k p_k log q_k = sum_j S_j log(S_j / C_j)`` plus the
    tail's term, so each candidate costs O(n_q) instead of O(bins).
    """
    zero = hist.new_zeros(1)
    total = hist.sum()
    cum = torch.cat([zero, torch.cumsum(hist, 0)])
    cnt = torch.cat([zero, torch.cumsum((hist > 0).double(), 0)])
    plogp = torch.cat([zero, torch.cumsum(torch.xlogy(hist, hist), 0)])
    w = widths[:, None]
    edges = (torch.arange(n_q + 1, device=hist.device)[None, :] * w + n_q - 1) // n_q
    sums = cum[edges[:, 1:]] - cum[edges[:, :-1]]
    nonempty = (cnt[edges[:, 1:]] - cnt[edges[:, :-1]]).clamp(min=1)
    last, tail = hist[widths - 1], total - cum[widths]
    q_last = sums[:, -1] / nonempty[:, -1]
    p_log_q = torch.xlogy(sums, sums / nonempty).sum(dim=1) + torch.xlogy(tail, q_last)
    p_log_p = plogp[widths - 1] + torch.xlogy(last + tail, last + tail)
    kl = (p_log_p - p_log_q) / total + torch.log((total - tail) / total)
    # p > 0 where q == 0 (tail folded onto an empty bin) gives inf, as scipy's entropy does
    return torch.where((last == 0) & (tail > 0), torch.full_like(kl, float("inf")), kl)


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}


def make_observer(name: str, spec: QuantSpec, **kwargs: Any) -> Observer:
    """Build the observer registered under ``name`` in :data:`OBSERVERS`."""
    if name not in OBSERVERS:
        raise ConfigError(f"unknown observer {name!r}; valid names: {', '.join(sorted(OBSERVERS))}")
    cls = OBSERVERS[name]
    options = [p for p in inspect.signature(cls).parameters if p != "spec"]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ConfigError(
            f"observer {name!r} got unknown option(s) {', '.join(unknown)}; "
            f"valid: {', '.join(options)}"
        )
    return cls(spec, **kwargs)

"""Emulate the int16 pair saturation of x86 uint8 x int8 kernels without VNNI.

ONNX Runtime's integer GEMM and convolution kernels for AVX2 (and AVX-512BW without VNNI) multiply
uint8 activation codes ``a`` by int8 weight codes ``w`` with ``vpmaddubsw``: two adjacent products
along the reduction axis ``K`` are added into a *saturating* int16, then ``vpmaddwd`` with ones
widens pairs of those into the exact int32 accumulator::

    acc = sum_j clamp(a[2j] * w[2j] + a[2j+1] * w[2j+1], -32768, 32767)

A single product always fits (``255 * 127 = 32385``) but a pair need not (``2 * 255 * 127 =
64770``). No pair can leave int16 when activation codes stay in 7 bits (``2 * 127 * 127 = 32258``,
slimkit's ``reduce_range``) or weight codes in ``[-64, 64]`` (``2 * 255 * 64 = 32640``, the 7-bit
weights of ONNX Runtime's own ``reduce_range``). VNNI (``vpdpbusd``: AVX512-VNNI, AVX-VNNI) and
AMX accumulate each product exactly in int32, and MLAS's depthwise convolution kernel widens to
int32 before multiplying, so neither saturates.

The codes are the raw stored ones: the activation zero point is corrected afterwards from row
sums, so an input with zero point 128 feeds codes near 128 even for values near 0.

Convolutions are lowered to a matrix whose ``K`` axis is laid out ``(kh, kw, c)`` (NHWC, as ONNX
Runtime's ``QLinearConv`` runs on x86) and padded with the input zero point, as the kernel pads.
For MLAS's symmetric conv kernel (input channels a multiple of 4) pairs never straddle two kernel
positions, and for the im2col + QGEMM fallback they are adjacent ``K`` entries; this layout gives
both. Which pairs a kernel forms is an implementation detail of MLAS: the rates computed here are
an emulation, not a measurement.

Two remedies keep the fast kernels; both are explicit options:

* ``StaticQuantizationConfig(reduce_range=True)``: 7-bit activation codes on every quantized
  tensor. Each ``QuantizeLinear`` gets a ``Clip`` to 127 that ONNX Runtime runs as a separate op
  (about +25% latency at batch 1 on the digits models), every activation loses a bit, and a
  ReLU6 before it blocks the ``QLinearConv`` fusion unless the exported graph goes through
  :func:`slimkit.export.clips.drop_redundant_clips`.
* :func:`reduce_weight_range_`: 7-bit weight codes ``[-63, 63]`` on chosen layers of a calibrated
  model, by default every layer that runs the u8s8 kernel; pass the layers that
  :func:`saturation_report` finds saturating on calibration data for "where needed" (best
  fidelity, but a layer that saturates only on other data stays exposed). Weights are constants,
  so the graph and its speed do not change.

Default: full 8-bit codes (``reduce_range=False``, no weight reduction), right wherever
:func:`needs_reduce_range` is False (VNNI, AMX, ARM). Where it is True (x86 with AVX2 or
AVX-512BW but no VNNI), call ``reduce_weight_range_(technique)`` after ``calibrate``: it removes
saturation at no speed cost, while letting pairs saturate raised the KL divergence to the fp32
outputs 50-160x on the digits models (``benchmarks/quant_digits.py``).

>>> a = torch.tensor([[255, 255]], dtype=torch.uint8)
>>> w = torch.tensor([[127, 127]], dtype=torch.int8)
>>> r = pair_saturation(a, w)
>>> r.saturated_pairs, int(r.exact[0, 0]), int(r.emulated[0, 0])
(1, 64770, 32767)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.errors import ConfigError, StateError, UnsupportedModuleError

if TYPE_CHECKING:
    from slimkit.quant.ptq import StaticQuantization

__all__ = [
    "INT16_MAX",
    "INT16_MIN",
    "LayerSaturation",
    "PairSaturation",
    "SaturationReport",
    "conv_input_matrix",
    "conv_weight_matrix",
    "emulate_u8s8_saturation",
    "input_qparams",
    "needs_reduce_range",
    "pair_can_saturate",
    "pair_saturation",
    "reduce_weight_range_",
    "saturation_report",
]

INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1
_CHUNK_ELEMENTS = 2**19  # pair sums held at once by pair_saturation (cache-sized)
_SAFE_ISA = ("avx512_vnni", "avx_vnni", "amx")


@dataclasses.dataclass(frozen=True)
class PairSaturation:
    """Result of :func:`pair_saturation` for ``R`` rows and ``M`` output channels.

    ``exact`` and ``emulated`` are the ``(R, M)`` int64 accumulators without and with int16
    saturation of each pair; ``pairs`` counts every pair computed (``R * M * ceil(K / 2)``).
    """

    pairs: int
    saturated_pairs: int
    exact: torch.Tensor
    emulated: torch.Tensor

    @property
    def rate(self) -> float:
        """Fraction of pair sums that saturated."""
        return self.saturated_pairs / self.pairs if self.pairs else 0.0

    @property
    def error(self) -> torch.Tensor:
        """``emulated - exact`` per accumulator (int64)."""
        return self.emulated - self.exact

    @property
    def affected_fraction(self) -> float:
        """Fraction of accumulators that differ from the exact sum."""
        return float((self.error != 0).double().mean()) if self.error.numel() else 0.0


def _as_codes(x: torch.Tensor, lo: int, hi: int, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfigError(f"{what} must be a 2-D tensor, got {shape}")
    if x.is_floating_point() and not bool((x == torch.round(x)).all()):
        raise ConfigError(f"{what} must hold integer codes, got non-integer values")
    codes = x.to(torch.int32)
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ConfigError(
            f"{what} must lie in [{lo}, {hi}], got [{int(codes.min())}, {int(codes.max())}]"
        )
    return codes


def pair_saturation(activations: torch.Tensor, weights: torch.Tensor) -> PairSaturation:
    """Accumulate ``activations @ weights.T`` as an AVX2 u8 x s8 kernel does.

    Args:
        activations: ``(R, K)`` uint8 codes (any integer dtype, values in ``[0, 255]``).
        weights: ``(M, K)`` int8 codes (values in ``[-128, 127]``).

    Products of adjacent ``K`` entries ``(0, 1), (2, 3), ...`` are summed in pairs, each pair
    clamped to int16, then accumulated exactly; an odd ``K`` is padded with a zero product.
    The exact sums come from one float64 matrix product (exact at these magnitudes); pair sums
    are formed, in chunks, only for rows where some ``a0 * max_m |w0| + a1 * max_m |w1|`` (a
    bound on ``|a0 * w0 + a1 * w1|``) exceeds int16, so typical activations cost little.
    """
    a = _as_codes(activations, 0, 255, "activations")
    w = _as_codes(weights, -128, 127, "weights")
    if a.shape[1] != w.shape[1]:
        raise ConfigError(
            f"activations have K={a.shape[1]} but weights have K={w.shape[1]}; they must match"
        )
    if a.shape[1] % 2:
        a, w = F.pad(a, (0, 1)), F.pad(w, (0, 1))
    rows, k = a.shape
    m, half = w.shape[0], k // 2
    exact = torch.round(a.double() @ w.double().T).to(torch.int64)
    a0, a1, w0, w1 = a[:, 0::2], a[:, 1::2], w[:, 0::2], w[:, 1::2]
    if m:  # |a0 * w0 + a1 * w1| <= a0 * max_m |w0| + a1 * max_m |w1|
        bound = a0 * w0.abs().amax(dim=0) + a1 * w1.abs().amax(dim=0)
    else:
        bound = torch.zeros_like(a0)
    candidates = torch.nonzero((bound > INT16_MAX).any(dim=1)).flatten()  # rows to check
    error = torch.zeros(rows, m, dtype=torch.int64)
    saturated = 0
    step = max(1, _CHUNK_ELEMENTS // max(1, m * half))
    for start in range(0, candidates.numel(), step):
        r = candidates[start : start + step]
        sums = a0[r, None, :] * w0[None] + a1[r, None, :] * w1[None]  # (c, M, K/2)
        delta = sums.clamp(INT16_MIN, INT16_MAX) - sums
        saturated += int(torch.count_nonzero(delta))
        error[r] = delta.sum(dim=-1, dtype=torch.int64)
    return PairSaturation(
        pairs=rows * m * half, saturated_pairs=saturated, exact=exact, emulated=exact + error
    )


def pair_can_saturate(activation_qmax: int, weight_absmax: int) -> bool:
    """Whether two products of codes up to ``activation_qmax`` and ``|w| <= weight_absmax``
    can leave int16 (``2 * activation_qmax * weight_absmax > 32767``; 128 for int8's -128)."""
    return 2 * activation_qmax * weight_absmax > INT16_MAX


def needs_reduce_range(isa: Mapping[str, bool | None] | None = None) -> bool:
    """True on an x86 CPU with AVX2 but none of AVX512-VNNI, AVX-VNNI or AMX-INT8.

    ``isa`` is the ``"isa"`` entry of :func:`slimkit.measure.latency.cpu_info` (read from this
    machine when None). Unknown flags (non-Linux) and non-x86 CPUs give False: ARM's int8 dot
    products and VNNI accumulate in 32 bits.
    """
    if isa is None:
        from slimkit.measure.latency import cpu_info

        isa = cpu_info()["isa"]
    if not isa.get("avx2"):
        return False
    return not any(isa.get(flag) for flag in _SAFE_ISA)


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def conv_input_matrix(codes: torch.Tensor, conv: nn.Conv2d, zero_point: int) -> torch.Tensor:
    """im2col of uint8 ``codes`` ``(N, C, H, W)`` for ``conv``: ``(groups, N * L, kh * kw * C/g)``.

    Rows are output positions ``(n, oh, ow)``; ``K`` is ordered ``(kh, kw, c)`` and the border is
    padded with ``zero_point`` (the code of 0.0). ``padding_mode`` must be ``"zeros"``.
    """
    if not isinstance(conv, nn.Conv2d):
        raise UnsupportedModuleError(f"conv_input_matrix needs an nn.Conv2d, got {type(conv)}")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise UnsupportedModuleError(
            f"conv_input_matrix supports numeric zero padding, got padding={conv.padding!r} "
            f"padding_mode={conv.padding_mode!r}"
        )
    if codes.dim() != 4 or codes.shape[1] != conv.in_channels:
        raise ConfigError(
            f"codes must be (N, {conv.in_channels}, H, W) for this conv, got {tuple(codes.shape)}"
        )
    kh, kw = _pair(conv.kernel_size)
    ph, pw = _pair(conv.padding)
    x = F.pad(codes.to(torch.float32), (pw, pw, ph, ph), value=float(zero_point))
    cols = F.unfold(x, (kh, kw), dilation=conv.dilation, stride=conv.stride)  # (N, C*kh*kw, L)
    n, _, length = cols.shape
    g = conv.groups
    cols = cols.reshape(n, g, conv.in_channels // g, kh * kw, length)
    cols = cols.permute(1, 0, 4, 3, 2).reshape(g, n * length, kh * kw * (conv.in_channels // g))
    return cols.round().to(torch.int32)


def conv_weight_matrix(codes: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Weight codes ``(M, C/g, kh, kw)`` as ``(groups, M/g, kh * kw * C/g)``, ``K`` as
    :func:`conv_input_matrix` lays it out."""
    if codes.dim() != 4 or codes.shape[0] % groups:
        raise ConfigError(
            f"weight codes must be (M, C/g, kh, kw) with M divisible by groups={groups}, "
            f"got {tuple(codes.shape)}"
        )
    m = codes.shape[0]
    return codes.permute(0, 2, 3, 1).reshape(groups, m // groups, -1).to(torch.int32)


@dataclasses.dataclass
class LayerSaturation:
    """Running saturation statistics of one layer under :func:`emulate_u8s8_saturation`."""

    kernel: str
    pairs: int = 0
    saturated_pairs: int = 0
    outputs: int = 0
    affected_outputs: int = 0
    max_error_codes: int = 0

    @property
    def rate(self) -> float:
        return self.saturated_pairs / self.pairs if self.pairs else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rate": self.rate}


@dataclasses.dataclass
class SaturationReport:
    """Per-layer :class:`LayerSaturation` (``kernel`` is ``"u8s8"`` or ``"int32"``)."""

    layers: dict[str, LayerSaturation] = dataclasses.field(default_factory=dict)

    @property
    def pairs(self) -> int:
        return sum(s.pairs for s in self.layers.values())

    @property
    def saturated_pairs(self) -> int:
        return sum(s.saturated_pairs for s in self.layers.values())

    @property
    def rate(self) -> float:
        """Saturated fraction of all pair sums in the u8s8 layers."""
        return self.saturated_pairs / self.pairs if self.pairs else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "pairs": self.pairs,
            "saturated_pairs": self.saturated_pairs,
            "layers": {name: s.to_dict() for name, s in self.layers.items()},
        }


def _weight_codes(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    from slimkit.quant.fake import quantizer_of

    wq = quantizer_of(module, "weight")
    if wq is None or not wq.is_calibrated:
        raise UnsupportedModuleError(
            f"{type(module).__name__} has no calibrated slimkit weight quantizer"
        )
    weight = module.weight.detach()
    scale = wq.scale.reshape(-1, *([1] * (weight.dim() - 1))) if wq.axis is not None else wq.scale
    codes = torch.round(weight / scale).to(torch.int32)
    channel_scale = wq.scale.expand(weight.shape[0]) if wq.axis is None else wq.scale
    return codes, channel_scale.to(torch.float64)


def _is_depthwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def _hook(name: str, scale: float, zero_point: int, stats: LayerSaturation):
    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0].detach()
        a = torch.round(x / scale + zero_point).clamp(0, 255).to(torch.int32)
        w, w_scale = _weight_codes(module)
        if isinstance(module, nn.Linear):
            a_mats, w_mats = a.reshape(1, -1, a.shape[-1]), w.unsqueeze(0)
        else:
            a_mats = conv_input_matrix(a, module, zero_point)
            w_mats = conv_weight_matrix(w, module.groups)
        errors = []
        for a_g, w_g in zip(a_mats, w_mats, strict=True):
            result = pair_saturation(a_g, w_g)
            stats.pairs += result.pairs
            stats.saturated_pairs += result.saturated_pairs
            errors.append(result.error)
        error = torch.cat(errors, dim=1)  # (rows, M), groups in channel order
        stats.outputs += error.numel()
        stats.affected_outputs += int((error != 0).sum())
        if error.numel():
            stats.max_error_codes = max(stats.max_error_codes, int(error.abs().max()))
        delta = (error.double() * scale * w_scale).to(output.dtype)  # real units
        if isinstance(module, nn.Linear):
            return output + delta.reshape(output.shape)
        n, m, oh, ow = output.shape
        return output + delta.reshape(n, oh, ow, m).permute(0, 3, 1, 2)

    return hook


@contextlib.contextmanager
def emulate_u8s8_saturation(
    model: nn.Module, input_qparams: Mapping[str, tuple[float, int]]
) -> Iterator[SaturationReport]:
    """Run a calibrated fake-quant model as an AVX2 (non-VNNI) CPU would: with pair saturation.

    ``input_qparams`` maps each quantized Conv2d/Linear (by module name) to its input's
    ``(scale, zero_point)``, e.g. from ``StaticQuantization.summary()`` rows. Inside the
    ``with`` block every such layer adds to its output the accumulator error that saturation
    causes, ``(emulated - exact) * input_scale * weight_scale``, before the next quantizer
    rounds it; depthwise convolutions are left exact (MLAS's depthwise kernel is int32). The
    yielded :class:`SaturationReport` fills as batches run. Hooks are removed on exit.
    """
    report = SaturationReport()
    handles = []
    modules = dict(model.named_modules())
    try:
        for name, (scale, zero_point) in input_qparams.items():
            module = modules.get(name)
            if module is None:
                raise ConfigError(f"input_qparams names {name!r}, which is not a module")
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                raise UnsupportedModuleError(
                    f"{name!r} is {type(module).__name__}; only Conv2d and Linear are emulated"
                )
            if _is_depthwise(module):
                report.layers[name] = LayerSaturation(kernel="int32")
                continue
            report.layers[name] = stats = LayerSaturation(kernel="u8s8")
            hook = _hook(name, float(scale), int(zero_point), stats)
            handles.append(module.register_forward_hook(hook))
        yield report
    finally:
        for handle in handles:
            handle.remove()


def input_qparams(technique: StaticQuantization) -> dict[str, tuple[float, int]]:
    """``{layer: (input_scale, input_zero_point)}`` of a calibrated ``StaticQuantization``."""
    if not technique.calibrated:
        raise StateError("input_qparams needs a calibrated StaticQuantization")
    return {row[0]: (float(row[3]), int(row[4])) for row in technique.summary().rows}


@torch.no_grad()
def saturation_report(
    model: nn.Module, qparams: Mapping[str, tuple[float, int]], batches: Iterable[Any]
) -> SaturationReport:
    """Run ``batches`` (tensors or ``(inputs, ...)`` tuples) through ``model`` in eval mode under
    :func:`emulate_u8s8_saturation` and return what saturated, layer by layer."""
    training = model.training
    model.eval()
    try:
        with emulate_u8s8_saturation(model, qparams) as report:
            for batch in batches:
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        model.train(training)
    return report


@torch.no_grad()
def reduce_weight_range_(
    technique: StaticQuantization, layers: Iterable[str] | None = None
) -> list[str]:
    """Re-quantize the weights of ``layers`` of a calibrated model onto 7-bit codes ``[-63, 63]``.

    ``layers`` are module names among the technique's selection; None means every Conv/Linear
    that runs the u8s8 kernel (all but depthwise convolutions). Each layer's per-channel weight
    scale is recomputed for the narrower grid (``bits`` stays 8, so ``export_qdq`` writes int8
    codes that never exceed 63 in magnitude) and its int32 bias grid follows. With uint8
    activations no pair can then leave int16 (``2 * 255 * 63 = 32130``). Returns the names
    changed, in model order. Works in place; call it after ``calibrate`` and before export.
    """
    from slimkit.quant.fake import quantizer_of

    if not technique.calibrated:
        raise StateError("reduce_weight_range_ needs a calibrated StaticQuantization")
    selected = dict(technique.selection.selected)
    if layers is None:
        wanted = [n for n, m in selected.items() if not _is_depthwise(m)]
    else:
        wanted = list(dict.fromkeys(layers))
        unknown = [n for n in wanted if n not in selected]
        if unknown:
            raise ConfigError(
                f"reduce_weight_range_: {', '.join(map(repr, unknown))} not quantized by this "
                f"technique; quantized layers: {', '.join(selected)}"
            )
    scales = input_qparams(technique)
    for name in wanted:
        module = selected[name]
        wq = quantizer_of(module, "weight")
        wq.spec = dataclasses.replace(wq.spec, reduce_range=True)
        wq.freeze(module.parametrizations.weight.original)
        bq = quantizer_of(module, "bias")
        if bq is not None:
            bq.freeze(torch.tensor(scales[name][0]), wq.scale)
    return [n for n in selected if n in wanted]

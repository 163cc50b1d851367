"""Affine (uniform integer) quantization math: small pure functions on tensors.

The representation is the one used by TFLite, ONNX ``QuantizeLinear``/``DequantizeLinear`` and
ONNX Runtime (ORT)::

    q = clamp(round(x / scale) + zero_point, qmin, qmax)     # round half to even
    x_hat = (q - zero_point) * scale

``x / scale`` is a true division in float32, as ORT computes it. ``torch.fake_quantize_*``
multiplies by ``1 / scale`` instead, so the two can differ by one step on values that sit within
one float32 ulp of a rounding tie; with power-of-two scales they agree exactly.

Layouts: *per_tensor* uses one scale; *per_channel* one scale per index of ``axis`` (a 1-D
``scale`` of length ``x.shape[axis]``); *per_group* (weight-only) one scale per ``group_size``
consecutive values of the last dim (``scale.shape == (*x.shape[:-1], x.shape[-1] // group_size)``,
ONNX's blocked quantization with ``axis=-1``).

>>> spec = QuantSpec(bits=8, signed=True)
>>> scale, zero_point = qparams_from_range(-1.0, 3.0, spec)
>>> quantize(torch.tensor([-1.0, 0.0, 3.0]), scale, zero_point, spec).tolist()
[-128, -64, 127]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from slimkit.errors import ConfigError

__all__ = [
    "GRANULARITIES",
    "QuantSpec",
    "dequantize",
    "dequantize_per_group",
    "fake_quantize",
    "pack_int4",
    "qparams_from_range",
    "quantize",
    "quantize_per_group",
    "tensor_range",
    "unpack_int4",
]

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """What integer grid a tensor is quantized to.

    Attributes:
        bits: integer width, 2..8. Codes are stored in int8 (signed) or uint8 (unsigned).
        signed: signed codes ``[-2**(bits-1), 2**(bits-1) - 1]``, else ``[0, 2**bits - 1]``.
        symmetric: the range is made symmetric around 0 and ``zero_point`` is the midpoint of the
            grid: 0 when signed, ``2**(bits-1)`` when unsigned (ORT's 128 for uint8).
        granularity: "per_tensor", "per_channel" or "per_group".
        axis: channel axis for per_channel.
        group_size: values per group along the last dim; required for (only for) per_group.
        narrow_range: drop the most negative code, giving the restricted signed symmetric range
            ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` (ORT's symmetric int8 range); needs
            ``signed`` and ``symmetric``.
        reduce_range: use the range of ``bits - 1`` bits (uint8 -> [0, 127], int8 -> [-64, 63]),
            for CPUs without VNNI where u8*s8 pair sums would saturate int16. ORT's table says
            [-64, 64] for int8; we use the exact 7-bit range as ``torch.ao`` does. Combined with
            ``narrow_range`` int8 becomes [-63, 63]. Needs ``bits >= 3``.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = False
    granularity: str = "per_tensor"
    axis: int = 0
    group_size: int | None = None
    narrow_range: bool = False
    reduce_range: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or not 2 <= self.bits <= 8:
            raise ConfigError(f"bits must be an integer in [2, 8], got {self.bits!r}")
        for name in ("signed", "symmetric", "narrow_range", "reduce_range"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}"
            )
        if not _is_int(self.axis):
            raise ConfigError(f"axis must be an integer, got {self.axis!r}")
        if self.granularity == "per_group":
            if not _is_int(self.group_size) or self.group_size < 1:
                raise ConfigError(
                    f"group_size must be a positive integer for per_group, got {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise ConfigError(
                f"group_size is only valid with granularity='per_group', got {self.group_size!r}"
                f" with {self.granularity!r}"
            )
        if self.narrow_range and not (self.signed and self.symmetric):
            raise ConfigError("narrow_range needs signed=True and symmetric=True, got otherwise")
        if self.reduce_range and self.bits < 3:
            raise ConfigError(f"reduce_range needs bits >= 3, got bits={self.bits}")

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        bits = self.bits - 1 if self.reduce_range else self.bits
        if not self.signed:
            return 0
        return -(2 ** (bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        bits = self.bits - 1 if self.reduce_range else self.bits
        return 2 ** (bits - 1) - 1 if self.signed else 2**bits - 1

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the codes: int8 if signed else uint8."""
        return torch.int8 if self.signed else torch.uint8

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields; ``QuantSpec.from_dict(spec.to_dict()) == spec``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        """Build from a dict, rejecting unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            valid = ", ".join(sorted(known))
            raise ConfigError(f"unknown QuantSpec field(s) {', '.join(unknown)}; valid: {valid}")
        return cls(**data)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def qparams_from_range(
    min_val: torch.Tensor | float, max_val: torch.Tensor | float, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) covering ``[min_val, max_val]``, ORT's way.

    The range is first extended to include 0 (so 0 is exact), then made symmetric if
    ``spec.symmetric``. ``scale = (max - min) / (qmax - qmin)`` computed in float64;
    ``zero_point = round(qmin - min / scale)`` (asymmetric) or the grid midpoint
    ``round((qmin + qmax) / 2)`` (symmetric), always an integer in ``[qmin, qmax]``. A range
    whose scale would be below float32's smallest normal (e.g. all zeros) gives ``scale = 1``
    and ``zero_point = 0``, or the grid midpoint when symmetric. This equals ORT's
    ``quant_utils.compute_scale_zp`` elementwise, except that ORT gives 0 instead of 128 for an
    all-zero unsigned symmetric range (we keep every channel's zero point equal). Outputs have
    the broadcast shape of the inputs (per-channel ranges give per-channel qparams).
    """
    lo = torch.as_tensor(min_val).detach().to(torch.float64)
    hi = torch.as_tensor(max_val).detach().to(torch.float64)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ConfigError("min_val and max_val must be finite, got nan or inf")
    if (lo > hi).any():
        raise ConfigError("min_val must be <= max_val elementwise, got min_val > max_val")
    lo, hi = torch.broadcast_tensors(torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0))
    if spec.symmetric:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    qmin, qmax = spec.qmin, spec.qmax
    scale = (hi - lo) / (qmax - qmin)
    degenerate = scale < _TINY
    safe = torch.where(degenerate, torch.ones_like(scale), scale)
    if spec.symmetric:
        zp = torch.full_like(scale, round((qmin + qmax) / 2))
    else:
        zp = torch.round(qmin - lo / safe).clamp(qmin, qmax)
        zp = torch.where(degenerate, torch.zeros_like(zp), zp)
    return safe.to(torch.float32), zp.to(torch.int32)


def _resolve_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ConfigError(f"axis {axis} is out of range for a tensor with {ndim} dims")
    return axis % ndim


def _broadcast_qparams(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshape per-tensor or per-channel qparams so they broadcast against ``x``."""
    scale, zero_point = torch.as_tensor(scale), torch.as_tensor(zero_point)
    if axis is None:
        if scale.numel() != 1 or zero_point.numel() != 1:
            raise ConfigError(
                f"per-tensor quantization needs one scale and zero_point, got scale of shape "
                f"{tuple(scale.shape)}; pass axis for per-channel"
            )
        return scale.reshape(()), zero_point.reshape(())
    dim = _resolve_axis(axis, x.ndim)
    channels = x.shape[dim]
    if scale.numel() != channels or zero_point.numel() != channels:
        raise ConfigError(
            f"per-channel quantization along axis {axis} of shape {tuple(x.shape)} needs "
            f"{channels} scales and zero points, got {scale.numel()} and {zero_point.numel()}"
        )
    shape = [1] * x.ndim
    shape[dim] = channels
    return scale.reshape(shape), zero_point.reshape(shape)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _quantize(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, spec: QuantSpec):
    dtype = _compute_dtype(x)
    q = torch.round(x.to(dtype) / scale.to(dtype)) + zp.to(dtype)
    return q.clamp(spec.qmin, spec.qmax).to(spec.dtype)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    dtype = scale.dtype if scale.dtype.is_floating_point else torch.float32
    return (q.to(dtype) - zp.to(dtype)) * scale.to(dtype)


def _spec_axis(spec: QuantSpec, axis: int | None) -> int | None:
    if axis is None and spec.granularity == "per_channel":
        return spec.axis
    return axis


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    spec: QuantSpec,
    axis: int | None = None,
) -> torch.Tensor:
    """Integer codes of ``x`` (int8 if ``spec.signed`` else uint8), ONNX ``QuantizeLinear``.

    ``axis`` selects per-channel qparams and defaults to ``spec.axis`` for per_channel specs;
    per_group specs dispatch to :func:`quantize_per_group`.
    """
    if spec.granularity == "per_group":
        return quantize_per_group(x, scale, zero_point, spec)
    scale, zero_point = _broadcast_qparams(x, scale, zero_point, _spec_axis(spec, axis))
    return _quantize(x, scale, zero_point, spec)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None = None
) -> torch.Tensor:
    """Real values ``(q - zero_point) * scale`` in scale's float dtype (ONNX ``DequantizeLinear``).

    ``axis=None`` means one scale for the whole tensor; otherwise one per index of ``axis``.
    """
    scale, zero_point = _broadcast_qparams(q, scale, zero_point, axis)
    return _dequantize(q, scale, zero_point)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    spec: QuantSpec,
    axis: int | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype; any granularity (see :func:`quantize`)."""
    if spec.granularity == "per_group":
        q = quantize_per_group(x, scale, zero_point, spec)
        out = dequantize_per_group(q, scale, zero_point, spec.group_size)
    else:
        s, z = _broadcast_qparams(x, scale, zero_point, _spec_axis(spec, axis))
        out = _dequantize(_quantize(x, s, z, spec), s, z)
    return out.to(x.dtype) if x.dtype.is_floating_point else out


def _group_view(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    if not _is_int(group_size) or group_size < 1:
        raise ConfigError(f"group_size must be a positive integer, got {group_size!r}")
    if x.ndim == 0 or x.shape[-1] % group_size:
        raise ConfigError(
            f"per-group quantization needs the last dim of shape {tuple(x.shape)} to be "
            f"divisible by group_size={group_size}"
        )
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def _group_qparams(
    xg: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    expected = tuple(xg.shape[:-1])
    scale, zero_point = torch.as_tensor(scale), torch.as_tensor(zero_point)
    if tuple(scale.shape) != expected or tuple(zero_point.shape) != expected:
        raise ConfigError(
            f"per-group scale and zero_point must have shape {expected}, got "
            f"{tuple(scale.shape)} and {tuple(zero_point.shape)}"
        )
    return scale.unsqueeze(-1), zero_point.unsqueeze(-1)


def quantize_per_group(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Codes of ``x`` with one (scale, zero_point) per ``spec.group_size`` values of the last dim.

    ``scale`` and ``zero_point`` have shape ``(*x.shape[:-1], x.shape[-1] // group_size)``.
    """
    xg = _group_view(x, spec.group_size)
    s, z = _group_qparams(xg, scale, zero_point)
    return _quantize(xg, s, z, spec).reshape(x.shape)


def dequantize_per_group(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Inverse of :func:`quantize_per_group`: ``(q - zero_point) * scale`` group by group."""
    qg = _group_view(q, group_size)
    s, z = _group_qparams(qg, scale, zero_point)
    return _dequantize(qg, s, z).reshape(q.shape)


def tensor_range(
    x: torch.Tensor, spec: QuantSpec, *, axis: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` in float32, reduced as ``spec.granularity`` says.

    Shapes: per_tensor ``()``; per_channel ``(x.shape[axis],)`` with ``axis`` defaulting to
    ``spec.axis``; per_group ``(*x.shape[:-1], x.shape[-1] // group_size)``. Feed the result to
    :func:`qparams_from_range`.
    """
    x = x.detach().to(torch.float32)
    if x.numel() == 0:
        raise ConfigError(f"cannot take the range of an empty tensor of shape {tuple(x.shape)}")
    if spec.granularity == "per_group":
        lo, hi = torch.aminmax(_group_view(x, spec.group_size), dim=-1)
    elif spec.granularity == "per_channel" or axis is not None:
        dim = _resolve_axis(spec.axis if axis is None else axis, x.ndim)
        lo, hi = torch.aminmax(x.movedim(dim, 0).reshape(x.shape[dim], -1), dim=1)
    else:
        lo, hi = torch.aminmax(x)
    return lo, hi


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte (ONNX INT4/UINT4 layout) into a flat uint8 tensor.

    Element ``2i`` goes to the low nibble of byte ``i`` and ``2i+1`` to the high nibble; signed
    values are stored in 4-bit two's complement. ``q`` is flattened; an odd count is padded with
    a zero nibble. Values must lie in [-8, 15] (int4 or uint4 codes).
    """
    if q.dtype.is_floating_point or q.dtype == torch.bool or q.is_complex():
        raise ConfigError(f"pack_int4 needs an integer tensor, got dtype {q.dtype}")
    flat = q.reshape(-1).to(torch.int16)
    if flat.numel() and (flat.min() < -8 or flat.max() > 15):
        low, high = int(flat.min()), int(flat.max())
        raise ConfigError(f"pack_int4 needs codes in [-8, 15], got values in [{low}, {high}]")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    nibbles = flat & 0xF
    return (nibbles[0::2] | (nibbles[1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, numel: int, signed: bool) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: the first ``numel`` codes as a flat int8 tensor.

    ``signed`` sign-extends each nibble (int4 in [-8, 7]); otherwise codes are in [0, 15].
    """
    if packed.dtype != torch.uint8:
        raise ConfigError(f"unpack_int4 needs a uint8 tensor, got dtype {packed.dtype}")
    if not _is_int(numel) or not 0 <= numel <= 2 * packed.numel():
        raise ConfigError(
            f"numel must be an integer in [0, {2 * packed.numel()}] for {packed.numel()} packed "
            f"bytes, got {numel!r}"
        )
    flat = packed.reshape(-1).to(torch.int16)
    values = torch.stack([flat & 0xF, flat >> 4], dim=1).reshape(-1)[:numel]
    if signed:
        values = values - ((values >= 8).to(torch.int16) << 4)
    return values.to(torch.int8)

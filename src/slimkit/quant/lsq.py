"""Learned Step Size Quantization (LSQ, Esser et al., ICLR 2020) and its learned offset (LSQ+,
Bhalgat et al., CVPR-W 2020) as an autograd function and a module.

The forward is exactly :func:`slimkit.quant.affine.fake_quantize` (a true division, round half
to even) with the zero point rounded to an integer, so zero stays exactly representable::

    q = clamp(round(x / s) + round(z), qmin, qmax);   x_hat = (q - round(z)) * s

The backward, with ``v = x / s + z`` and ``g`` the gradient scale (LSQ's
``1 / sqrt(numel_per_scale * qmax)``):

* ``d x_hat / d x`` = 1 where ``qmin <= v <= qmax``, else 0 (clipped straight-through);
* ``d x_hat / d s`` = ``g * (round(x / s) - x / s)`` inside, ``g * (qmin - z)`` below and
  ``g * (qmax - z)`` above (LSQ; with ``z = 0`` these are ``qmin`` and ``qmax``);
* ``d x_hat / d z`` = 0 inside and ``-g * s`` outside (LSQ+, the rounding of ``z`` is
  straight-through).

>>> x = torch.tensor([-1.0, 0.2, 0.7, 3.0])
>>> lsq_fake_quantize(x, torch.tensor(0.5), torch.tensor(0.0), -2, 1).tolist()
[-1.0, 0.0, 0.5, 0.5]
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from slimkit.distributed import world_size
from slimkit.errors import ConfigError
from slimkit.quant.affine import QuantSpec, qparams_from_range

__all__ = ["LSQQuantizer", "lsq_fake_quantize", "lsq_grad_scale"]

_EPS = 1e-8


def lsq_grad_scale(numel_per_scale: int, qmax: int) -> float:
    """LSQ's gradient scale ``1 / sqrt(numel_per_scale * qmax)``."""
    if numel_per_scale < 1 or qmax < 1:
        raise ConfigError(
            f"numel_per_scale and qmax must be positive, got {numel_per_scale} and {qmax}"
        )
    return 1.0 / math.sqrt(numel_per_scale * qmax)


def _view(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Reshape a per-tensor or per-channel qparam so it broadcasts against ``x``."""
    if axis is None:
        if t.numel() != 1:
            raise ConfigError(f"per-tensor qparams need one value, got shape {tuple(t.shape)}")
        return t.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    if t.numel() != x.shape[axis]:
        raise ConfigError(
            f"per-channel qparams along axis {axis} of shape {tuple(x.shape)} need "
            f"{x.shape[axis]} values, got {t.numel()}"
        )
    return t.reshape(shape)


def _reduce(grad: torch.Tensor, shape: torch.Size, axis: int | None) -> torch.Tensor:
    """Sum an elementwise gradient down to the ``shape`` of its qparam."""
    if axis is None:
        return grad.sum().reshape(shape)
    dims = [d for d in range(grad.dim()) if d != axis]
    return grad.sum(dim=dims).reshape(shape)


def _reduce_product(
    grad: torch.Tensor, local: torch.Tensor, shape: torch.Size, axis: int | None
) -> torch.Tensor:
    """``_reduce(grad * local, shape, axis)``, as a dot product where the layout allows."""
    if grad.is_contiguous() and local.is_contiguous():
        if axis is None:
            return torch.dot(grad.reshape(-1), local.reshape(-1)).reshape(shape)
        if axis == 0 and grad.dim() > 1:
            rows = grad.shape[0]
            product = torch.linalg.vecdot(grad.reshape(rows, -1), local.reshape(rows, -1))
            return product.reshape(shape)
    return _reduce(grad * local, shape, axis)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, skipping the call when ``t`` already has ``dtype`` (per-call overhead)."""
    return t if t.dtype == dtype else t.to(dtype)


def _qparams(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale`` and the rounded ``zero_point`` shaped to broadcast against ``x``, in the
    compute dtype: float64 for float64 inputs, float32 otherwise."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = _cast(_view(scale, x, axis), dtype)
    return s, torch.round(_cast(_view(zero_point, x, axis), dtype))


def _clamp_to_grid_(rounded: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``rounded = round(x / s)`` becomes ``q = clamp(rounded + z, qmin, qmax) - z``, in place
    (``z`` is rounded already; exact: every value is a small integer)."""
    return rounded.add_(z).clamp_(qmin, qmax).sub_(z)


class _LSQFunction(torch.autograd.Function):
    """The module docstring's LSQ/LSQ+ forward and backward, in few passes over ``x``.

    The clipping mask and the local scale gradient are computed once, in the forward, and only
    for the inputs that need a gradient; the qparam gradients are dot products. On CPU the
    costs that matter are fresh buffers (the first write to each page faults) and ops that
    write bool tensors, ``where`` or clamp to tensor bounds (several times slower than plain
    arithmetic), so every op writes a float tensor, in place where it can: three buffers per
    call, the output and the two saved for the backward. The forward and the elementwise
    gradients are the same values bit for bit as the formulas written out
    (``where(inside, round(x/s) - x/s, where(below, qmin - z, qmax - z))`` ...); only the sums
    run in another order, with ``g`` applied after them (float rounding), and a NaN input
    counts as clipped (no gradient) instead of inside.
    """

    @staticmethod
    def forward(ctx: Any, x, scale, zero_point, qmin, qmax, grad_scale, axis):
        s, z = _qparams(x, scale, zero_point, axis)
        needs_x, needs_s, needs_z = ctx.needs_input_grad[:3]
        if not (needs_x or needs_s or needs_z):  # (autograd then calls no backward)
            ctx.save_for_backward(None, None, None)
            q = _clamp_to_grid_((_cast(x, s.dtype) / s).round_(), z, qmin, qmax)
            return _cast(q.mul_(s), x.dtype)
        local = _cast(x, s.dtype) / s  # x / s for now
        inside = local + z  # v for now
        out = inside.clamp(qmin, qmax)
        torch.eq(out, inside, out=inside)  # 1.0 where qmin <= v <= qmax, else 0.0
        q = _clamp_to_grid_(torch.round(local, out=out), z, qmin, qmax)
        if needs_s:
            # round(x/s) - x/s inside, qmin - z below, qmax - z above; q is round(x/s) inside
            # and qmin - z / qmax - z outside, so this is q - inside * x/s (every product is
            # exact, so the same values as the three-way where)
            torch.sub(q, local.mul_(inside), out=local)
        else:
            local = None
        out = q.mul_(s)
        ctx.save_for_backward(inside, local, s if needs_z else None)
        ctx.qparams = (
            grad_scale,
            axis,
            scale.shape,
            scale.dtype,
            zero_point.shape,
            zero_point.dtype,
        )
        return _cast(out, x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        inside, local, s = ctx.saved_tensors
        g, axis, scale_shape, scale_dtype, zp_shape, zp_dtype = ctx.qparams
        grad_x = grad_s = grad_z = None
        needs_x, needs_s, needs_z = ctx.needs_input_grad[:3]
        if inside is not None:
            grad = _cast(grad_out, inside.dtype)
            passed = grad * inside if needs_x or needs_z else None
            if needs_x:
                grad_x = _cast(passed, grad_out.dtype)
            if needs_s:
                grad_s = _cast(_reduce_product(grad, local, scale_shape, axis) * g, scale_dtype)
            if needs_z:
                clipped = _reduce(grad - passed, zp_shape, axis)  # the grad where clipped
                grad_z = _cast(clipped * -s.reshape(zp_shape) * g, zp_dtype)
        return grad_x, grad_s, grad_z, None, None, None, None


def lsq_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    grad_scale: float = 1.0,
    axis: int | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` with LSQ/LSQ+ gradients for ``x``, ``scale`` and ``zero_point``.

    ``scale`` must be positive (pass ``scale.abs()`` or a clamped parameter); ``zero_point`` is
    a float tensor, rounded in the forward. ``axis=None`` is per tensor, otherwise one scale and
    zero point per index of ``axis``. See the module docstring for the gradients.
    """
    if qmin >= qmax:
        raise ConfigError(f"qmin must be below qmax, got qmin={qmin}, qmax={qmax}")
    if axis is not None:
        if not -x.dim() <= axis < x.dim():
            raise ConfigError(f"axis {axis} is out of range for a tensor with {x.dim()} dims")
        axis %= x.dim()
    zero_point = torch.as_tensor(zero_point, dtype=scale.dtype, device=scale.device)
    if not torch.is_grad_enabled() or not (
        x.requires_grad or scale.requires_grad or zero_point.requires_grad
    ):
        s, z = _qparams(x, scale, zero_point, axis)
        q = _clamp_to_grid_((_cast(x, s.dtype) / s).round_(), z, qmin, qmax)
        return _cast(q.mul_(s), x.dtype)
    return _LSQFunction.apply(x, scale, zero_point, qmin, qmax, float(grad_scale), axis)


class LSQQuantizer(nn.Module):
    """Fake quantizer with a learned ``scale`` (LSQ) and optionally a learned ``zero_point`` (LSQ+).

    Args:
        spec: the integer grid (``bits``, ``signed``, ``narrow_range``, ...); ``per_channel``
            specs quantize along ``spec.axis`` with ``channels`` scales.
        channels: number of channels for per_channel specs (``x.shape[spec.axis]``).
        learn_scale: ``scale`` is trainable (False gives plain STE with a fixed scale).
        learn_zero_point: ``zero_point`` is a trainable float parameter (LSQ+); otherwise a
            buffer fixed at initialization (0 for symmetric specs).
        split_batch: the quantized tensor is this process's share of a batch that data
            parallel training (DDP) splits across processes (activations, not weights): the
            gradient scale counts the elements of the whole batch, so N processes learn the
            scale as one process does on the same global batch.

    State (fixed names, always present): ``scale`` (``nn.Parameter``), ``zero_point``
    (parameter or buffer, float) and the ``initialized`` flag. The first forward of an
    uninitialized quantizer initializes it from that tensor (:meth:`init_lsq`); calibrated
    ranges use :meth:`init_from_range`. ``enabled = False`` makes it the identity.

    Usable as a ``torch.nn.utils.parametrize`` parametrization of a weight.
    """

    def __init__(
        self,
        spec: QuantSpec,
        channels: int | None = None,
        *,
        learn_scale: bool = True,
        learn_zero_point: bool = False,
        split_batch: bool = False,
    ) -> None:
        super().__init__()
        if spec.granularity == "per_group":
            raise ConfigError("LSQQuantizer supports per_tensor and per_channel, got per_group")
        per_channel = spec.granularity == "per_channel"
        if per_channel and (channels is None or channels < 1):
            raise ConfigError(f"per_channel LSQQuantizer needs channels >= 1, got {channels!r}")
        if learn_zero_point and spec.symmetric:
            raise ConfigError("a learned zero_point needs an asymmetric spec, got symmetric=True")
        self.spec = spec
        self.axis = spec.axis if per_channel else None
        shape = (channels,) if per_channel else ()
        self.scale = nn.Parameter(torch.ones(shape), requires_grad=learn_scale)
        zero = torch.full(shape, float(self._symmetric_zero_point()))
        if learn_zero_point:
            self.zero_point = nn.Parameter(zero)
        else:
            self.register_buffer("zero_point", zero)
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized_cache: tuple[torch.Tensor, int, bool] | None = None
        self.enabled = True
        self.split_batch = split_batch

    def _symmetric_zero_point(self) -> int:
        return round((self.spec.qmin + self.spec.qmax) / 2) if self.spec.symmetric else 0

    def _per_channel_view(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``(channels, -1)`` for per_channel, else flat ``(1, -1)``."""
        if self.axis is None:
            return x.detach().reshape(1, -1)
        return x.detach().movedim(self.axis, 0).reshape(x.shape[self.axis], -1)

    @torch.no_grad()
    def init_lsq(self, x: torch.Tensor) -> None:
        """LSQ's data init ``scale = 2 * mean(|x|) / sqrt(qmax)`` (per channel if per_channel).

        Asymmetric specs also set ``zero_point`` so that ``min(x)`` lies on the grid's low end.
        """
        flat = self._per_channel_view(x).float()
        scale = (2 * flat.abs().mean(dim=1) / math.sqrt(self.spec.qmax)).clamp_min(_EPS)
        if self.spec.symmetric:
            zero_point = torch.full_like(scale, float(self._symmetric_zero_point()))
        else:
            low = flat.amin(dim=1).clamp(max=0.0)
            zero_point = torch.round(self.spec.qmin - low / scale)
            zero_point = zero_point.clamp(self.spec.qmin, self.spec.qmax)
        self._set(scale, zero_point)

    @torch.no_grad()
    def init_from_range(self, min_val: torch.Tensor, max_val: torch.Tensor) -> None:
        """Set ``scale``/``zero_point`` from a calibrated range (``qparams_from_range``)."""
        scale, zero_point = qparams_from_range(min_val, max_val, self.spec)
        self._set(scale, zero_point.float())

    @torch.no_grad()
    def init_from_tensor_range(self, x: torch.Tensor) -> None:
        """:meth:`init_from_range` with the min/max of ``x`` (per channel if per_channel)."""
        low, high = torch.aminmax(self._per_channel_view(x), dim=1)
        self.init_from_range(low, high)

    def _set(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
        self.initialized.fill_(True)

    def grad_scale(self, x: torch.Tensor) -> float:
        """LSQ's gradient scale for ``x``: elements per scale and ``qmax``; with ``split_batch``
        the elements of all processes' shares (``x.numel() * world_size``)."""
        per_scale = x.numel() // max(1, self.scale.numel())
        if self.split_batch:
            per_scale *= world_size()
        return lsq_grad_scale(max(1, per_scale), max(1, self.spec.qmax))

    def is_initialized(self) -> bool:
        """``bool(self.initialized)``, read from the buffer only when it changed.

        The value is cached with the buffer's identity and version counter, so loading a state
        dict, ``fill_``/``copy_`` or replacing the buffer are all seen, while an unchanged flag
        costs no device read (no host sync on accelerators) per forward.
        """
        flag = self.initialized
        try:
            version = flag._version
        except RuntimeError:  # an inference tensor has no version counter
            return bool(flag)
        cached = self.__dict__.get("_initialized_cache")
        if cached is not None and cached[0] is flag and cached[1] == version:
            return cached[2]
        value = bool(flag)
        self._initialized_cache = (flag, version, value)
        return value

    def __getstate__(self) -> dict[str, Any]:
        # a copy's buffer starts a new version counter: never let it inherit the cache
        state = self.__dict__.copy()
        state["_initialized_cache"] = None
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self.is_initialized():
            self.init_lsq(x)
        scale = self.scale.abs().clamp_min(_EPS)
        return lsq_fake_quantize(
            x, scale, self.zero_point, self.spec.qmin, self.spec.qmax, self.grad_scale(x), self.axis
        )

    def extra_repr(self) -> str:
        learned = "scale" + (", zero_point" if isinstance(self.zero_point, nn.Parameter) else "")
        if not self.scale.requires_grad:
            learned = learned.replace("scale", "").lstrip(", ") or "nothing"
        return (
            f"bits={self.spec.bits}, signed={self.spec.signed}, axis={self.axis}, learns={learned}"
        )

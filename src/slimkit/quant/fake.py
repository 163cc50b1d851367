"""Fake-quantization modules: quantization state as buffers, emulation with a straight-through
gradient, and ONNX QDQ export.

Three quantizers, each holding buffers with fixed names ``scale``, ``zero_point`` and
``calibrated`` (so ``state_dict``, ``.to()`` and ``torch.save`` carry them):

* :class:`ActivationQuantizer` (per tensor, uint8 asymmetric by default) sits on a tensor edge.
  Before :meth:`~ActivationQuantizer.freeze` it *observes*: its :class:`Observer` streams the
  batches and the tensor passes through unchanged. After it *quantizes* with fixed qparams.
* :class:`WeightQuantizer` is a ``torch.nn.utils.parametrize`` parametrization of a Conv/Linear
  ``weight`` (per output channel, int8 symmetric narrow range by default, ORT's convention).
* :class:`BiasQuantizer` parametrizes ``bias`` onto the int32 grid of scale
  ``input_scale * weight_scale`` with zero point 0, which is how ONNX Runtime's integer kernels
  (``QLinearConv``, ``QGemm``) add the bias.

:func:`add_weight_quantizers` and :func:`remove_weight_quantizers` attach and remove the two
parametrizations of one Conv/Linear.

The emulation uses :func:`slimkit.quant.affine.fake_quantize` (a true division, as ONNX Runtime
rounds). While :func:`torch.onnx.is_in_onnx_export` is true the quantizers emit
``torch.fake_quantize_per_{tensor,channel}_affine``, which the TorchScript exporter writes as
``QuantizeLinear``/``DequantizeLinear`` pairs; weights are fake-quantized first, so their codes
are exact whichever way a tie rounds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from slimkit.errors import ConfigError, StateError
from slimkit.quant.affine import QuantSpec, fake_quantize, qparams_from_range, tensor_range
from slimkit.quant.observers import Observer, make_observer

__all__ = [
    "ActivationQuantizer",
    "BiasQuantizer",
    "WeightQuantizer",
    "activation_spec",
    "add_weight_quantizers",
    "fake_quantize_ste",
    "quantizer_of",
    "remove_weight_quantizers",
    "weight_spec",
]

_INT32 = (-(2**31), 2**31 - 1)


def activation_spec(bits: int = 8, *, reduce_range: bool = False) -> QuantSpec:
    """The activation grid: unsigned, asymmetric, per tensor (ORT's uint8 activations)."""
    return QuantSpec(bits=bits, signed=False, reduce_range=reduce_range)


def weight_spec(bits: int = 8, *, per_channel: bool = True) -> QuantSpec:
    """The weight grid: signed, symmetric (zero point 0), narrow range, per output channel."""
    granularity = "per_channel" if per_channel else "per_tensor"
    return QuantSpec(
        bits=bits, signed=True, symmetric=True, narrow_range=True, granularity=granularity, axis=0
    )


def fake_quantize_ste(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    spec: QuantSpec,
    axis: int | None = None,
) -> torch.Tensor:
    """:func:`~slimkit.quant.affine.fake_quantize` with a clipped straight-through gradient.

    The value is exactly ``fake_quantize(x)``; the gradient is 1 where ``x`` lies inside the
    grid's range ``[(qmin - zp) * scale, (qmax - zp) * scale]`` and 0 where it clips.
    """
    out = fake_quantize(x.detach(), scale, zero_point, spec, axis)
    if not x.requires_grad:
        return out
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    lo = (spec.qmin - zero_point) * scale
    hi = (spec.qmax - zero_point) * scale
    inside = (x >= lo) & (x <= hi)
    return out + (x - x.detach()) * inside


class _Quantizer(nn.Module):
    """Shared state: ``scale``, ``zero_point``, ``calibrated`` buffers and an ``enabled`` switch.

    ``enabled = False`` turns the quantizer into the identity (for float reference runs); it is
    a plain attribute, not state.
    """

    def __init__(self, spec: QuantSpec, channels: int | None) -> None:
        super().__init__()
        self.spec = spec
        shape = () if channels is None else (channels,)
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.register_buffer("calibrated", torch.tensor(False))
        self._calibrated = False
        self.enabled = True

    @property
    def is_calibrated(self) -> bool:
        """Whether qparams are fixed (after ``freeze`` or loading a calibrated state)."""
        return self._calibrated

    def _set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
        self.calibrated.fill_(True)
        self._calibrated = True

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._calibrated = bool(self.calibrated)

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, calibrated={self._calibrated}"


class ActivationQuantizer(_Quantizer):
    """Observe, then fake-quantize, one activation tensor per tensor.

    Args:
        spec: the grid; defaults to :func:`activation_spec` (uint8 asymmetric). Per tensor only.
        observer: a name from :data:`slimkit.quant.observers.OBSERVERS`.
        **observer_options: passed to :func:`~slimkit.quant.observers.make_observer`.

    ``forward(x, observe=True)``: while observing, ``observe=False`` skips the statistics (a
    second use of the same quantizer on a reshaped view of an already observed tensor).

    >>> q = ActivationQuantizer()
    >>> _ = q(torch.tensor([0.0, 2.55]))  # observing: passes through, records [0, 2.55]
    >>> q.freeze()
    >>> [round(v, 4) for v in q(torch.tensor([1.004, 3.0])).tolist()]  # step 0.01, clipped
    [1.0, 2.55]
    """

    def __init__(
        self, spec: QuantSpec | None = None, observer: str = "minmax", **observer_options: Any
    ) -> None:
        spec = activation_spec() if spec is None else spec
        if spec.granularity != "per_tensor":
            raise ConfigError(
                f"activation quantizers are per tensor, got granularity {spec.granularity!r}"
            )
        super().__init__(spec, None)
        self.observer: Observer = make_observer(observer, spec, **observer_options)

    @property
    def mode(self) -> str:
        """``"observing"``, ``"quantizing"`` or ``"disabled"``."""
        if not self.enabled:
            return "disabled"
        return "quantizing" if self._calibrated else "observing"

    @torch.no_grad()
    def freeze(self) -> None:
        """Fix ``scale``/``zero_point`` from the observer's range and start quantizing."""
        if not self.observer.observed:
            raise StateError("activation quantizer has seen no data: calibrate before freezing")
        self._set_qparams(*self.observer.compute_qparams())

    def forward(self, x: torch.Tensor, observe: bool = True) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self._calibrated:
            if observe:
                self.observer(x)
            return x
        if torch.onnx.is_in_onnx_export():
            return torch.fake_quantize_per_tensor_affine(
                x, self.scale, self.zero_point, self.spec.qmin, self.spec.qmax
            )
        return fake_quantize_ste(x, self.scale, self.zero_point, self.spec)


class WeightQuantizer(_Quantizer):
    """Parametrization of a Conv/Linear ``weight``: fake-quantized per output channel.

    ``freeze(weight)`` computes min/max qparams from the weight (symmetric, so zero point 0);
    until then, and while disabled, the weight passes through.
    """

    def __init__(self, weight: torch.Tensor, spec: QuantSpec | None = None) -> None:
        spec = weight_spec() if spec is None else spec
        if not (spec.signed and spec.symmetric) or spec.granularity == "per_group":
            raise ConfigError(
                "weight quantizers need a signed symmetric per_tensor or per_channel spec, "
                f"got {spec}"
            )
        per_channel = spec.granularity == "per_channel"
        super().__init__(spec, weight.shape[spec.axis] if per_channel else None)
        self.axis = spec.axis % weight.dim() if per_channel else None

    @torch.no_grad()
    def freeze(self, weight: torch.Tensor) -> None:
        """Fix qparams from the range of ``weight`` (the unquantized original)."""
        self._set_qparams(*qparams_from_range(*tensor_range(weight, self.spec), self.spec))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not (self.enabled and self._calibrated):
            return weight
        if torch.onnx.is_in_onnx_export():
            exact = fake_quantize(weight, self.scale, self.zero_point, self.spec, self.axis)
            qmin, qmax = -128, 127  # the codes fit; ONNX export accepts only the int8 range
            if self.axis is None:
                return torch.fake_quantize_per_tensor_affine(
                    exact, self.scale, self.zero_point, qmin, qmax
                )
            return torch.fake_quantize_per_channel_affine(
                exact, self.scale, self.zero_point, self.axis, qmin, qmax
            )
        return fake_quantize_ste(weight, self.scale, self.zero_point, self.spec, self.axis)


class BiasQuantizer(_Quantizer):
    """Parametrization of a ``bias`` onto the int32 grid ``scale = input_scale * weight_scale``.

    ONNX Runtime adds an int32 bias to the integer accumulator, so the emulation rounds the bias
    to that grid too. The export writes the rounded float bias; :func:`slimkit.export.qdq.
    export_qdq` turns it into an int32 ``DequantizeLinear`` input.
    """

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__(QuantSpec(bits=8), bias.shape[0])

    @torch.no_grad()
    def freeze(self, input_scale: torch.Tensor, weight_scale: torch.Tensor) -> None:
        """Set ``scale = input_scale * weight_scale`` (float32, per output channel)."""
        scale = (input_scale.float() * weight_scale.float()).expand(self.scale.shape)
        self._set_qparams(scale, torch.zeros_like(self.zero_point))

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        if not (self.enabled and self._calibrated):
            return bias
        codes = torch.round(bias.detach() / self.scale).clamp(*_INT32)
        out = codes * self.scale
        if bias.requires_grad and not torch.onnx.is_in_onnx_export():
            out = out + (bias - bias.detach())
        return out


def quantizer_of(module: nn.Module, name: str) -> _Quantizer | None:
    """The :class:`WeightQuantizer` or :class:`BiasQuantizer` on ``module.<name>``, if any."""
    if not parametrize.is_parametrized(module, name):
        return None
    wanted = WeightQuantizer if name == "weight" else BiasQuantizer
    return next((p for p in getattr(module.parametrizations, name) if isinstance(p, wanted)), None)


def add_weight_quantizers(module: nn.Module, spec: QuantSpec | None = None) -> None:
    """Parametrize ``module.weight`` with a :class:`WeightQuantizer` (``spec``, default
    :func:`weight_spec`) and ``module.bias``, if any, with a :class:`BiasQuantizer`."""
    parametrize.register_parametrization(module, "weight", WeightQuantizer(module.weight, spec))
    if getattr(module, "bias", None) is not None:
        parametrize.register_parametrization(module, "bias", BiasQuantizer(module.bias))


def remove_weight_quantizers(module: nn.Module) -> None:
    """Undo :func:`add_weight_quantizers`: restore the float ``weight``/``bias`` parameters.

    ``torch``'s ``remove_parametrizations`` deletes the property from the module's class, which
    a ``deepcopy`` shares with the original module; when slimkit's quantizers are the only
    parametrizations, restoring the base class instead leaves the other copy intact.
    """
    ours = [n for n in ("weight", "bias") if quantizer_of(module, n) is not None]
    if not ours:
        return
    others = set(module.parametrizations) - set(ours)
    if others or any(len(getattr(module.parametrizations, n)) != 1 for n in ours):
        for name in ours:
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        return
    originals = {n: getattr(module.parametrizations, n).original for n in ours}
    del module._modules["parametrizations"]
    module.__class__ = type(module).__bases__[0]
    for name, original in originals.items():
        module.register_parameter(name, original)

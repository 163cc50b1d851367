"""Weight-only quantization of Linear layers, and its compact safetensors artifact.

Each selected ``nn.Linear`` becomes a :class:`WeightOnlyLinear` holding buffers ``qweight``
(codes, int8 if symmetric else uint8, ``(out, in)``), ``scale`` (float32) and ``zero_point``
(int32), one per output channel (``group_size=None``) or per ``group_size`` inputs of each output
(``(out, in // group_size)``). Its ``weight`` is the dequantized ``(qweight - zero_point) * scale``;
``forward`` is ``F.linear`` with it (activations stay float). Scales are rounded *up* to float16
before the codes are computed, so the artifact keeps them in float16 exactly, and every element
obeys ``|w - w_hat| <= scale / 2``. Conv layers are not handled (the scope lists them as skipped).

Artifact (:func:`save_weight_only`): safetensors with ``__metadata__["slimkit.weight_only"]``::

    {"format": "slimkit-weight-only", "version": 1, "bits": 4, "group_size": 32, "symmetric": true,
     "layers": {name: {"shape": [out, in], "bits": 4, "group_size": 32, "symmetric": true,
                       "dtype": "float32"}}}

Per quantized layer: ``name.qweight`` (2..4-bit codes packed two per byte by
:func:`~slimkit.quant.affine.pack_int4`, flat uint8; wider codes int8/uint8 ``(out, in)``),
``name.scale`` (float16) and, if asymmetric, ``name.zero_point`` (uint8, packed like the codes).
Every other state-dict entry (biases, norms, embeddings, float layers) is stored unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import safetensors.torch
import torch
from pydantic import Field
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from slimkit.core.config import Config
from slimkit.core.scope import Scope, Selection, set_submodule
from slimkit.core.technique import Technique, TechniqueSummary, register_technique
from slimkit.errors import CheckpointError, ConfigError, StateError, first_line
from slimkit.io import atomic_path
from slimkit.quant import affine as A
from slimkit.quant.affine import QuantSpec

__all__ = ["FORMAT", "VERSION", "WeightOnlyConfig", "WeightOnlyLinear", "WeightOnlyQuantization"]
__all__ += ["load_weight_only", "save_weight_only", "strip_weight_only"]

FORMAT = "slimkit-weight-only"
VERSION = 1
METADATA_KEY = "slimkit.weight_only"
PathLike = str | os.PathLike[str]
_FP16_MAX = torch.finfo(torch.float16).max


class WeightOnlyConfig(Config):
    """Quantize the weights of the scoped Linear layers to ``bits`` (activations stay float).

    ``group_size=None`` gives one scale per output channel; an integer gives one per
    ``group_size`` consecutive input features (layers whose ``in_features`` it does not divide
    are skipped with that reason). ``symmetric`` uses signed codes with zero point 0; otherwise
    unsigned codes with a per-channel/group zero point.
    """

    kind: Literal["weight_only"] = "weight_only"
    scope: Scope = Scope()
    bits: Annotated[int, Field(ge=2, le=8, strict=True)] = 8
    group_size: Annotated[int, Field(ge=1, strict=True)] | None = None
    symmetric: bool = True


def weight_only_spec(bits: int, group_size: int | None, symmetric: bool) -> QuantSpec:
    """The grid of a weight-only layer (full signed range when symmetric, as GPTQ/AWQ use)."""
    layout = {"granularity": "per_channel" if group_size is None else "per_group"}
    return QuantSpec(
        bits=bits, signed=symmetric, symmetric=symmetric, group_size=group_size, **layout
    )


def _round_up_fp16(scale: torch.Tensor) -> torch.Tensor:
    """The smallest float16 value >= each scale, as float32 (positive finite scales only)."""
    half = scale.to(torch.float16)
    low = half.to(torch.float32) < scale
    bumped = (half.view(torch.int16) + 1).view(torch.float16)  # next float16 up (positive)
    return torch.where(low, bumped, half).to(torch.float32)


@torch.no_grad()
def quantize_weight(
    weight: torch.Tensor, spec: QuantSpec, *, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scale, zero_point)`` of a 2-D weight; scales are float16-representable."""
    lo, hi = A.tensor_range(weight, spec)
    scale, zero_point = A.qparams_from_range(lo, hi, spec)
    if not bool((scale <= _FP16_MAX).all()):
        big = float(weight.abs().max())
        raise ConfigError(f"{name}: weights too large for float16 scales (max |w| = {big:g})")
    scale = _round_up_fp16(scale)
    if not spec.symmetric:  # re-centre on the rounded scale; keeps |w - w_hat| <= scale / 2
        zero_point = torch.round(spec.qmin - lo.clamp(max=0.0) / scale)
        zero_point = zero_point.clamp(spec.qmin, spec.qmax).to(torch.int32)
    return A.quantize(weight.detach(), scale, zero_point, spec), scale, zero_point


def _dequantize(
    qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int | None
) -> torch.Tensor:
    if group_size is None:
        return A.dequantize(qweight, scale, zero_point, axis=0)
    return A.dequantize_per_group(qweight, scale, zero_point, group_size)


class WeightOnlyLinear(nn.Module):
    """A Linear layer computing with dequantized integer weights (see the module docstring).

    Buffers ``qweight``, ``scale``, ``zero_point``; parameter ``bias`` (float, trainable).
    ``weight_dtype`` is the dtype of the dequantized weight (the original Linear's).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: int = 8,
        group_size: int | None = None,
        symmetric: bool = True,
    ) -> None:
        super().__init__()
        self.spec = weight_only_spec(bits, group_size, symmetric)
        if group_size is not None and in_features % group_size:
            raise ConfigError(
                f"in_features ({in_features}) must be divisible by group_size ({group_size})"
            )
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.weight_dtype = torch.float32
        qshape = (out_features, in_features // group_size) if group_size else (out_features,)
        codes = torch.zeros(out_features, in_features, dtype=self.spec.dtype)
        self.register_buffer("qweight", codes)
        self.register_buffer("scale", torch.ones(qshape))
        self.register_buffer("zero_point", torch.zeros(qshape, dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls, linear: nn.Linear, name: str = "linear", **settings: Any
    ) -> WeightOnlyLinear:
        """Quantize ``linear.weight`` (its effective value if parametrized); copy its bias.

        ``settings``: ``bits``, ``group_size``, ``symmetric`` as for the constructor.
        """
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, **settings)
        layer = layer.to(weight.device)
        layer.weight_dtype = weight.dtype
        codes, layer.scale, layer.zero_point = quantize_weight(weight, layer.spec, name=name)
        layer.qweight.copy_(codes)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone())
        return layer

    @property
    def settings(self) -> dict[str, Any]:
        """``bits``, ``group_size`` and ``symmetric`` (the constructor's keywords)."""
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}

    def dequantized_weight(self) -> torch.Tensor:
        """``(qweight - zero_point) * scale`` in ``weight_dtype``."""
        weight = _dequantize(self.qweight, self.scale, self.zero_point, self.group_size)
        return weight.to(self.weight_dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` whose weight is the dequantized weight (bias copied)."""
        weight = self.dequantized_weight().detach()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear = linear.to(device=weight.device, dtype=weight.dtype)
        linear.weight = nn.Parameter(weight)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone())
        return linear

    def extra_repr(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, {settings}"


def _is_linear(module: nn.Module) -> bool:
    """Plain Linear layers, parametrized ones included (their effective weight is quantized)."""
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]
    return cls is nn.Linear


def strip_weight_only(model: nn.Module) -> nn.Module:
    """Replace every :class:`WeightOnlyLinear` by a plain Linear (in place); return the model."""
    if isinstance(model, WeightOnlyLinear):
        return model.to_linear()
    names = [n for n, m in model.named_modules() if isinstance(m, WeightOnlyLinear)]
    for name in names:
        set_submodule(model, name, model.get_submodule(name).to_linear())
    return model


@register_technique
class WeightOnlyQuantization(Technique):
    """See :class:`WeightOnlyConfig`."""

    kind = "weight_only"
    config_class = WeightOnlyConfig
    config: WeightOnlyConfig

    def __init__(self, config: WeightOnlyConfig) -> None:
        super().__init__(config)
        self._rows: list[list[Any]] = []

    def plan(self, model: nn.Module) -> Selection:
        selection = self.config.scope.select(
            model, _is_linear, technique=self.kind, describe_supported="Linear"
        )
        if (group := self.config.group_size) is not None:
            bad = {n: m.in_features for n, m in selection.selected if m.in_features % group}
            selection.selected = [(n, m) for n, m in selection.selected if n not in bad]
            why = "input features not divisible by group_size"
            selection.skipped += [(n, f"{i} {why}={group}") for n, i in bad.items()]
        if not selection.selected:
            raise ConfigError(f"{self.kind}: no Linear layer left to quantize after scope")
        return selection

    def apply(self, model: nn.Module) -> None:
        if self._already_applied(model):
            return
        selection = self.plan(model)
        cfg = self.config
        for name, module in selection.selected:
            settings = {"bits": cfg.bits, "group_size": cfg.group_size, "symmetric": cfg.symmetric}
            layer = WeightOnlyLinear.from_linear(module, name, **settings)
            with torch.no_grad():
                weight = module.weight.detach().float()
                error = torch.linalg.norm(weight - layer.dequantized_weight().float())
                relative = float(error / torch.linalg.norm(weight).clamp_min(1e-30))
            shape = f"{layer.out_features}x{layer.in_features}"
            self._rows.append([name, shape, cfg.bits, cfg.group_size, round(relative, 6)])
            set_submodule(model, name, layer)
        self.selection = Selection(
            selected=[(n, model.get_submodule(n)) for n, _ in selection.selected],
            skipped=list(selection.skipped),
        )
        self._model = model

    def summary(self) -> TechniqueSummary:
        selection = self._require_applied()
        return TechniqueSummary(
            technique=self.kind,
            columns=["module", "shape", "bits", "group_size", "rel_error"],
            rows=[list(r) for r in self._rows],
            totals={"layers": len(self._rows), "bits": self.config.bits},
            skipped=list(selection.skipped),
        )

    def finalize(self, model: nn.Module) -> nn.Module:
        """Replace this technique's layers by plain Linears with the dequantized weights."""
        selection = self._require_applied()
        for name, _ in selection.selected:
            module = model.get_submodule(name)
            if isinstance(module, WeightOnlyLinear):
                set_submodule(model, name, module.to_linear())
        return model


# --- artifact ---------------------------------------------------------------------------------


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return A.pack_int4(codes) if bits <= 4 else codes.contiguous()


def save_weight_only(model: nn.Module, path: PathLike) -> Path:
    """Write the weight-only artifact of ``model`` (with :class:`WeightOnlyLinear` layers).

    Atomic: a failed write leaves any existing file untouched. Returns the path.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, WeightOnlyLinear)}
    if not layers:
        raise StateError(
            f"save_weight_only: {type(model).__name__} has no WeightOnlyLinear layer; "
            "apply WeightOnlyQuantization first"
        )
    tensors: dict[str, torch.Tensor] = {}
    skip = {f"{n}.{b}" for n in layers for b in ("qweight", "scale", "zero_point")}
    for key, value in model.state_dict().items():
        if key not in skip:
            tensors[key] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
    entries = {}
    for name, layer in layers.items():
        tensors[f"{name}.qweight"] = _pack(layer.qweight.cpu(), layer.bits)
        tensors[f"{name}.scale"] = layer.scale.cpu().to(torch.float16).contiguous()
        if not layer.symmetric:
            zero_point = layer.zero_point.cpu().to(torch.uint8)
            tensors[f"{name}.zero_point"] = _pack(zero_point, layer.bits)
        shape, dtype = [layer.out_features, layer.in_features], str(layer.weight_dtype)[6:]
        entries[name] = {"shape": shape, **layer.settings, "dtype": dtype}
    record: dict[str, Any] = {"format": FORMAT, "version": VERSION}
    for key, value in next(iter(layers.values())).settings.items():  # "mixed" if layers differ
        record[key] = value if all(e[key] == value for e in entries.values()) else "mixed"
    record["layers"] = entries
    header = {METADATA_KEY: json.dumps(record, separators=(",", ":"))}
    try:
        with atomic_path(path) as tmp:
            safetensors.torch.save_file(tensors, str(tmp), metadata=header)
    except Exception as exc:
        detail = first_line(exc)
        raise CheckpointError(f"could not write weight-only artifact {path}: {detail}") from exc
    return Path(path)


def load_weight_only(model: nn.Module, path: PathLike) -> nn.Module:
    """Load a :func:`save_weight_only` artifact into ``model`` (in place) and return it.

    A quantized layer's module may be a plain ``nn.Linear`` (it gets the dequantized weight, so
    the model stays plain PyTorch) or a :class:`WeightOnlyLinear` with the same bits, group size
    and symmetry (it gets the codes). Other state-dict entries must match the model exactly.
    Any problem raises :class:`CheckpointError` with a one-line message.
    """
    if not Path(path).is_file():
        raise CheckpointError(f"weight-only artifact not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            stored = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:
        detail = first_line(exc)
        raise CheckpointError(f"{path} is not a readable safetensors file: {detail}") from exc
    record = _read_record(header, path)
    modules = dict(model.named_modules())
    state: dict[str, torch.Tensor] = {}
    for name, entry in record["layers"].items():
        what = f"{path}: layer {name!r}"
        codes, scale, zero_point, (bits, group, symmetric, dtype) = _decode(
            stored, name, entry, what
        )
        module = modules.get(name)
        if isinstance(module, WeightOnlyLinear):
            ours = (module.bits, module.group_size, module.symmetric)
            if (bits, group, symmetric) != ours:
                raise CheckpointError(
                    f"{what}: stored (bits, group_size, symmetric) {(bits, group, symmetric)} "
                    f"!= the model's {ours}"
                )
            state |= {f"{name}.qweight": codes, f"{name}.scale": scale}
            state[f"{name}.zero_point"] = zero_point
        elif isinstance(module, nn.Linear):
            state[f"{name}.weight"] = _dequantize(codes, scale, zero_point, group).to(dtype)
        else:
            found = "no such module" if module is None else type(module).__name__
            raise CheckpointError(f"{what}: expected a Linear in {type(model).__name__}, {found}")
    parts = {f"{n}.{p}" for n in record["layers"] for p in ("qweight", "scale", "zero_point")}
    state |= {k: v for k, v in stored.items() if k not in state and k not in parts}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:])
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: {detail}") from exc
    return model


def _read_record(header: dict[str, str], path: PathLike) -> dict[str, Any]:
    if METADATA_KEY not in header:
        raise CheckpointError(f"{path} is not a slimkit weight-only artifact (no {METADATA_KEY!r})")
    try:
        record = json.loads(header[METADATA_KEY])
    except ValueError as exc:
        raise CheckpointError(f"{path}: {METADATA_KEY!r} is not JSON: {first_line(exc)}") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{path}: metadata format is not {FORMAT!r}")
    if record.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: {FORMAT} version {record.get('version')!r} is not supported "
            f"(this slimkit reads version {VERSION})"
        )
    if not isinstance(record.get("layers"), dict):
        raise CheckpointError(f"{path}: metadata has no 'layers' object")
    return record


def _decode(stored: dict[str, torch.Tensor], name: str, entry: Any, what: str) -> tuple:
    """Codes ``(out, in)``, float32 scale, int32 zero point and settings of one layer, checked."""
    try:
        (out, inp), bits = entry["shape"], entry["bits"]
        group, symmetric = entry["group_size"], entry["symmetric"]
        spec = weight_only_spec(bits, group, symmetric)
        dtype = getattr(torch, entry["dtype"])
        if out < 1 or inp < 1 or (group is not None and inp % group):
            raise ValueError(f"shape {entry['shape']} does not fit group_size {group}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype {entry['dtype']!r} is not a float dtype")
    except Exception as exc:
        raise CheckpointError(f"{what}: bad metadata entry: {first_line(exc)}") from exc
    qshape = (out,) if group is None else (out, inp // group)
    codes = _unpack(stored.get(f"{name}.qweight"), (out, inp), spec, f"{what}: qweight")
    scale = stored.get(f"{name}.scale")
    if scale is None or scale.dtype != torch.float16 or tuple(scale.shape) != qshape:
        got = "nothing" if scale is None else f"{scale.dtype} {tuple(scale.shape)}"
        raise CheckpointError(f"{what}: scale must be float16 of shape {qshape}, got {got}")
    scale = scale.to(torch.float32)
    if not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise CheckpointError(f"{what}: scales must be positive and finite")
    zero_point = torch.zeros(qshape, dtype=torch.int32)
    if not symmetric:
        zp_spec = QuantSpec(bits=bits, signed=False)
        zp = _unpack(stored.get(f"{name}.zero_point"), qshape, zp_spec, f"{what}: zero_point")
        zero_point = zp.to(torch.int32)
    return codes, scale, zero_point, (bits, group, symmetric, dtype)


def _unpack(packed: torch.Tensor | None, shape: tuple, spec: QuantSpec, what: str) -> torch.Tensor:
    """Stored codes of ``shape`` (unpacked when 2..4 bits), checked against the grid."""
    numel = int(torch.Size(shape).numel())
    want = (torch.uint8, ((numel + 1) // 2,)) if spec.bits <= 4 else (spec.dtype, shape)
    if packed is None or (packed.dtype, tuple(packed.shape)) != want:
        got = "nothing" if packed is None else f"{packed.dtype} {tuple(packed.shape)}"
        raise CheckpointError(f"{what} must be {want[0]} of shape {want[1]}, got {got}")
    codes = packed
    if spec.bits <= 4:
        codes = A.unpack_int4(packed, numel, signed=spec.signed).reshape(shape).to(spec.dtype)
    wide = codes.to(torch.int32)
    if numel and (int(wide.min()) < spec.qmin or int(wide.max()) > spec.qmax):
        raise CheckpointError(f"{what} codes outside [{spec.qmin}, {spec.qmax}]")
    return codes

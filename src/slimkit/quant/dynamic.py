"""Dynamic int8 quantization of Linear layers: PyTorch emulation and ONNX Runtime export.

Activations are quantized at run time from each batch's range, exactly as ONNX
``DynamicQuantizeLinear`` does (uint8, one scale for the whole tensor, float32 arithmetic)::

    lo, hi = min(0, min(x)), max(0, max(x))
    a_scale = (hi - lo) / 255            (1 when hi == lo)
    a_zp = round_half_even(clamp(-lo / a_scale, 0, 255))
    a_q = clamp(round_half_even(x / a_scale) + a_zp, 0, 255)

Weights are int8, symmetric (zero point 0) in ORT's range [-127, 127] (7-bit [-63, 63] with
``reduce_range``), one scale per output channel (or per tensor). A Linear then computes, as ONNX
Runtime's ``MatMulInteger`` graph does::

    y = float(int32((a_q - a_zp) @ w_q.T)) * (a_scale * w_scale) + bias

:class:`DynamicQuantization` swaps the class of each selected ``nn.Linear`` to
:class:`DynamicQuantLinear` (its ``weight``/``bias`` and state-dict keys are unchanged; nothing is
calibrated, weight qparams follow the current weight), which runs that emulation; during ONNX
export it is a plain float Linear. :func:`export_dynamic_onnx` exports the float model and
rewrites every ``MatMul``/``Gemm`` whose B input is a selected Linear's weight into
``DynamicQuantizeLinear`` + ``MatMulInteger`` + ``Cast`` + ``Mul`` (+ ``Add`` bias), the graph
``onnxruntime.quantization.quantize_dynamic`` produces, with the same weight codes as the
emulation.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.nn import functional as F

from slimkit.core.config import Config
from slimkit.core.scope import Scope, Selection
from slimkit.core.technique import Technique, TechniqueSummary, register_technique
from slimkit.errors import ConfigError, SlimkitError, UnsupportedModuleError
from slimkit.io import atomic_path
from slimkit.quant.affine import QuantSpec, qparams_from_range, quantize, tensor_range

__all__ = ["DynamicQuantConfig", "DynamicQuantLinear", "DynamicQuantization", "dynamic_linear"]
__all__ += ["dynamic_quantize_activation", "export_dynamic_onnx", "quantize_weight_int8"]

PathLike = str | os.PathLike[str]
_EXACT_FLOAT32 = 2**24  # integer sums below this are exact in a float32 accumulator
_WEIGHT_KEYS = {"per_channel", "reduce_range"}


class DynamicQuantConfig(Config):
    """Dynamic int8 quantization of the scoped Linear layers.

    ``per_channel``: one weight scale per output channel (else one per layer).
    ``reduce_range``: 7-bit weights, for CPUs without VNNI where u8*s8 pair sums saturate.
    """

    kind: Literal["dynamic_quant"] = "dynamic_quant"
    scope: Scope = Scope()
    per_channel: bool = True
    reduce_range: bool = False


def weight_spec_int8(per_channel: bool = True, reduce_range: bool = False) -> QuantSpec:
    """Signed symmetric narrow-range int8 (ORT's QInt8 weights), per channel or per tensor."""
    granularity = "per_channel" if per_channel else "per_tensor"
    grid = {"signed": True, "symmetric": True, "narrow_range": True, "reduce_range": reduce_range}
    return QuantSpec(bits=8, granularity=granularity, axis=0, **grid)


@torch.no_grad()
def quantize_weight_int8(
    weight: torch.Tensor, *, per_channel: bool = True, reduce_range: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 (out, in), scale float32 (out,) or ())`` of a Linear weight."""
    spec = weight_spec_int8(per_channel, reduce_range)
    scale, zero_point = qparams_from_range(*tensor_range(weight, spec), spec)
    return quantize(weight.detach(), scale, zero_point, spec), scale


@torch.no_grad()
def dynamic_quantize_activation(
    x: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes uint8, scale float32 (), zero_point int32 ())``: ONNX ``DynamicQuantizeLinear``."""
    x = x.detach().to(torch.float32)
    if x.numel() == 0:
        raise ConfigError(f"cannot quantize an empty activation of shape {tuple(x.shape)}")
    lo, hi = torch.aminmax(x)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = torch.where(hi == lo, torch.ones_like(hi), (hi - lo) / 255.0)
    zero_point = torch.round((0.0 - lo / scale).clamp(0.0, 255.0))
    codes = (torch.round(x / scale) + zero_point).clamp(0.0, 255.0).to(torch.uint8)
    return codes, scale, zero_point.to(torch.int32)


def dynamic_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    per_channel: bool = True,
    reduce_range: bool = False,
) -> torch.Tensor:
    """A Linear with dynamically quantized input and int8 weight, as ONNX Runtime computes it.

    The integer product is exact (float64 accumulation when float32 could round). Gradients,
    when needed, pass straight through to ``x``, ``weight`` and ``bias`` as for the float Linear.
    """
    a_q, a_scale, a_zp = dynamic_quantize_activation(x)
    w_q, w_scale = quantize_weight_int8(weight, per_channel=per_channel, reduce_range=reduce_range)
    bound = 255 * max(1, int(w_q.abs().max())) * weight.shape[1]
    acc_dtype = torch.float32 if bound < _EXACT_FLOAT32 else torch.float64
    acc = (a_q.to(acc_dtype) - a_zp.to(acc_dtype)) @ w_q.to(acc_dtype).T
    out = acc.to(torch.float32) * (a_scale * w_scale)
    if bias is not None:
        out = out + bias.detach().to(torch.float32)
    out = out.to(x.dtype) if x.dtype.is_floating_point else out
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    ):
        ref = F.linear(x, weight, bias)
        out = out + (ref - ref.detach())
    return out


class DynamicQuantLinear(nn.Linear):
    """An ``nn.Linear`` running :func:`dynamic_linear` (plain float while exporting to ONNX).

    Built by :meth:`convert` from a Linear in place (class swap, as ``parametrize`` does), so
    parameters, hooks and state-dict keys stay; :meth:`revert` swaps back. ``enabled = False``
    gives the float Linear (for reference runs).
    """

    per_channel: bool
    reduce_range: bool
    enabled: bool

    @classmethod
    def convert(
        cls, linear: nn.Linear, *, per_channel: bool = True, reduce_range: bool = False
    ) -> DynamicQuantLinear:
        if type(linear) is not nn.Linear:
            raise UnsupportedModuleError(
                f"DynamicQuantLinear converts plain nn.Linear only, got {type(linear).__name__}"
            )
        linear.__class__ = cls
        linear.per_channel, linear.reduce_range, linear.enabled = per_channel, reduce_range, True
        return linear

    def revert(self) -> nn.Linear:
        for attr in ("per_channel", "reduce_range", "enabled"):
            self.__dict__.pop(attr, None)
        self.__class__ = nn.Linear
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or torch.onnx.is_in_onnx_export():
            return F.linear(x, self.weight, self.bias)
        return dynamic_linear(
            x, self.weight, self.bias, per_channel=self.per_channel, reduce_range=self.reduce_range
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, per_channel={self.per_channel}, "
            f"reduce_range={self.reduce_range}"
        )


@register_technique
class DynamicQuantization(Technique):
    """See :class:`DynamicQuantConfig`; export with :func:`export_dynamic_onnx` before finalize."""

    kind = "dynamic_quant"
    config_class = DynamicQuantConfig
    config: DynamicQuantConfig

    def __init__(self, config: DynamicQuantConfig) -> None:
        super().__init__(config)

    def plan(self, model: nn.Module) -> Selection:
        selection = self.config.scope.select(
            model,
            lambda m: type(m) is nn.Linear,
            technique=self.kind,
            describe_supported="Linear",
        )
        if not selection.selected:
            raise ConfigError(f"{self.kind}: no Linear layer left to quantize after scope")
        return selection

    def apply(self, model: nn.Module) -> None:
        if self._already_applied(model):
            return
        selection = self.plan(model)
        for _, module in selection.selected:
            DynamicQuantLinear.convert(
                module, per_channel=self.config.per_channel, reduce_range=self.config.reduce_range
            )
        self.selection = selection
        self._model = model

    def summary(self) -> TechniqueSummary:
        selection = self._require_applied()
        rows, cfg = [], self.config
        for name, module in selection.selected:
            weight = module.weight.detach().float()
            codes, scale = quantize_weight_int8(weight, **cfg.model_dump(include=_WEIGHT_KEYS))
            error = torch.linalg.norm(weight - codes.float() * scale.reshape(-1, 1))
            relative = float(error / torch.linalg.norm(weight).clamp_min(1e-30))
            shape = f"{module.out_features}x{module.in_features}"
            rows.append([name, shape, cfg.per_channel, round(relative, 6)])
        return TechniqueSummary(
            technique=self.kind,
            columns=["module", "shape", "per_channel", "weight_rel_error"],
            rows=rows,
            totals={"layers": len(rows)},
            skipped=list(selection.skipped),
        )

    def finalize(self, model: nn.Module) -> nn.Module:
        """Swap the layers back to plain float ``nn.Linear`` (the int8 model is the ONNX export)."""
        selection = self._require_applied()
        for _, module in selection.selected:
            if isinstance(module, DynamicQuantLinear):
                module.revert()
        return model

    def export_onnx(self, model: nn.Module, example_inputs: tuple[Any, ...], path: Path) -> Path:
        """The finalized model as ONNX with this technique's Linears as ``MatMulInteger``."""
        return export_dynamic_onnx(model, example_inputs, path, config=self.config)


# --- ONNX export --------------------------------------------------------------------------------


def _layers_to_quantize(
    model: nn.Module, config: DynamicQuantConfig | None
) -> dict[str, tuple[nn.Linear, bool, bool]]:
    """``name -> (module, per_channel, reduce_range)`` from applied layers, else from ``config``."""
    applied = {
        n: (m, m.per_channel, m.reduce_range)
        for n, m in model.named_modules()
        if isinstance(m, DynamicQuantLinear)
    }
    if applied:
        if config is not None:
            raise ConfigError(
                "export_dynamic_onnx: the model already has DynamicQuantization applied; "
                "do not pass a config as well"
            )
        return applied
    config = DynamicQuantConfig() if config is None else config
    selection = DynamicQuantization(config).plan(model)
    return {n: (m, config.per_channel, config.reduce_range) for n, m in selection.selected}


def export_dynamic_onnx(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | torch.Tensor,
    path: PathLike,
    *,
    config: DynamicQuantConfig | None = None,
    **export_options: Any,
) -> Path:
    """Export ``model`` as a dynamically quantized ONNX model at ``path`` (atomic) and return it.

    ``export_options`` (``opset``, ``dynamic_batch``, ``input_names``, ``output_names``) go to
    :func:`slimkit.export.onnx.export_onnx`, which exports the float graph that is rewritten.

    The layers quantized are the model's :class:`DynamicQuantLinear` layers when
    :class:`DynamicQuantization` is applied, else those ``config`` (default: every Linear)
    selects. A selected Linear whose weight does not reach a ``MatMul``/``Gemm`` B input in the
    exported graph raises :class:`UnsupportedModuleError` naming it (exclude it in the scope).
    """
    from slimkit.export.onnx import export_onnx  # here: keeps onnxruntime out of `import slimkit`

    layers = _layers_to_quantize(model, config)
    with tempfile.TemporaryDirectory(prefix="slimkit-dynamic-") as folder:
        fp32 = Path(folder) / "fp32.onnx"
        export_onnx(model, example_inputs, fp32, **export_options)
        proto = onnx.load(str(fp32))
    rewrite_dynamic_quant(proto, layers)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
        try:
            onnx.checker.check_model(str(tmp))
        except onnx.checker.ValidationError as exc:
            line = str(exc).strip().splitlines()[0]
            raise SlimkitError(f"dynamic-quantized ONNX graph is invalid: {line}") from exc
    return Path(path)


def _key(array: np.ndarray) -> tuple[tuple[int, ...], str]:
    data = np.ascontiguousarray(array, dtype=np.float32)
    return data.shape, hashlib.sha1(data.tobytes()).hexdigest()


def _fresh_names(graph: onnx.GraphProto) -> Callable[[str], str]:
    """A function giving tensor/node names that clash with no name already in ``graph``."""
    used = {i.name for i in graph.initializer} | {i.name for i in graph.input}
    used |= {name for node in graph.node for name in (*node.input, *node.output, node.name)}

    def fresh(base: str) -> str:
        name, index = base, 0
        while name in used:
            index += 1
            name = f"{base}_{index}"
        used.add(name)
        return name

    return fresh


def rewrite_dynamic_quant(
    proto: onnx.ModelProto, layers: dict[str, tuple[nn.Linear, bool, bool]]
) -> dict[str, int]:
    """Rewrite the float ``MatMul``/``Gemm`` nodes of ``layers`` in place; return uses per layer.

    ``layers`` maps a name to ``(module, per_channel, reduce_range)``. Activations feeding
    several rewritten nodes (Q, K and V projections) are quantized once.
    """
    graph = proto.graph
    by_w: dict[tuple, str] = {}  # weight as stored (Gemm transB=1)
    by_wt: dict[tuple, str] = {}  # transposed weight (MatMul, Gemm transB=0)
    for name, (module, _, _) in layers.items():
        weight = module.weight.detach().float().cpu().numpy()
        by_w.setdefault(_key(weight), name)
        by_wt.setdefault(_key(weight.T), name)
    inits = {i.name: i for i in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    fresh = _fresh_names(graph)
    weights: dict[str, list[str]] = {}
    activations: dict[str, list[str]] = {}
    uses, replaced = dict.fromkeys(layers, 0), set()
    new_nodes: list[onnx.NodeProto] = []

    def make(stem: str, op: str, inputs: list[str], outputs: list[str], **attrs: Any):
        return helper.make_node(op, inputs, outputs, name=fresh(f"{stem}_{op}"), **attrs)

    for node in graph.node:
        layer, b = _match(node, inits, alias, by_w, by_wt)
        if layer is None:
            new_nodes.append(node)
            continue
        uses[layer] += 1
        replaced.add(b)
        stem = node.name or node.output[0]
        if layer not in weights:
            module, per_channel, reduce_range = layers[layer]
            weight = module.weight.detach().float().cpu()
            codes, scale = quantize_weight_int8(
                weight, per_channel=per_channel, reduce_range=reduce_range
            )
            weights[layer] = [fresh(f"{layer}.weight_{s}") for s in ("quantized", "scale", "zp")]
            arrays = [codes.numpy().T, scale.numpy(), np.zeros(scale.shape, dtype=np.int8)]
            for array, name in zip(arrays, weights[layer], strict=True):
                graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        w_q, w_scale, w_zp = weights[layer]
        a = node.input[0]
        if a not in activations:
            activations[a] = [fresh(f"{a}_{s}") for s in ("quantized", "scale", "zero_point")]
            new_nodes.append(make(stem, "DynamicQuantizeLinear", [a], activations[a]))
        a_q, a_scale, a_zp = activations[a]
        scales, acc, cast, product = (fresh(f"{stem}_{s}") for s in ("scales", "acc", "f", "mm"))
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and bool(node.input[2])
        new_nodes += [
            make(stem, "Mul", [a_scale, w_scale], [scales]),
            make(stem, "MatMulInteger", [a_q, w_q, a_zp, w_zp], [acc]),
            make(stem, "Cast", [acc], [cast], to=TensorProto.FLOAT),
            make(stem, "Mul", [cast, scales], [product if has_bias else node.output[0]]),
        ]
        if has_bias:
            new_nodes.append(make(stem, "Add", [product, node.input[2]], [node.output[0]]))
    if missing := [name for name, count in uses.items() if count == 0]:
        shown = ", ".join(repr(n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise UnsupportedModuleError(
            f"dynamic_quant: weight of {shown} feeds no MatMul/Gemm B input in the exported graph; "
            "exclude it in the scope"
        )
    del graph.node[:]
    graph.node.extend(new_nodes)
    still_used = set(_inputs(graph)) | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name not in replaced or i.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return uses


def _match(
    node: onnx.NodeProto,
    inits: dict[str, onnx.TensorProto],
    alias: dict[str, str],
    by_w: dict[tuple, str],
    by_wt: dict[tuple, str],
) -> tuple[str | None, str]:
    """``(layer, initializer)``: the layer whose weight is this node's B input, if rewritable."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None, ""
    table = by_wt
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        has_c = len(node.input) > 2 and node.input[2]
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("transA", 0) != 0:
            return None, ""
        if has_c and attrs.get("beta", 1.0) != 1.0:
            return None, ""
        table = by_w if attrs.get("transB", 0) else by_wt
    b = node.input[1]
    while b in alias:
        b = alias[b]
    init = inits.get(b)
    if init is None or init.data_type != TensorProto.FLOAT or len(init.dims) != 2:
        return None, ""
    return table.get(_key(numpy_helper.to_array(init))), b


def _inputs(graph: onnx.GraphProto) -> Iterator[str]:
    """Every tensor name read by a node, inside If/Loop/Scan bodies too."""
    for node in graph.node:
        yield from node.input
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs
            for sub in subgraphs:
                yield from _inputs(sub)

"""Export a calibrated fake-quant model to ONNX in the QDQ format ONNX Runtime runs in int8.

The model is traced by the TorchScript exporter while the slimkit quantizers emit
``torch.fake_quantize_per_{tensor,channel}_affine``, which become ``QuantizeLinear`` ->
``DequantizeLinear`` pairs (uint8 activations per tensor, int8 weights per output channel with
zero point 0). The graph is then cleaned so that ONNX Runtime's QDQ fusions apply:

* every constant subgraph except ``DequantizeLinear`` is folded, so each weight is an int8
  initializer feeding a ``DequantizeLinear``;
* ``QuantizeLinear`` nodes that quantize the same tensor with equal constant qparams (the
  inputs of the Q, K and V projections) are merged, so the tensor is quantized once;
* a ``Transpose`` of a dequantized constant weight (a Linear on 3-D inputs exports as
  ``MatMul(x, W.T)``) is folded into the int8 codes, with the per-channel axis moved along, so
  the ``MatMul`` reads ``DequantizeLinear`` directly;
* a ``Gather`` from a dequantized constant table (an int8 ``nn.Embedding``) gathers the int8
  codes and dequantizes the gathered rows, instead of the whole table on every run;
* the (already rounded) float bias of a Conv/Gemm whose input and weight are dequantized is
  stored as int32 codes on the grid ``input_scale * weight_scale`` behind a
  ``DequantizeLinear``, as ``QLinearConv``/``QGemm`` expect.

On a CPU, ONNX Runtime (graph optimisation level ``all``) then fuses DQ -> Conv [-> Relu] -> Q
into ``QLinearConv``, residual adds into ``QLinearAdd``, global average pooling into
``QLinearGlobalAveragePool`` and Linear into ``QGemm``; see
:func:`slimkit.export.onnx.optimized_op_counts`. With ``reduce_range`` (7-bit activations) each
``QuantizeLinear`` is followed by a ``Clip`` to 127 on the uint8 codes, which ONNX Runtime keeps
as a separate op; a float ``Clip`` (ReLU6) feeding such a quantizer is redundant and removed
(:func:`slimkit.export.clips.drop_redundant_clips`), else ORT runs those convs in float. Ops
slimkit does not quantize (SiLU, Sigmoid, Mul, ...) run in float between ``DequantizeLinear`` and
``QuantizeLinear``.

Models quantized with ``StaticQuantization(mode="hooks")`` (transformers) have quantized Linear
inputs and float outputs: ``Q -> DQ -> MatMul`` with a ``DQ`` weight and no ``Q`` after it,
which ONNX Runtime fuses into ``MatMulIntegerToFloat`` (2-D inputs: ``Gemm`` -> ``QGemm`` with
float output); the bias ``Add``, GELU, LayerNorm and attention stay float.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

from slimkit.errors import ConfigError, StateError
from slimkit.export.clips import drop_redundant_clips
from slimkit.export.onnx import PathLike, export_onnx
from slimkit.io import atomic_path
from slimkit.quant.fake import ActivationQuantizer, BiasQuantizer, WeightQuantizer

__all__ = [
    "dequantize_after_gather",
    "export_qdq",
    "fold_constants",
    "fold_weight_transposes",
    "merge_duplicate_quantizers",
    "quantize_biases",
]

_QUANTIZERS = (ActivationQuantizer, WeightQuantizer, BiasQuantizer)
_INT32 = (-(2**31), 2**31 - 1)


def _check_quantizers(model: nn.Module) -> None:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, _QUANTIZERS)]
    if not found:
        raise StateError(
            f"{type(model).__name__} has no slimkit quantizers: apply StaticQuantization and "
            "calibrate before export_qdq"
        )
    waiting = [n for n, m in found if not m.is_calibrated]
    if waiting:
        shown = ", ".join(waiting[:3]) + (
            f" and {len(waiting) - 3} more" if len(waiting) > 3 else ""
        )
        raise StateError(f"export_qdq needs a calibrated model; not calibrated: {shown}")
    for name, module in found:
        spec = module.spec
        if isinstance(module, BiasQuantizer):
            continue
        if spec.bits != 8:
            raise ConfigError(
                f"export_qdq writes 8-bit QDQ only; quantizer {name!r} uses bits={spec.bits}"
            )
        if not module.enabled:
            raise ConfigError(f"export_qdq: quantizer {name!r} is disabled (enabled=False)")


def export_qdq(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | torch.Tensor,
    path: PathLike,
    *,
    opset: int = 17,
    dynamic_batch: bool = True,
    **export_options: Any,
) -> Path:
    """Write the calibrated fake-quant ``model`` as an ONNX QDQ model at ``path``; return it.

    ``export_options`` (``input_names``, ``output_names``, ``dynamic_axes``) go to
    :func:`slimkit.export.onnx.export_onnx`.

    Raises :class:`StateError` when the model has no quantizers or is not calibrated, and
    :class:`ConfigError` for quantizers of fewer than 8 bits (emulation only) or ``opset < 13``
    (per-channel ``DequantizeLinear`` needs 13). The file is checked with ``onnx.checker`` and
    written atomically. Outputs of ONNX Runtime equal the fake-quant model's up to rounding of
    values within float error of a tie (one quantization step, rarely).
    """
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 13:
        raise ConfigError(f"export_qdq needs opset >= 13 (per-channel QDQ), got {opset!r}")
    _check_quantizers(model)
    with tempfile.TemporaryDirectory(prefix="slimkit-qdq-") as folder, warnings.catch_warnings():
        # the weight fake-quant is traced on constants; the tracer's warnings do not apply
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        raw = export_onnx(
            model,
            example_inputs,
            Path(folder) / "raw.onnx",
            opset=opset,
            dynamic_batch=dynamic_batch,
            **export_options,
        )
        proto = onnx.load(str(raw))
    fold_constants(proto)
    merge_duplicate_quantizers(proto)
    fold_weight_transposes(proto)
    dequantize_after_gather(proto)
    drop_redundant_clips(proto)  # ReLU6 before a 7-bit QuantizeLinear: keeps the convs on int8
    quantize_biases(proto)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp))
    return Path(path)


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in graph.initializer}


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Evaluate (in place) every node whose inputs are all constant, except ``DequantizeLinear``.

    Folded outputs become initializers and unused initializers are dropped, so a quantized
    weight ends up as ``int8 initializer -> DequantizeLinear``. Returns ``model``.
    """
    graph = model.graph
    values = _constants(graph)
    kept, added = [], {}
    for node in graph.node:
        inputs = [name for name in node.input if name]
        foldable = node.op_type != "DequantizeLinear" and all(n in values for n in inputs)
        if not foldable or node.domain not in ("", "ai.onnx"):
            kept.append(node)
            continue
        outputs = ReferenceEvaluator(node).run(None, {n: values[n] for n in inputs})
        for name, value in zip(node.output, outputs, strict=True):
            values[name] = added[name] = np.asarray(value)
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in added.items())
    _drop_unused_initializers(graph)
    return model


def merge_duplicate_quantizers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Keep one of several ``QuantizeLinear`` nodes with the same input and equal constant
    scale, zero point and attributes; readers of the others read the first. Returns ``model``.
    """
    graph = model.graph
    values = _constants(graph)
    outputs = {out.name for out in graph.output}
    first: dict[tuple, str] = {}
    renamed: dict[str, str] = {}
    kept = []
    for node in graph.node:
        qparams = [values.get(name) for name in node.input[1:]]
        mergeable = node.op_type == "QuantizeLinear" and node.output[0] not in outputs
        if not mergeable or any(v is None for v in qparams):
            kept.append(node)
            continue
        key = (
            node.input[0],
            tuple((v.dtype.str, v.shape, v.tobytes()) for v in qparams),
            tuple(sorted(a.SerializeToString() for a in node.attribute)),
        )
        if key in first:
            renamed[node.output[0]] = first[key]
            continue
        first[key] = node.output[0]
        kept.append(node)
    if not renamed:
        return model
    for node in kept:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    del graph.node[:]
    graph.node.extend(kept)
    _drop_unused_initializers(graph)
    return model


def fold_weight_transposes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold ``codes -> DequantizeLinear -> Transpose`` into ``codes.T -> DequantizeLinear``.

    Only where the codes, scale and zero point are initializers and the ``Transpose`` is the
    dequantized weight's only reader; a per-axis ``DequantizeLinear`` gets the axis the
    transpose moves its axis to. Returns ``model`` (changed in place).
    """
    graph = model.graph
    values = _constants(graph)
    nodes = list(graph.node)
    replaced: dict[int, onnx.NodeProto | None] = {}  # node index -> replacement (None: drop)
    for index, user in _constant_dequantize_read_by(graph, nodes, values, "Transpose"):
        dq, transpose = nodes[index], nodes[user]
        codes = values[dq.input[0]]
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
        perm = list(range(codes.ndim))[::-1] if perm is None else perm
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        scale = values[dq.input[1]]
        if scale.size > 1:
            attrs["axis"] = perm.index(attrs.get("axis", 1) % codes.ndim)
        stem = f"{dq.input[0]}_transposed"
        while stem in values:
            stem += "_"
        values[stem] = codes
        graph.initializer.append(
            numpy_helper.from_array(np.ascontiguousarray(codes.transpose(perm)), stem)
        )
        replaced[index] = None
        replaced[user] = helper.make_node(
            "DequantizeLinear",
            [stem, *dq.input[1:]],
            [transpose.output[0]],
            name=f"{stem}_DequantizeLinear",
            **attrs,
        )
    if not replaced:
        return model
    kept = [replaced.get(i, node) for i, node in enumerate(nodes)]
    kept = [node for node in kept if node is not None]
    del graph.node[:]
    graph.node.extend(kept)
    _drop_unused_initializers(graph)
    return model


def dequantize_after_gather(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite ``codes -> DequantizeLinear -> Gather(indices)`` as
    ``Gather(codes, indices) -> DequantizeLinear``.

    Only where the codes and qparams are initializers, the ``Gather`` is the dequantized
    table's only reader and a per-axis scale is not along the gathered axis; that axis is then
    counted from the end (the gather may change the rank). Returns ``model`` (in place).
    """
    graph = model.graph
    values = _constants(graph)
    nodes = list(graph.node)
    replaced: dict[int, list[onnx.NodeProto]] = {}  # node index -> its replacement nodes
    for index, user in _constant_dequantize_read_by(graph, nodes, values, "Gather"):
        dq, gather = nodes[index], nodes[user]
        if gather.input[0] != dq.output[0]:
            continue
        rank = values[dq.input[0]].ndim
        gather_axis = next((a.i for a in gather.attribute if a.name == "axis"), 0) % rank
        attrs = {}
        if values[dq.input[1]].size > 1:
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % rank
            if axis == gather_axis:
                continue
            attrs["axis"] = axis if axis < gather_axis else axis - rank
        codes = f"{gather.output[0]}_quantized"
        replaced[index] = []
        replaced[user] = [
            helper.make_node(
                "Gather",
                [dq.input[0], gather.input[1]],
                [codes],
                name=f"{gather.name or codes}_int8",
                axis=gather_axis,
            ),
            helper.make_node(
                "DequantizeLinear",
                [codes, *dq.input[1:]],
                [gather.output[0]],
                name=f"{codes}_DequantizeLinear",
                **attrs,
            ),
        ]
    if not replaced:
        return model
    kept = [new for i, node in enumerate(nodes) for new in replaced.get(i, [node])]
    del graph.node[:]
    graph.node.extend(kept)
    _drop_unused_initializers(graph)
    return model


def _constant_dequantize_read_by(
    graph: onnx.GraphProto,
    nodes: list[onnx.NodeProto],
    values: dict[str, np.ndarray],
    op_type: str,
) -> Iterator[tuple[int, int]]:
    """``(dq index, reader index)`` for each ``DequantizeLinear`` of initializers whose output is
    not a graph output and is read by exactly one node, of type ``op_type``."""
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            readers.setdefault(name, []).append(index)
    outputs = {out.name for out in graph.output}
    for index, dq in enumerate(nodes):
        if dq.op_type != "DequantizeLinear" or dq.output[0] in outputs:
            continue
        users = readers.get(dq.output[0], [])
        if len(users) != 1 or nodes[users[0]].op_type != op_type:
            continue
        if all(name in values for name in dq.input if name):
            yield index, users[0]


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    used |= {out.name for out in graph.output}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def quantize_biases(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn float biases of dequantized Conv/Gemm into int32 ``DequantizeLinear`` inputs.

    For a Conv or Gemm whose input and weight come from ``DequantizeLinear`` with constant
    scales and whose bias is a float initializer, the bias is stored as
    ``round(bias / (input_scale * weight_scale))`` in int32 (float32 product, the grid
    :class:`~slimkit.quant.fake.BiasQuantizer` rounds to) with zero point 0. Returns ``model``.
    """
    graph = model.graph
    values = _constants(graph)
    producers = {out: node for node in graph.node for out in node.output}
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
            new_nodes.append(node)
            continue
        x_dq, w_dq = producers.get(node.input[0]), producers.get(node.input[1])
        bias = values.get(node.input[2])
        dequantized = all(p is not None and p.op_type == "DequantizeLinear" for p in (x_dq, w_dq))
        if not dequantized or bias is None or bias.dtype != np.float32:
            new_nodes.append(node)
            continue
        if node.op_type == "Gemm" and any(
            a.name == "transB" and a.i == 0 for a in node.attribute
        ):  # per-channel axis 0 of B is an output channel only with transB=1
            new_nodes.append(node)
            continue
        x_scale, w_scale = values.get(x_dq.input[1]), values.get(w_dq.input[1])
        if x_scale is None or w_scale is None or x_scale.size != 1:
            new_nodes.append(node)
            continue
        scale = (np.float32(x_scale.reshape(())) * w_scale.astype(np.float32)).astype(np.float32)
        scale = np.broadcast_to(scale.reshape(-1), bias.shape).astype(np.float32)
        codes = np.clip(np.rint(bias.astype(np.float64) / scale), *_INT32).astype(np.int32)
        stem = node.input[2]
        names = (f"{stem}_quantized", f"{stem}_scale", f"{stem}_zero_point", f"{stem}_dequantized")
        graph.initializer.extend(
            [
                numpy_helper.from_array(codes, names[0]),
                numpy_helper.from_array(scale, names[1]),
                numpy_helper.from_array(np.zeros_like(codes), names[2]),
            ]
        )
        new_nodes.append(
            helper.make_node(
                "DequantizeLinear",
                list(names[:3]),
                [names[3]],
                name=f"{stem}_DequantizeLinear",
                axis=0,
            )
        )
        node.input[2] = names[3]
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused_initializers(graph)
    return model

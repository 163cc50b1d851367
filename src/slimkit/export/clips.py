"""Drop float ``Clip`` nodes that a following ``QuantizeLinear`` makes redundant.

ONNX Runtime fuses ``DequantizeLinear -> Conv -> [Relu | Clip] -> QuantizeLinear`` into
``QLinearConv`` only when the activation changes nothing the quantizer would not: it checks the
float ``Clip`` bounds against the full range of the quantized type (uint8: codes 0..255). With
7-bit activations (``StaticQuantizationConfig(reduce_range=True)``) the codes stop at 127 through
an integer ``Clip`` after the ``QuantizeLinear``; ONNX Runtime does not look that far, so a
ReLU6 (``Clip(0, 6)``) whose 7-bit grid ends at or below 6 is kept, and the convolution before it
falls back to float (``FusedConv`` between ``DequantizeLinear``/``QuantizeLinear``): in
MobileNetV2 11 of 16 convolutions, 5-8x slower than the all-integer graph.

:func:`drop_redundant_clips` removes such a ``Clip`` when it provably changes no code: for every
``x`` beyond its bounds the quantizer already saturates at the (effective) end of its grid,
computed as ONNX Runtime rounds (float32 ``x / scale``, half to even). The result is exact.

This is a graph pass over an exported QDQ model; :func:`slimkit.export.qdq.export_qdq` does not
run it yet, so call it on the exported file (see ``benchmarks/quant_digits.py``).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["drop_redundant_clips"]


def _scalar(values: dict[str, np.ndarray], name: str) -> np.ndarray | None:
    value = values.get(name)
    return value if value is not None and value.size == 1 else None


def _clip_bounds(
    node: onnx.NodeProto, values: dict[str, np.ndarray]
) -> tuple[float | None, float | None] | None:
    """Constant ``(min, max)`` of a Clip (None for an absent bound), or None if not constant."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    bounds: list[float | None] = [attrs.get("min"), attrs.get("max")]  # opset < 11
    for i in (1, 2):
        if len(node.input) > i and node.input[i]:
            value = _scalar(values, node.input[i])
            if value is None:
                return None
            bounds[i - 1] = value.reshape(()).item()
    return bounds[0], bounds[1]


def drop_redundant_clips(model: onnx.ModelProto) -> int:
    """Remove (in place) each float ``Clip`` whose only reader is a ``QuantizeLinear`` that
    saturates at or inside the Clip's bounds; return how many were removed.

    The quantizer's code range is its type's, narrowed by an integer ``Clip`` that is the only
    reader of its output (slimkit's 7-bit ``reduce_range`` codes). Needs constant bounds, scale
    and zero point; anything else is left alone.
    """
    graph = model.graph
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    graph_outputs = {out.name for out in graph.output}
    dropped: list[onnx.NodeProto] = []
    for clip in graph.node:
        if clip.op_type != "Clip" or clip.domain not in ("", "ai.onnx"):
            continue
        users = readers[clip.output[0]]
        if clip.output[0] in graph_outputs or len(users) != 1:
            continue
        quant = users[0]
        if quant.op_type != "QuantizeLinear" or quant.input[0] != clip.output[0]:
            continue
        bounds = _clip_bounds(clip, values)
        scale = _scalar(values, quant.input[1])
        has_zp = len(quant.input) > 2 and quant.input[2]
        zero_point = _scalar(values, quant.input[2]) if has_zp else np.zeros((), np.uint8)
        if bounds is None or scale is None or zero_point is None:
            continue
        info = np.iinfo(zero_point.dtype)
        qmin, qmax = int(info.min), int(info.max)
        narrowing = readers[quant.output[0]]
        if len(narrowing) == 1 and narrowing[0].op_type == "Clip":
            code_bounds = _clip_bounds(narrowing[0], values)
            if code_bounds is not None:
                qmin = qmin if code_bounds[0] is None else max(qmin, int(code_bounds[0]))
                qmax = qmax if code_bounds[1] is None else min(qmax, int(code_bounds[1]))
        s, z = np.float32(scale.reshape(())), int(zero_point.reshape(()))
        lo, hi = bounds
        low_ok = lo is None or int(np.rint(np.float32(lo) / s)) + z <= qmin
        high_ok = hi is None or int(np.rint(np.float32(hi) / s)) + z >= qmax
        if low_ok and high_ok:
            quant.input[0] = clip.input[0]
            dropped.append(clip)
    for clip in dropped:
        graph.node.remove(clip)
    used = {name for node in graph.node for name in node.input} | graph_outputs
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return len(dropped)

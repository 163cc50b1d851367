"""Redundant float Clips before 7-bit QuantizeLinear: removed exactly, integer kernels restored."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from slimkit.export.clips import drop_redundant_clips
from slimkit.export.onnx import optimized_op_counts
from slimkit.export.qdq import export_qdq
from slimkit.measure.latency import ort_session
from slimkit.quant.ptq import StaticQuantizationConfig, quantize_static
from slimkit.tasks.data import load_digits_split

FLOAT_CONVS = {"Conv", "FusedConv", "NhwcFusedConv"}


def _graph(clip_max: float, scale: float, code_max: int | None) -> onnx.ModelProto:
    """x -> Clip(0, clip_max) -> Q(scale, zp 0, uint8) [-> Clip(0, code_max)] -> DQ -> y."""
    inits = [
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(clip_max, np.float32), "hi"),
        numpy_helper.from_array(np.array(scale, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.uint8), "z"),
    ]
    nodes = [
        helper.make_node("Clip", ["x", "lo", "hi"], ["c"]),
        helper.make_node("QuantizeLinear", ["c", "s", "z"], ["q"]),
    ]
    codes = "q"
    if code_max is not None:
        inits.append(numpy_helper.from_array(np.array(code_max, np.uint8), "cmax"))
        nodes.append(helper.make_node("Clip", ["q", "", "cmax"], ["q7"]))
        codes = "q7"
    nodes.append(helper.make_node("DequantizeLinear", [codes, "s", "z"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize(
    ("clip_max", "scale", "code_max", "dropped"),
    [
        (6.0, 6.0 / 127, 127, 1),  # 7-bit grid ends at 6: ReLU6 redundant
        (6.0, 5.0 / 127, 127, 1),  # grid ends below 6
        (6.0, 6.0 / 127, None, 0),  # uint8 grid reaches 12: the clip matters
        (6.0, 6.0 / 255, None, 1),  # 8-bit grid ends at 6 (ORT would drop it too)
        (6.0, 6.5 / 127, 127, 0),  # grid beyond 6
    ],
)
def test_clip_dropped_only_when_it_changes_no_code(clip_max, scale, code_max, dropped):
    model = _graph(clip_max, scale, code_max)
    x = np.linspace(-3, 15, 2001, dtype=np.float32)
    want = _run(model, x)
    assert drop_redundant_clips(model) == dropped
    onnx.checker.check_model(model)
    assert np.array_equal(_run(model, x), want)
    names = {i.name for i in model.graph.initializer}
    assert ("hi" in names) == (dropped == 0)  # bounds of a removed clip are dropped


def test_mobilenet_reduce_range_gets_integer_kernels_back(trained_digits_model, tmp_path):
    """export_qdq runs the pass: every ReLU6 conv of MobileNet stays on QLinearConv under
    reduce_range (without it 11 of 16 convs fell back to float), and the pass is idempotent."""
    split = load_digits_split(seed=0)
    calibration = list(itertools.islice(split.loaders(batch_size=64, seed=0).train, 4))
    images = split.test.tensors[0]
    config = StaticQuantizationConfig(reduce_range=True)
    quantized = quantize_static(trained_digits_model("mobilenet"), calibration, config)
    path = export_qdq(quantized, images[:1], tmp_path / "mbv2_rr.onnx")
    after = optimized_op_counts(path)
    assert after["QLinearConv"] == 16 and not FLOAT_CONVS & set(after)
    proto = onnx.load(str(path))
    assert drop_redundant_clips(proto) == 0  # nothing left to drop
    got = ort_session(path).run(None, {"input": images.numpy()})[0]
    with torch.no_grad():
        want = quantized(images).numpy()
    step = float(quantized.activation_quantizers["classifier"].scale)
    assert np.abs(got - want).max() <= step * 1.01 + 1e-6

"""QDQ graph passes used by ``export_qdq``: merging duplicate QuantizeLinear nodes, folding
the Transpose of a dequantized weight into its int8 codes and gathering int8 table rows.
Outputs before and after each pass are compared in ONNX Runtime (optimisations off) on
hand-built graphs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimkit.export.onnx import onnx_op_counts
from slimkit.export.qdq import (
    dequantize_after_gather,
    fold_weight_transposes,
    merge_duplicate_quantizers,
)


def _model(nodes, initializers, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["rows", "cols"]) for n in outputs],
        [numpy_helper.from_array(value, name) for name, value in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    return session.run(None, {"x": x})


X = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "codes": rng.integers(-127, 128, (3, 4)).astype(np.int8),  # (out, in) like nn.Linear
        "w_scale": np.array([0.01, 0.02, 0.03], dtype=np.float32),
        "w_zp": np.zeros(3, dtype=np.int8),
        "x_scale": np.array(0.02, dtype=np.float32),
        "x_zp": np.array(128, dtype=np.uint8),
        "x_scale_copy": np.array(0.02, dtype=np.float32),  # equal value, other name
        "x_zp_copy": np.array(128, dtype=np.uint8),
        "x_scale_other": np.array(0.03, dtype=np.float32),
    }


def test_duplicate_quantizers_are_merged_but_different_qparams_are_not():
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["q1"]),
        helper.make_node("QuantizeLinear", ["x", "x_scale_copy", "x_zp_copy"], ["q2"]),
        helper.make_node("QuantizeLinear", ["x", "x_scale_other", "x_zp"], ["q3"]),
        helper.make_node("DequantizeLinear", ["q1", "x_scale", "x_zp"], ["y1"]),
        helper.make_node("DequantizeLinear", ["q2", "x_scale", "x_zp"], ["y2"]),
        helper.make_node("DequantizeLinear", ["q3", "x_scale_other", "x_zp"], ["y3"]),
    ]
    model = _model(nodes, _weights(), ["y1", "y2", "y3"])
    before = _run(model, X)
    merge_duplicate_quantizers(model)
    onnx.checker.check_model(model)
    assert onnx_op_counts(model) == {"DequantizeLinear": 3, "QuantizeLinear": 2}
    readers = [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert readers == ["q1", "q1", "q3"]
    for got, want in zip(_run(model, X), before, strict=True):
        np.testing.assert_array_equal(got, want)
    assert "x_scale_copy" not in {i.name for i in model.graph.initializer}


@pytest.mark.parametrize("perm", [None, [1, 0]])
def test_transpose_of_a_per_channel_weight_is_folded_into_the_codes(perm):
    attrs = {} if perm is None else {"perm": perm}
    nodes = [
        helper.make_node("DequantizeLinear", ["codes", "w_scale", "w_zp"], ["w"], axis=0),
        helper.make_node("Transpose", ["w"], ["w_t"], **attrs),
        helper.make_node("MatMul", ["x", "w_t"], ["y"]),
    ]
    model = _model(nodes, _weights(), ["y"])
    before = _run(model, X)
    fold_weight_transposes(model)
    onnx.checker.check_model(model)
    assert onnx_op_counts(model) == {"DequantizeLinear": 1, "MatMul": 1}
    dq = model.graph.node[0]
    assert helper.get_attribute_value(dq.attribute[0]) == 1  # the channel axis moved along
    codes = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}[dq.input[0]]
    assert codes.shape == (4, 3) and codes.dtype == np.int8
    np.testing.assert_allclose(_run(model, X)[0], before[0], rtol=1e-6, atol=1e-6)


def test_shared_or_non_constant_dequantize_is_left_alone():
    nodes = [
        helper.make_node("DequantizeLinear", ["codes", "w_scale", "w_zp"], ["w"], axis=0),
        helper.make_node("Transpose", ["w"], ["w_t"]),
        helper.make_node("Identity", ["w"], ["w_copy"]),  # a second reader of w
        helper.make_node("MatMul", ["x", "w_t"], ["y"]),
    ]
    model = _model(nodes, _weights(), ["y", "w_copy"])
    fold_weight_transposes(model)
    assert onnx_op_counts(model)["Transpose"] == 1


def _gather_model(scale: np.ndarray, dq_axis: int, gather_axis: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    tables = {
        "table": rng.integers(-127, 128, (6, 4)).astype(np.int8),
        "t_scale": scale,
        "t_zp": np.zeros(scale.shape, dtype=np.int8),
        "ids": np.array([[0, 5, 5], [2, 1, 3]], dtype=np.int64),
    }
    nodes = [
        helper.make_node("DequantizeLinear", ["table", "t_scale", "t_zp"], ["w"], axis=dq_axis),
        helper.make_node("Gather", ["w", "ids"], ["rows"], axis=gather_axis),
        helper.make_node("Identity", ["x"], ["x_out"]),
    ]
    return _model(nodes, tables, ["rows", "x_out"])


@pytest.mark.parametrize(
    "scale", [np.array(0.05, np.float32), np.array([0.01, 0.02, 0.03, 0.04], np.float32)]
)
def test_gather_reads_int8_codes_and_dequantizes_the_rows(scale):
    model = _gather_model(scale, dq_axis=1)
    before = _run(model, X)
    dequantize_after_gather(model)
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Gather", "DequantizeLinear", "Identity"]
    dq = model.graph.node[1]
    axis = {a.name: a.i for a in dq.attribute}.get("axis")
    assert axis == (-1 if scale.size > 1 else None)  # the table's columns are the last axis
    np.testing.assert_array_equal(_run(model, X)[0], before[0])
    assert _run(model, X)[0].shape == (2, 3, 4)


def test_gather_along_the_scaled_axis_is_left_alone():
    model = _gather_model(np.linspace(0.01, 0.06, 6, dtype=np.float32), dq_axis=0)
    dequantize_after_gather(model)
    assert [n.op_type for n in model.graph.node][:2] == ["DequantizeLinear", "Gather"]

"""QDQ export: graph layout, ONNX Runtime integer kernels, agreement with the fake-quant model."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from slimkit.errors import ConfigError, StateError
from slimkit.export.onnx import onnx_op_counts, optimized_op_counts
from slimkit.export.qdq import export_qdq
from slimkit.models.cnn import DigitsResNet
from slimkit.quant.ptq import StaticQuantization, StaticQuantizationConfig, quantize_static
from slimkit.tasks.data import load_digits_split

FLOAT_KERNELS = {"Conv", "FusedConv", "NhwcFusedConv", "Gemm", "MatMul", "FusedMatMul"}


@pytest.fixture(scope="module")
def split():
    return load_digits_split(seed=0)


@pytest.fixture(scope="module")
def calibration(split):
    loader = split.loaders(batch_size=64, seed=0).train
    return list(itertools.islice(loader, 8))


@pytest.fixture(scope="module")
def test_images(split) -> torch.Tensor:
    return split.test.tensors[0]


@pytest.fixture(scope="module")
def resnet(trained_digits_model) -> nn.Module:
    return trained_digits_model("resnet")


def _run_ort(path: Path, x: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def _fake_quant(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


def _assert_integer_graph(counts: dict[str, int], convs: int) -> None:
    assert counts.get("QLinearConv", 0) == convs, counts
    assert not FLOAT_KERNELS & set(counts), counts  # no float Conv/Gemm left
    assert counts.get("QLinearAdd", 0) >= 1 and counts.get("QLinearGlobalAveragePool") == 1
    assert counts.get("QGemm") == 1


def test_resnet_qdq_runs_integer_kernels_and_matches_fake_quant(
    tmp_path, resnet, calibration, test_images
):
    quantized = quantize_static(resnet, calibration)
    path = export_qdq(quantized, test_images[:1], tmp_path / "resnet.onnx")
    assert path == tmp_path / "resnet.onnx"
    onnx.checker.check_model(str(path))

    proto = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    weights = [inits[n.input[0]] for n in dq if inits[n.input[0]].dtype == np.int8]
    biases = [inits[n.input[0]] for n in dq if inits[n.input[0]].dtype == np.int32]
    assert len(weights) == len(biases) == 10  # 9 convs + fc, each per output channel
    for node in dq:
        assert not inits[node.input[2]].any()  # symmetric weights, int32 bias: zero point 0
        assert {a.name: a.i for a in node.attribute}.get("axis") == 0
        assert inits[node.input[1]].size == inits[node.input[0]].shape[0]
    assert all(w.min() >= -127 for w in weights)  # narrow range
    acts = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert all(inits[n.input[2]].dtype == np.uint8 for n in acts)

    raw, optimized = onnx_op_counts(path), optimized_op_counts(path, level="all")
    print(f"DigitsResNet QDQ ops: {raw}\nafter ORT 'all': {optimized}")
    _assert_integer_graph(optimized, convs=9)
    assert optimized["QLinearAdd"] == 3

    want = _fake_quant(quantized, test_images)
    got = _run_ort(path, test_images)
    step = float(quantized.activation_quantizers["fc"].scale)
    diff = float(np.abs(got - want).max())
    print(f"ORT vs fake-quant logits: max |diff| {diff:.6f} = {diff / step:.3f} output steps")
    assert diff <= step * 1.01 + 1e-6
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99
    one = _run_ort(path, test_images[:1])  # dynamic batch
    np.testing.assert_allclose(one, got[:1], atol=step * 1.01 + 1e-6)


def test_float_logits_without_post_quant(tmp_path, resnet, calibration, test_images):
    quantized = quantize_static(resnet, calibration, StaticQuantizationConfig(post_quant=False))
    assert "fc" not in quantized.activation_quantizers
    path = export_qdq(quantized, test_images[:1], tmp_path / "float_out.onnx")
    counts = optimized_op_counts(path)
    assert counts.get("QGemm") == 1 and "QuantizeLinear" in counts and "Gemm" not in counts
    want, got = _fake_quant(quantized, test_images), _run_ort(path, test_images)
    # float logits: a one-step difference in every fc input moves a logit by at most this much
    in_step = float(quantized.activation_quantizers["avgpool"].scale)
    weight = quantized.fc.weight.detach()
    bound = in_step * float(weight.abs().sum(dim=1).max())
    diff = float(np.abs(got - want).max())
    print(f"float logits: max |diff| {diff:.6f}, bound for one input step {bound:.6f}")
    assert diff <= bound


OBSERVERS = ["minmax", "moving_average", "percentile", "mse", "entropy"]


@pytest.mark.parametrize("observer", OBSERVERS)
def test_every_observer_end_to_end(tmp_path, resnet, calibration, test_images, observer):
    config = StaticQuantizationConfig(observer=observer)
    quantized = quantize_static(resnet, calibration[:4], config)
    path = export_qdq(quantized, test_images[:1], tmp_path / f"{observer}.onnx")
    _assert_integer_graph(optimized_op_counts(path), convs=9)
    want, got = _fake_quant(quantized, test_images), _run_ort(path, test_images)
    step = float(quantized.activation_quantizers["fc"].scale)
    assert np.abs(got - want).max() <= step * 1.01 + 1e-6


def test_reduce_range_and_per_tensor_weights(tmp_path, resnet, calibration, test_images):
    config = StaticQuantizationConfig(reduce_range=True, per_channel=False)
    quantized = quantize_static(resnet, calibration, config)
    assert all(q.spec.qmax == 127 for q in quantized.activation_quantizers.values())
    path = export_qdq(quantized, test_images[:1], tmp_path / "reduced.onnx")
    counts = optimized_op_counts(path)
    # 7-bit codes need a Clip after each QuantizeLinear; ORT keeps it (on uint8) and still fuses
    assert counts["QLinearConv"] == 9 and "Conv" not in counts
    want, got = _fake_quant(quantized, test_images), _run_ort(path, test_images)
    step = float(quantized.activation_quantizers["fc"].scale)
    assert np.abs(got - want).max() <= step * 1.01 + 1e-6


def test_fp32_layers_stay_float_in_ort(tmp_path, resnet, calibration, test_images):
    config = StaticQuantizationConfig(fp32_layers=["layer3.0.conv*"])
    quantized = quantize_static(resnet, calibration, config)
    path = export_qdq(quantized, test_images[:1], tmp_path / "mixed.onnx")
    counts = optimized_op_counts(path)
    assert counts["QLinearConv"] == 7
    assert counts.get("Conv", 0) + counts.get("FusedConv", 0) == 2


def test_mobilenet_end_to_end(trained_digits_model, tmp_path, split, calibration, test_images):
    model = trained_digits_model("mobilenet")
    quantized = quantize_static(model, calibration)
    path = export_qdq(quantized, test_images[:1], tmp_path / "mobilenet.onnx")
    counts = optimized_op_counts(path)
    print(f"mobilenetv2_tiny after ORT 'all': {counts}")
    _assert_integer_graph(counts, convs=16)
    assert "Clip" not in counts  # ReLU6 folded into the QuantizeLinear range
    got = _run_ort(path, test_images)
    fp32 = _fake_quant(model, test_images)
    want = _fake_quant(quantized, test_images)
    step = float(quantized.activation_quantizers["classifier"].scale)
    agreement = float((got.argmax(1) == fp32.argmax(1)).mean())
    diff = float(np.abs(got - want).max())
    labels = split.test.tensors[1].numpy()
    outputs = {"fp32": fp32, "fake-quant": want, "ORT int8": got}
    accuracy = {k: round(float((v.argmax(1) == labels).mean()), 4) for k, v in outputs.items()}
    print(
        f"mobilenet: accuracy {accuracy}; ORT int8 vs fp32 top-1 agreement {agreement:.4f}; "
        f"ORT vs fake-quant max |diff| {diff:.6f} = {diff / step:.3f} output steps"
    )
    assert agreement >= 0.9
    assert diff <= step * 1.01 + 1e-6


def test_export_errors(tmp_path, calibration):
    x = calibration[0][0][:1]
    with pytest.raises(StateError, match="no slimkit quantizers"):
        export_qdq(DigitsResNet(width=4), x, tmp_path / "plain.onnx")
    model = DigitsResNet(width=4)
    StaticQuantization().apply(model)
    target = tmp_path / "existing.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(StateError, match="needs a calibrated model; not calibrated: "):
        export_qdq(model, x, target)
    assert target.read_bytes() == b"previous"
    low = quantize_static(DigitsResNet(width=4), calibration[:1], StaticQuantizationConfig(bits=4))
    with pytest.raises(ConfigError, match=r"8-bit QDQ only.*bits=4"):
        export_qdq(low, x, tmp_path / "low.onnx")
    ready = quantize_static(DigitsResNet(width=4), calibration[:1])
    with pytest.raises(ConfigError, match="opset >= 13"):
        export_qdq(ready, x, tmp_path / "old.onnx", opset=12)
    ready.activation_quantizers["x"].enabled = False
    with pytest.raises(ConfigError, match="disabled"):
        export_qdq(ready, x, tmp_path / "off.onnx")


def test_reduce_range_keeps_relu6_convs_on_integer_kernels(
    trained_digits_model, tmp_path, calibration, test_images
):
    """ReLU6 before a 7-bit QuantizeLinear is a float Clip ORT would keep, and the conv would
    fall back to float; export_qdq drops it (the 7-bit code range clips harder anyway)."""
    model = trained_digits_model("mobilenet")
    quantized = quantize_static(model, calibration, StaticQuantizationConfig(reduce_range=True))
    path = export_qdq(quantized, test_images[:1], tmp_path / "mobilenet7.onnx")
    counts = optimized_op_counts(path)
    _assert_integer_graph(counts, convs=16)
    got, want = _run_ort(path, test_images), _fake_quant(quantized, test_images)
    step = float(quantized.activation_quantizers["classifier"].scale)
    assert float(np.abs(got - want).max()) <= step * 1.01 + 1e-6

"""Int8 sentence encoders in ONNX Runtime: static (hooks-mode QDQ) and dynamic, on a tiny
random BERT :class:`SentenceEncoder` with dynamic batch and sequence axes.

Asserted per export: the integer kernels ONNX Runtime runs after optimisation (one per Linear,
float MatMuls left only for the two attention products per layer), ORT outputs equal slimkit's
PyTorch emulation to float32 rounding on a batch of another shape than the export's, and the
int8 embeddings stay close to fp32. With ``embeddings=True`` the tables are gathered as int8.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from slimkit.export.onnx import export_onnx, onnx_op_counts, optimized_op_counts
from slimkit.export.qdq import export_qdq
from slimkit.measure.fidelity import cosine_similarity_stats
from slimkit.measure.latency import ort_session
from slimkit.models.sentence import sentence_encoder_tiny
from slimkit.quant.dynamic import DynamicQuantConfig, DynamicQuantization, export_dynamic_onnx
from slimkit.quant.ptq import StaticQuantization, StaticQuantizationConfig, quantize_static

LAYERS, LINEARS = 2, 12  # 6 Linear per BERT layer: q, k, v, attention out, intermediate, out
INPUTS = ["input_ids", "attention_mask"]
EXPORT = {
    "input_names": INPUTS,
    "output_names": ["embeddings"],
    "dynamic_axes": {name: {1: "sequence"} for name in INPUTS},
}


def _batch(batch: int, tokens: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (batch, tokens), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, tokens // 2 :] = 0  # one padded sentence
    return {"input_ids": ids * mask, "attention_mask": mask}


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return sentence_encoder_tiny()


@pytest.fixture(scope="module")
def probe() -> dict[str, torch.Tensor]:
    return _batch(5, 23, seed=99)  # not the export's shape (2 x 11)


def _ort(path: Path, batch: dict[str, torch.Tensor]) -> np.ndarray:
    return ort_session(path).run(None, {k: v.numpy() for k, v in batch.items()})[0]


def _example() -> tuple[torch.Tensor, torch.Tensor]:
    batch = _batch(2, 11, seed=1)
    return batch["input_ids"], batch["attention_mask"]


def _weight_matmuls_read_dequantize(path: Path) -> int:
    """MatMuls whose B input is produced by a DequantizeLinear (no Transpose in between)."""
    graph = onnx.load(str(path)).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    return sum(
        1
        for node in graph.node
        if node.op_type == "MatMul" and producers.get(node.input[1]) == "DequantizeLinear"
    )


def _assert_ort_equals_emulation(got: np.ndarray, emulated, fp32) -> None:
    """ORT == emulation to float32 rounding, while both really differ from fp32."""
    to_emulation = np.abs(got - emulated.numpy()).max()
    to_fp32 = np.abs(got - fp32.numpy()).max()
    assert to_emulation < 1e-5 and to_fp32 > 20 * to_emulation, (to_emulation, to_fp32)
    assert cosine_similarity_stats(fp32, got)["min"] > 0.999


@torch.no_grad()
def test_static_hooks_qdq_runs_matmul_integer_to_float(encoder, probe, tmp_path):
    calibration = [_batch(8, 12, seed) for seed in range(4)]
    quantized = quantize_static(encoder, calibration, StaticQuantizationConfig(mode="hooks"))
    path = export_qdq(quantized, _example(), tmp_path / "static.onnx", **EXPORT)

    raw = onnx_op_counts(path)
    assert _weight_matmuls_read_dequantize(path) == LINEARS
    # q, k and v read one tensor with equal qparams: quantized once, 4 quantizers per layer
    assert raw["QuantizeLinear"] == 4 * LAYERS
    assert raw["DequantizeLinear"] == 2 * LINEARS  # each weight, and each Linear's input
    optimized = optimized_op_counts(path)
    assert optimized["MatMulIntegerToFloat"] == LINEARS
    float_matmuls = optimized.get("MatMul", 0) + optimized.get("FusedMatMul", 0)
    assert float_matmuls == 2 * LAYERS  # q @ k.T and attention @ v only
    assert "DequantizeLinear" not in optimized

    _assert_ort_equals_emulation(_ort(path, probe), quantized(**probe), encoder(**probe))


@torch.no_grad()
def test_dynamic_export_runs_dynamic_quantize_matmul(encoder, probe, tmp_path):
    model = sentence_encoder_tiny()
    model.load_state_dict(encoder.state_dict())
    DynamicQuantization(DynamicQuantConfig(per_channel=True)).apply(model)
    path = export_dynamic_onnx(model, _example(), tmp_path / "dynamic.onnx", **EXPORT)

    raw = onnx_op_counts(path)
    assert raw["MatMulInteger"] == LINEARS
    assert raw["DynamicQuantizeLinear"] == 4 * LAYERS  # q, k, v share one
    optimized = optimized_op_counts(path)
    fused = optimized.get("DynamicQuantizeMatMul", 0)
    assert fused + optimized.get("MatMulIntegerToFloat", 0) == LINEARS and fused >= 3 * LAYERS
    assert optimized.get("MatMul", 0) + optimized.get("FusedMatMul", 0) == 2 * LAYERS

    _assert_ort_equals_emulation(_ort(path, probe), model(**probe), encoder(**probe))


@torch.no_grad()
def test_fp32_export_has_a_dynamic_sequence_axis(encoder, probe, tmp_path):
    path = export_onnx(encoder, _example(), tmp_path / "fp32.onnx", **EXPORT)
    shapes = {}
    for value in onnx.load(str(path)).graph.input:
        shapes[value.name] = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    assert shapes["input_ids"] == ["batch", "sequence"]
    assert np.abs(_ort(path, probe) - encoder(**probe).numpy()).max() < 1e-5


@torch.no_grad()
def test_int8_embeddings_are_gathered_as_int8(encoder, probe, tmp_path):
    calibration = [_batch(8, 12, seed) for seed in range(2)]
    config = StaticQuantizationConfig(mode="hooks", embeddings=True)
    quantized = quantize_static(encoder, calibration, config)
    table = quantized.transformer.embeddings.word_embeddings
    assert table.parametrizations.weight[0].scale.shape == (32,)  # one scale per dimension
    path = export_qdq(quantized, _example(), tmp_path / "static_emb.onnx", **EXPORT)

    graph = onnx.load(str(path)).graph
    types = {init.name: init.data_type for init in graph.initializer}
    tables = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in types]
    assert len(tables) == 3  # word, position and token type tables
    assert all(types[n.input[0]] == onnx.TensorProto.INT8 for n in tables)
    floats = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert max(len(i.dims) for i in floats) == 1  # no float matrix left (biases, norms only)
    optimized = optimized_op_counts(path)
    assert optimized["DequantizeLinear"] == 3 and optimized["MatMulIntegerToFloat"] == LINEARS
    _assert_ort_equals_emulation(_ort(path, probe), quantized(**probe), encoder(**probe))
    technique = StaticQuantization(config)
    technique.apply(sentence_encoder_tiny())
    rows = {row[0]: row for row in technique.summary().rows}
    assert rows["transformer.embeddings.word_embeddings"][1:] == ["Embedding", 8, None, None]
    assert len(rows) == LINEARS + 3


class BagOfWords(torch.nn.Module):
    """torch.fx-traceable: embedding, mean over tokens, Linear (graph mode quantizes it)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(ids).mean(dim=1))


@torch.no_grad()
def test_graph_mode_quantizes_embeddings_weight_only(tmp_path):
    torch.manual_seed(0)
    model = BagOfWords().eval()
    batches = [torch.randint(0, 50, (8, 5)) for _ in range(3)]
    config = StaticQuantizationConfig(embeddings=True, post_quant=False)
    quantized = quantize_static(model, batches, config)
    assert "embed" not in "".join(dict(quantized.activation_quantizers))  # no input quantizer
    path = export_qdq(quantized, batches[0][:2], tmp_path / "bow.onnx")
    ids = torch.randint(0, 50, (3, 5))
    got = ort_session(path).run(None, {"input": ids.numpy()})[0]
    assert np.abs(got - quantized(ids).numpy()).max() < 1e-5
    assert optimized_op_counts(path).get("QGemm") == 1
    graph = onnx.load(str(path)).graph
    types = {init.name: init.data_type for init in graph.initializer}
    gather = next(n for n in graph.node if n.op_type == "Gather")
    assert types[gather.input[0]] == onnx.TensorProto.INT8

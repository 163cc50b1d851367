"""Dynamic int8 quantization: emulation vs ONNX Runtime, export graph, peer comparison, errors.

What is asserted, per model (MLP and BERT-tiny):

* the exported graph has one ``MatMulInteger`` per Linear and no float ``MatMul``/``Gemm`` on a
  Linear weight, passes ``onnx.checker`` and runs in ONNX Runtime with a dynamic batch;
* slimkit's PyTorch emulation matches ONNX Runtime to ``1e-4 * max|fp32 output|`` (observed:
  equal to float32 rounding, ~1e-7);
* the quantized outputs stay close to fp32 (cosine similarity > 0.99);
* our relative L2 error vs fp32 is at most 1.5x that of ``onnxruntime.quantization.
  quantize_dynamic`` on the same fp32 ONNX, both in its default settings and with ours
  (per-channel, MatMul/Gemm only).
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import nn

from slimkit.core.scope import Scope
from slimkit.errors import ConfigError, ScopeError, StateError, UnsupportedModuleError
from slimkit.export.onnx import export_onnx, onnx_op_counts
from slimkit.models import bert_tiny_encoder
from slimkit.quant.dynamic import (
    DynamicQuantConfig,
    DynamicQuantization,
    DynamicQuantLinear,
    dynamic_linear,
    dynamic_quantize_activation,
    export_dynamic_onnx,
    quantize_weight_int8,
)

logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's "consider pre-processing"


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def peer_outputs(fp32_path, tmp_path, feeds, **options) -> list[np.ndarray]:
    """Outputs of ORT's own ``quantize_dynamic`` applied to the same fp32 ONNX."""
    out = tmp_path / f"peer_{len(list(tmp_path.iterdir()))}.onnx"
    quantize_dynamic(str(fp32_path), str(out), weight_type=QuantType.QInt8, **options)
    return session(out).run(None, feeds)


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message, message
    return message


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(nn.functional.gelu(self.fc1(x)))))


class BertOutputs(nn.Module):
    """BERT-tiny returning the encoder's hidden states and the classifier logits."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = bert_tiny_encoder()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        hidden = self.bert.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        return hidden, self.bert.classifier(hidden[:, 0])


# --- math ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        np.random.default_rng(0).normal(size=(4, 7)) * 3,
        np.random.default_rng(1).uniform(0.5, 2.0, size=(3, 5)),  # all positive: zero point 0
        -np.random.default_rng(2).uniform(0.5, 2.0, size=(3, 5)),  # all negative: 255
        np.zeros((2, 3)),  # scale 1
        np.arange(-255, 256, dtype=np.float64).reshape(1, -1) / 2,  # exact ties
    ],
)
def test_activation_quantization_matches_ort_dynamic_quantize_linear(values):
    x = values.astype(np.float32)
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "scale", "zp"])
    graph = helper.make_graph(
        [node],
        "dql",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [
            helper.make_tensor_value_info("y", TensorProto.UINT8, x.shape),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("zp", TensorProto.UINT8, []),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    y, scale, zp = ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(None, {"x": x})
    codes, our_scale, our_zp = dynamic_quantize_activation(torch.from_numpy(x))
    assert np.array_equal(codes.numpy(), y)
    assert our_scale.item() == scale.item() and our_zp.item() == zp.item()


def test_dynamic_linear_equals_fake_quantized_float_linear():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(3, 5, 24), torch.randn(16, 24), torch.randn(16)
    for per_channel in (True, False):
        codes, w_scale = quantize_weight_int8(weight, per_channel=per_channel)
        assert codes.dtype == torch.int8 and int(codes.abs().max()) == 127
        a_q, a_scale, a_zp = dynamic_quantize_activation(x)
        x_hat = (a_q.float() - a_zp) * a_scale
        w_hat = codes.float() * (w_scale.reshape(-1, 1) if per_channel else w_scale)
        expected = x_hat @ w_hat.T + bias
        out = dynamic_linear(x, weight, bias, per_channel=per_channel)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    codes, _ = quantize_weight_int8(weight, reduce_range=True)
    assert int(codes.abs().max()) == 63


def test_emulation_passes_gradients_straight_through():
    linear = nn.Linear(8, 4)
    x = torch.randn(2, 8, requires_grad=True)
    DynamicQuantLinear.convert(linear)
    linear(x).sum().backward()
    assert x.grad is not None and linear.weight.grad is not None
    torch.testing.assert_close(x.grad, linear.weight.sum(0).expand(2, 8).detach())


# --- technique ----------------------------------------------------------------------------------


def test_technique_life_cycle():
    torch.manual_seed(0)
    model, x = Mlp().eval(), torch.randn(4, 32)
    reference, keys = model(x), set(model.state_dict())
    config = DynamicQuantConfig(scope=Scope(exclude=("head",)))
    assert DynamicQuantConfig.from_dict(config.to_dict()) == config
    technique = DynamicQuantization(config)
    technique.apply(model)
    technique.apply(model)
    assert type(model.fc1) is DynamicQuantLinear and type(model.head) is nn.Linear
    assert set(model.state_dict()) == keys
    quantized = model(x)
    assert not torch.equal(quantized, reference)
    torch.testing.assert_close(quantized, reference, atol=0.02, rtol=0.05)
    rows = technique.summary().to_dict()
    assert [r["module"] for r in rows["layers"]] == ["fc1", "fc2"]
    assert rows["skipped"] == [{"module": "head", "reason": "excluded by rule 'head'"}]
    assert all(0 < r["weight_rel_error"] < 0.01 for r in rows["layers"])
    with pytest.raises(StateError):
        technique.apply(Mlp())
    plain = technique.finalize(model)
    assert all(type(m) is nn.Linear for m in (plain.fc1, plain.fc2, plain.head))
    assert torch.equal(plain(x), reference)


def test_errors_are_one_line(tmp_path):
    with pytest.raises(ScopeError) as exc:
        DynamicQuantization(DynamicQuantConfig(scope=Scope(include=("fc9",)))).apply(Mlp())
    assert "matches no module" in one_line(exc)
    convs = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ConfigError) as exc:
        DynamicQuantization(DynamicQuantConfig()).apply(convs)
    assert "Linear" in one_line(exc)
    with pytest.raises(ConfigError) as exc:
        export_dynamic_onnx(convs, torch.randn(1, 3, 8, 8), tmp_path / "c.onnx")
    assert "Linear" in one_line(exc)
    applied = Mlp()
    DynamicQuantization(DynamicQuantConfig()).apply(applied)
    with pytest.raises(ConfigError, match="already has DynamicQuantization"):
        export_dynamic_onnx(
            applied, torch.randn(1, 32), tmp_path / "m.onnx", config=DynamicQuantConfig()
        )
    with pytest.raises(ConfigError, match="per_channel"):
        DynamicQuantConfig(per_channel="sometimes")


def test_a_weight_that_feeds_no_matmul_is_named_and_nothing_is_written(tmp_path):
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return nn.functional.linear(x, self.fc.weight * 2)  # folded into a new constant

    path = tmp_path / "scaled.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(UnsupportedModuleError) as exc:
        export_dynamic_onnx(Scaled(), torch.randn(2, 8), path)
    assert "'fc'" in one_line(exc)
    assert path.read_bytes() == b"previous"


# --- export vs ONNX Runtime ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        DynamicQuantConfig(),
        DynamicQuantConfig(per_channel=False),
        DynamicQuantConfig(reduce_range=True),
    ],
    ids=["per_channel", "per_tensor", "reduce_range"],
)
def test_mlp_export_matches_emulation_and_peer(tmp_path, config):
    torch.manual_seed(0)
    model, x = Mlp().eval(), torch.randn(16, 32)
    fp32 = model(x).detach().numpy()
    quantized = copy.deepcopy(model)
    DynamicQuantization(config).apply(quantized)
    emulated = quantized(x).detach().numpy()
    path = export_dynamic_onnx(quantized, x, tmp_path / "mlp.onnx")
    counts = onnx_op_counts(path)
    assert counts["MatMulInteger"] == 3 and counts["DynamicQuantizeLinear"] == 3
    assert "Gemm" not in counts and "MatMul" not in counts
    initializers = onnx.load(str(path)).graph.initializer
    assert not [i.name for i in initializers if i.name.endswith(".weight")]  # fp32 weights gone
    ours = session(path).run(None, {"input": x.numpy()})[0]
    scale = np.abs(fp32).max()
    assert np.abs(ours - emulated).max() <= 1e-4 * scale
    assert session(path).run(None, {"input": x[:3].numpy()})[0].shape == (3, 10)

    export_onnx(model, x, tmp_path / "fp32.onnx")
    feeds = {"input": x.numpy()}
    options = {"per_channel": config.per_channel, "reduce_range": config.reduce_range}
    peer = peer_outputs(tmp_path / "fp32.onnx", tmp_path, feeds, **options)
    ours_err, peer_err = relative_error(ours, fp32), relative_error(peer[0], fp32)
    print(
        f"MLP {config.per_channel=} {config.reduce_range=}: ours {ours_err:.5f}, ORT {peer_err:.5f}"
    )
    assert cosine(ours, fp32) > 0.99
    assert ours_err <= 1.5 * peer_err


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::UserWarning")
def test_bert_tiny_export_matches_emulation_fp32_and_peer(tmp_path):
    torch.manual_seed(0)
    model = BertOutputs().eval()
    ids = torch.randint(0, 1000, (4, 24))
    mask = torch.ones(4, 24, dtype=torch.long)
    mask[1, 15:] = 0
    mask[3, 9:] = 0
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    names = {"input_names": ["input_ids", "attention_mask"], "output_names": ["hidden", "logits"]}
    hidden, logits = (t.detach().numpy() for t in model(ids, mask))
    linears = sum(type(m) is nn.Linear for m in model.modules())

    quantized = copy.deepcopy(model)
    DynamicQuantization(DynamicQuantConfig()).apply(quantized)
    emulated = [t.detach().numpy() for t in quantized(ids, mask)]
    path = export_dynamic_onnx(quantized, (ids, mask), tmp_path / "bert.onnx", **names)
    counts = onnx_op_counts(path)
    print(f"BERT-tiny: {counts['MatMulInteger']} MatMulInteger for {linears} Linear layers")
    assert linears == 13 and counts["MatMulInteger"] == linears
    assert counts["DynamicQuantizeLinear"] == 9  # Q, K and V share one activation quantizer
    ours = session(path).run(None, feeds)
    for got, emu, ref in zip(ours, emulated, (hidden, logits), strict=True):
        assert np.abs(got - emu).max() <= 1e-4 * np.abs(ref).max()
    assert cosine(ours[0], hidden) > 0.99
    assert cosine(ours[0][:, 0], hidden[:, 0]) > 0.99  # CLS token
    assert cosine(ours[1], logits) > 0.99
    small = {k: v[:2] for k, v in feeds.items()}
    assert session(path).run(None, small)[1].shape == (2, 2)

    fp32_path = export_onnx(model, (ids, mask), tmp_path / "fp32.onnx", **names)
    peers = {
        "ORT default": peer_outputs(fp32_path, tmp_path, feeds),
        "ORT per-channel MatMul/Gemm": peer_outputs(
            fp32_path, tmp_path, feeds, per_channel=True, op_types_to_quantize=["MatMul", "Gemm"]
        ),
    }
    for i, output in enumerate(("hidden", "logits")):
        reference = (hidden, logits)[i]
        ours_err = relative_error(ours[i], reference)
        for label, peer in peers.items():
            peer_err = relative_error(peer[i], reference)
            print(f"BERT-tiny {output}: rel. error ours {ours_err:.5f}, {label} {peer_err:.5f}")
            assert ours_err <= 1.5 * peer_err

"""ONNX export: numerics against torch, dynamic batch, one-line errors, atomic writes."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from slimkit.errors import ConfigError, SlimkitError, UnsupportedModuleError
from slimkit.export.onnx import export_onnx, onnx_op_counts, optimized_op_counts


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class RaisesInForward(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("boom: this model cannot run\nsecond line")


class UsesFFT(nn.Module):
    """``aten::fft_fft`` has no ONNX symbolic in the TorchScript exporter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.fft(x).abs()


@pytest.fixture
def net() -> SmallNet:
    torch.manual_seed(0)
    model = SmallNet()
    with torch.no_grad():  # non-trivial BN statistics so folding is exercised
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def test_export_matches_torch_at_two_batch_sizes(tmp_path, net):
    net.train()
    path = export_onnx(net, torch.randn(1, 3, 8, 8), tmp_path / "net.onnx")
    assert path == tmp_path / "net.onnx" and path.exists()
    assert net.training and net.bn.training  # training flags restored
    net.eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert session.get_inputs()[0].shape[0] == "batch"
    assert session.get_outputs()[0].shape[0] == "batch"
    for batch in (1, 5):
        x = torch.randn(batch, 3, 8, 8)
        (got,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            want = net(x).numpy()
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_export_names_and_op_counts(tmp_path, net):
    path = export_onnx(
        net, (torch.randn(2, 3, 8, 8),), tmp_path / "n.onnx", input_names=["x"], output_names=["y"]
    )
    counts = onnx_op_counts(path)
    assert counts["Conv"] == 1 and counts["Gemm"] == 1
    assert "BatchNormalization" not in counts  # folded into the conv by the exporter
    optimized = optimized_op_counts(path)
    assert "Conv" in optimized or "FusedConv" in optimized
    assert "Relu" not in optimized  # fused into the conv at level "all"
    assert optimized_op_counts(path, level="disable") == counts
    with pytest.raises(ConfigError, match="optimization level"):
        optimized_op_counts(path, level="max")


def test_forward_error_is_one_line_slimkit_error(tmp_path):
    with pytest.raises(SlimkitError) as info:
        export_onnx(RaisesInForward(), torch.randn(1, 4), tmp_path / "bad.onnx")
    message = str(info.value)
    assert message == "ONNX export of RaisesInForward failed: boom: this model cannot run"
    assert not (tmp_path / "bad.onnx").exists()


def test_unsupported_operator_is_unsupported_module_error(tmp_path):
    with pytest.raises(UnsupportedModuleError) as info:
        export_onnx(UsesFFT(), torch.randn(2, 16), tmp_path / "fft.onnx")
    message = str(info.value)
    assert message.startswith("ONNX export of UsesFFT failed: ")
    assert "fft" in message and "\n" not in message


def test_failed_export_leaves_existing_file_untouched(tmp_path):
    target = tmp_path / "model.onnx"
    original = b"previous export, byte for byte \x00\x01\x02"
    target.write_bytes(original)
    with pytest.raises(SlimkitError):
        export_onnx(UsesFFT(), torch.randn(2, 16), target)
    assert target.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temp files left


def test_static_batch_when_dynamic_batch_is_off(tmp_path, net):
    path = export_onnx(net, torch.randn(3, 3, 8, 8), tmp_path / "s.onnx", dynamic_batch=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [3, 3, 8, 8]


def test_trailing_dict_is_kwargs_and_every_output_gets_a_batch_axis(tmp_path):
    class TwoOutputs(nn.Module):
        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple:
            return x * 2, {"pooled": (x * mask).sum(-1)}

    x, mask = torch.randn(2, 3), torch.ones(2, 3)
    path = export_onnx(TwoOutputs(), (x, {"mask": mask}), tmp_path / "two.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [
        ("input_0", ["batch", 3]),
        ("input_1", ["batch", 3]),
    ]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [
        ("output_0", ["batch", 3]),
        ("output_1", ["batch"]),
    ]
    feed = {"input_0": np.ones((4, 3), np.float32), "input_1": np.ones((4, 3), np.float32)}
    doubled, pooled = session.run(None, feed)
    np.testing.assert_allclose(pooled, np.full(4, 3.0))
    assert doubled.shape == (4, 3)

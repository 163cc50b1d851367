"""slimkit bench: ORT latency + size of an ONNX file, and its errors."""

import json

import torch
from torch import nn

from slimkit.cli import main
from slimkit.export.onnx import export_onnx
from slimkit.measure.bench import bench_onnx


def _model_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    return export_onnx(model, (torch.zeros(1, 1, 8, 8),), tmp_path / "m.onnx")


def test_bench_reports_each_batch_size_and_size(tmp_path):
    path = _model_file(tmp_path)
    report = bench_onnx(path, batch_sizes=(1, 4), repeats=5, warmup=1)
    assert [r.batch_size for r in report.results] == [1, 4]
    assert report.bytes == path.stat().st_size
    for r in report.results:
        assert r.min_ms <= r.median_ms <= r.p90_ms
        assert r.threads == 1 and r.repeats == 5
    assert "isa" in report.cpu


def test_bench_cli_writes_json(tmp_path, capsys):
    path = _model_file(tmp_path)
    out = tmp_path / "bench.json"
    args = ["bench", str(path), "--batch", "2", "--repeats", "3", "--warmup", "1", "--json"]
    assert main([*args, str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["results"][0]["batch_size"] == 2
    assert "median ms" in capsys.readouterr().out


def test_bench_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "missing.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"slimkit: error: model not found: {tmp_path / 'missing.onnx'}"]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    assert main(["bench", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot run" in err[0]

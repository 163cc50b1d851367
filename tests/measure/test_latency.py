"""ONNX Runtime / torch latency: consistent statistics, batch handling, interleaved comparison."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from slimkit.errors import ConfigError
from slimkit.export.onnx import export_onnx
from slimkit.measure.latency import (
    ISA_FLAGS,
    compare_latency,
    cpu_info,
    measure_ort_latency,
    measure_torch_latency,
    ort_session,
    synthetic_inputs,
    time_callable,
)


def _mlp(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, hidden), nn.ReLU(), nn.Linear(hidden, 256))


@pytest.fixture(scope="module")
def small_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("lat") / "small.onnx"
    return export_onnx(_mlp(256), torch.randn(1, 256), path)  # 131k MACs per sample


@pytest.fixture(scope="module")
def big_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("lat") / "big.onnx"
    return export_onnx(_mlp(2048), torch.randn(1, 256), path)  # 8x the MACs of small


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return (self.emb(input_ids) * attention_mask.unsqueeze(-1)).sum(1)


def test_result_fields_are_consistent(small_path):
    result = measure_ort_latency(small_path, batch_size=4, threads=1, warmup=2, repeats=15)
    assert result.min_ms <= result.median_ms <= result.p90_ms
    assert result.min_ms <= result.mean_ms
    assert result.batch_size == 4 and result.threads == 1
    assert result.warmup == 2 and result.repeats == 15
    assert result.per_sample_ms == pytest.approx(result.median_ms / 4)
    assert result.provider == "CPUExecutionProvider"
    assert set(result.to_dict()) >= {"median_ms", "p90_ms", "per_sample_ms", "threads"}


def test_given_inputs_must_match_batch_size(small_path):
    x = np.zeros((3, 256), dtype=np.float32)
    result = measure_ort_latency(small_path, {"input": x}, batch_size=3, warmup=0, repeats=3)
    assert result.per_sample_ms == pytest.approx(result.median_ms / 3)
    with pytest.raises(ConfigError, match="batch_size=2"):
        measure_ort_latency(small_path, {"input": x}, batch_size=2, warmup=0, repeats=1)
    result = measure_ort_latency(
        small_path, input_factory=lambda b: {"input": np.ones((b, 256), np.float32)}, batch_size=2
    )
    assert result.batch_size == 2


def test_synthetic_inputs_follow_metadata(tmp_path):
    ids, mask = torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)
    path = export_onnx(
        TokenModel(),
        (ids, mask),
        tmp_path / "tok.onnx",
        input_names=["input_ids", "attention_mask"],
    )
    session = ort_session(path, threads=2)
    inputs = synthetic_inputs(session, batch_size=3)
    assert inputs["input_ids"].shape == (3, 5) and inputs["input_ids"].dtype == np.int64
    assert inputs["input_ids"].min() >= 0 and inputs["input_ids"].max() < 100
    assert (inputs["attention_mask"] == 1).all()
    again = synthetic_inputs(session, batch_size=3)  # fixed seed
    assert np.array_equal(inputs["input_ids"], again["input_ids"])
    assert measure_ort_latency(path, batch_size=3, threads=2, repeats=3).threads == 2


def test_symbolic_dims_use_defaults(tmp_path):
    ids = torch.zeros(1, 5, dtype=torch.long)
    path = tmp_path / "seq.onnx"
    torch.onnx.export(
        nn.Embedding(100, 4),
        (ids,),
        str(path),
        input_names=["ids"],
        dynamic_axes={"ids": {0: "batch", 1: "seq"}},
        dynamo=False,
    )
    session = ort_session(path)
    assert synthetic_inputs(session, batch_size=2)["ids"].shape == (2, 16)
    assert synthetic_inputs(session, dim_defaults={"seq": 7})["ids"].shape == (1, 7)


def test_fixed_batch_and_bad_settings_are_errors(tmp_path, small_path):
    fixed = export_onnx(_mlp(8), torch.randn(1, 256), tmp_path / "f.onnx", dynamic_batch=False)
    with pytest.raises(ConfigError, match="fixed batch of 1"):
        measure_ort_latency(fixed, batch_size=4)
    with pytest.raises(ConfigError, match="threads"):
        ort_session(small_path, threads=0)
    with pytest.raises(ConfigError, match="repeats"):
        measure_ort_latency(small_path, repeats=0)


def test_compare_latency_self_ratio_and_bigger_model(small_path, big_path):
    report = compare_latency(
        {"small": small_path, "same": small_path, "big": big_path},
        batch_sizes=(1, 64),
        rounds=2,
        warmup=3,
        repeats=15,
    )
    assert report["reference"] == "small" and report["batch_sizes"] == [1, 64]
    results = report["results"]
    for batch in (1, 64):
        assert results["small"][batch]["ratio"] == 1.0
        assert len(results["big"][batch]["rounds_ms"]) == 2
        assert 0.5 < results["same"][batch]["ratio"] < 2.0
    assert results["big"][64]["ratio"] > 1.5
    assert results["big"][64]["per_sample_ms"] == pytest.approx(
        results["big"][64]["median_ms"] / 64
    )


def test_torch_latency_and_time_callable():
    model = _mlp(64).train()
    before = torch.get_num_threads()
    result = measure_torch_latency(model, torch.randn(8, 256), warmup=1, repeats=5, threads=1)
    assert result.batch_size == 8 and result.threads == 1 and result.provider == "torch"
    assert result.min_ms <= result.median_ms <= result.p90_ms
    assert model.training and torch.get_num_threads() == before
    calls = []
    times = time_callable(lambda: calls.append(1), warmup=2, repeats=4)
    assert len(times) == 4 and len(calls) == 6 and all(t >= 0 for t in times)


def test_cpu_info_reports_isa_and_versions():
    info = cpu_info()
    assert set(info["isa"]) == set(ISA_FLAGS)
    assert all(v is None or isinstance(v, bool) for v in info["isa"].values())
    assert info["logical_cores"] >= 1 and info["model_name"]
    assert info["onnxruntime"] and info["torch"] == torch.__version__

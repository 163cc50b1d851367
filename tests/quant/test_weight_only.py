"""Weight-only quantization: config, layer math, technique life cycle and the packed artifact."""

from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn

from slimkit.core.scope import Scope
from slimkit.core.technique import make_technique
from slimkit.errors import CheckpointError, ConfigError, ScopeError, StateError
from slimkit.quant.weight_only import (
    FORMAT,
    VERSION,
    WeightOnlyConfig,
    WeightOnlyLinear,
    WeightOnlyQuantization,
    load_weight_only,
    save_weight_only,
    strip_weight_only,
)


class Net(nn.Module):
    """A conv (unsupported), a Linear with 64 inputs and one with 48 (not a multiple of 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = nn.Linear(64, 48)
        self.fc2 = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.fc1(self.conv(x).flatten(1)))
        return self.fc2(hidden)


def mlp(layers: int = 4, width: int = 256, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message, message
    return message


def expanded_scale(layer: WeightOnlyLinear) -> torch.Tensor:
    if layer.group_size is None:
        return layer.scale[:, None].expand_as(layer.qweight)
    return layer.scale.repeat_interleave(layer.group_size, dim=1)


# --- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 9, 0, 4.5, True, "4"])
def test_bits_outside_2_to_8_is_a_one_line_config_error(bits):
    with pytest.raises(ConfigError) as exc:
        WeightOnlyConfig(bits=bits)
    assert "bits" in one_line(exc)


def test_config_is_data():
    config = WeightOnlyConfig(bits=4, group_size=32, symmetric=False, scope={"exclude": ["head"]})
    assert WeightOnlyConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["kind"] == "weight_only"
    with pytest.raises(ConfigError, match="group_size"):
        WeightOnlyConfig(group_size=0)
    with pytest.raises(ConfigError, match="unknown field"):
        WeightOnlyConfig.from_dict({"bitz": 4})
    assert isinstance(make_technique(config), WeightOnlyQuantization)


# --- layer math ---------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 6),
    groups=st.integers(1, 3),
    group_size=st.sampled_from([None, 1, 2, 5, 8]),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    magnitude=st.sampled_from([1e-7, 1e-3, 1.0, 300.0]),
    seed=st.integers(0, 2**16),
)
def test_reconstruction_error_is_at_most_half_a_step(
    out, groups, group_size, bits, symmetric, magnitude, seed
):
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(groups * (group_size or 4), out)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * magnitude)
        if out > 1:
            linear.weight[1].zero_()  # an all-zero channel gets scale 1
    settings_ = {"bits": bits, "group_size": group_size, "symmetric": symmetric}
    layer = WeightOnlyLinear.from_linear(linear, **settings_)
    scale = expanded_scale(layer)
    error = (linear.weight - layer.weight).abs()
    assert bool((error <= scale * (0.5 + 1e-5)).all())
    assert torch.equal(layer.scale.half().float(), layer.scale)  # float16 exactly
    assert bool((layer.scale > 0).all())
    codes = layer.qweight.int()
    assert layer.spec.qmin <= int(codes.min()) and int(codes.max()) <= layer.spec.qmax
    if symmetric:
        assert layer.qweight.dtype == torch.int8 and not layer.zero_point.any()
    else:
        assert layer.qweight.dtype == torch.uint8


def test_layer_forward_and_to_linear_use_the_dequantized_weight():
    torch.manual_seed(0)
    linear = nn.Linear(32, 8)
    layer = WeightOnlyLinear.from_linear(linear, bits=4, group_size=16)
    x = torch.randn(5, 32)
    expected = x @ layer.weight.T + linear.bias
    torch.testing.assert_close(layer(x), expected)
    plain = layer.to_linear()
    assert type(plain) is nn.Linear and torch.equal(plain.weight, layer.weight)
    assert torch.equal(plain(x), layer(x))
    assert "bits=4, group_size=16" in repr(layer)
    with pytest.raises(ConfigError, match="divisible"):
        WeightOnlyLinear(30, 8, group_size=16)


# --- technique ----------------------------------------------------------------------------------


def test_apply_swaps_linears_and_skips_with_reasons():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 4, 4)
    reference = model(x)
    technique = WeightOnlyQuantization(WeightOnlyConfig(bits=4, group_size=32))
    technique.apply(model)
    technique.apply(model)  # idempotent
    assert isinstance(model.fc1, WeightOnlyLinear) and type(model.fc2) is nn.Linear
    keys = set(model.state_dict())
    assert {"fc1.qweight", "fc1.scale", "fc1.zero_point", "fc1.bias"} <= keys
    assert "fc1.weight" not in keys
    assert model.fc1.scale.shape == (48, 2) and model.fc1.qweight.shape == (48, 64)
    skipped = dict(technique.summary().skipped)
    assert "not supported" in skipped["conv"]
    assert "48 input features not divisible by group_size=32" in skipped["fc2"]
    summary = technique.summary().to_dict()
    assert summary["layers"][0]["module"] == "fc1" and 0 < summary["layers"][0]["rel_error"] < 0.2
    torch.testing.assert_close(model(x), reference, atol=0.05, rtol=0.05)
    with pytest.raises(StateError, match="another model"):
        technique.apply(Net())

    quantized = model(x)
    plain = technique.finalize(model)
    assert all(type(m).__module__.startswith("torch.") for m in plain.modules() if m is not plain)
    assert torch.equal(plain(x), quantized)


def test_state_dict_round_trips_through_torch_save(tmp_path):
    model = mlp(layers=2, width=64)
    WeightOnlyQuantization(WeightOnlyConfig(bits=4, group_size=16, symmetric=False)).apply(model)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    other = mlp(layers=2, width=64, seed=1)
    WeightOnlyQuantization(WeightOnlyConfig(bits=4, group_size=16, symmetric=False)).apply(other)
    other.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    x = torch.randn(3, 64)
    assert torch.equal(other(x), model(x))
    assert all(type(m) is nn.Linear for m in strip_weight_only(other))


def test_scope_errors_are_one_line():
    with pytest.raises(ScopeError) as exc:
        WeightOnlyQuantization(WeightOnlyConfig(scope=Scope(include=("nope.*",)))).apply(Net())
    assert "matches no module" in one_line(exc)
    convs = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ConfigError) as exc:
        WeightOnlyQuantization(WeightOnlyConfig()).apply(convs)
    assert "Linear" in one_line(exc)
    with pytest.raises(ConfigError) as exc:  # every Linear skipped by group_size
        WeightOnlyQuantization(WeightOnlyConfig(group_size=7)).apply(mlp(1, 16))
    assert "no Linear layer left" in one_line(exc)


# --- artifact -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "group_size", "symmetric", "max_ratio"),
    [(4, 32, True, 0.16), (4, 32, False, 0.16), (8, None, True, 0.27), (8, None, False, 0.27)],
)
def test_artifact_size_and_exact_reload(tmp_path, bits, group_size, symmetric, max_ratio):
    model = mlp()
    dense = tmp_path / "fp32.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(dense))
    config = WeightOnlyConfig(bits=bits, group_size=group_size, symmetric=symmetric)
    quantized = copy.deepcopy(model)
    WeightOnlyQuantization(config).apply(quantized)
    path = save_weight_only(quantized, tmp_path / "w.safetensors")
    ratio = path.stat().st_size / dense.stat().st_size
    print(f"bits={bits} group_size={group_size} symmetric={symmetric}: {ratio:.4f}x fp32")
    assert ratio <= max_ratio

    x = torch.randn(4, 256)
    plain = load_weight_only(mlp(seed=1), path)  # plain Linears get the dequantized weights
    for ours, theirs in zip(plain, quantized, strict=True):
        assert type(ours) is nn.Linear and torch.equal(ours.weight, theirs.weight)
        assert torch.equal(ours.bias, theirs.bias)
    for original, layer in zip(model, quantized, strict=True):
        assert bool(
            ((original.weight - layer.weight).abs() <= expanded_scale(layer) * 0.50001).all()
        )
    assert torch.equal(plain(x), quantized(x))

    again = mlp(seed=2)
    WeightOnlyQuantization(config).apply(again)
    load_weight_only(again, path)  # WeightOnlyLinear layers get the codes
    for ours, theirs in zip(again, quantized, strict=True):
        for name in ("qweight", "scale", "zero_point", "bias"):
            assert torch.equal(getattr(ours, name), getattr(theirs, name))


def test_artifact_layout_and_metadata(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    technique = WeightOnlyQuantization(
        WeightOnlyConfig(bits=4, group_size=16, scope={"exclude": ["2"]})
    )
    technique.apply(model)
    path = save_weight_only(model, tmp_path / "w.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        record = json.loads(handle.metadata()["slimkit.weight_only"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    assert (record["format"], record["version"]) == (FORMAT, VERSION)
    assert (record["bits"], record["group_size"], record["symmetric"]) == (4, 16, True)
    assert record["layers"] == {
        "0": {"shape": [32, 64], "bits": 4, "group_size": 16, "symmetric": True, "dtype": "float32"}
    }
    assert tensors["0.qweight"].dtype == torch.uint8 and tensors["0.qweight"].shape == (
        32 * 64 // 2,
    )
    assert tensors["0.scale"].dtype == torch.float16 and tensors["0.scale"].shape == (32, 4)
    assert "0.zero_point" not in tensors
    assert tensors["2.weight"].dtype == torch.float32  # the excluded layer stays float
    assert set(tensors) == {"0.qweight", "0.scale", "0.bias", "2.weight", "2.bias"}


def test_save_is_atomic_and_needs_quantized_layers(tmp_path, monkeypatch):
    with pytest.raises(StateError) as exc:
        save_weight_only(mlp(1, 16), tmp_path / "w.safetensors")
    assert "WeightOnlyQuantization" in one_line(exc)
    model = mlp(1, 16)
    WeightOnlyQuantization(WeightOnlyConfig()).apply(model)
    path = save_weight_only(model, tmp_path / "w.safetensors")
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(CheckpointError) as exc:
        save_weight_only(model, path)
    assert "disk full" in one_line(exc)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_corrupt_or_mismatched_artifacts_raise_one_line_checkpoint_errors(tmp_path):
    model = mlp(2, 32)
    WeightOnlyQuantization(WeightOnlyConfig(bits=4, group_size=8)).apply(model)
    good = save_weight_only(model, tmp_path / "good.safetensors")
    data = good.read_bytes()

    def expect(path, target=None, match=""):
        with pytest.raises(CheckpointError) as exc:
            load_weight_only(mlp(2, 32) if target is None else target, path)
        assert match in one_line(exc)

    expect(tmp_path / "missing.safetensors", match="not found")
    (tmp_path / "garbage").write_bytes(b"\x00\x01not a safetensors file at all")
    expect(tmp_path / "garbage", match="not a readable safetensors")
    (tmp_path / "truncated").write_bytes(data[: len(data) // 2])
    expect(tmp_path / "truncated", match="not a readable safetensors")
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(mlp(2, 32).state_dict(), str(plain))
    expect(plain, match="not a slimkit weight-only artifact")

    with safe_open(str(good), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        record = json.loads(handle.metadata()["slimkit.weight_only"])

    def rewrite(name, tensors_, record_):
        path = tmp_path / name
        meta = {"slimkit.weight_only": json.dumps(record_)}
        safetensors.torch.save_file(tensors_, str(path), metadata=meta)
        return path

    expect(rewrite("v9", tensors, {**record, "version": 9}), match="version 9")
    bad_layer = {**record, "layers": {"0": {**record["layers"]["0"], "bits": 12}}}
    expect(rewrite("bits", tensors, bad_layer), match="bad metadata entry")
    short = {**tensors, "0.qweight": tensors["0.qweight"][:-1]}
    expect(rewrite("short", short, record), match="qweight must be torch.uint8")
    nan = {**tensors, "0.scale": torch.full_like(tensors["0.scale"], float("nan"))}
    expect(rewrite("nan", nan, record), match="positive and finite")
    expect(good, target=mlp(2, 16), match="does not fit")  # wrong shapes
    expect(good, target=nn.Sequential(nn.Conv2d(1, 1, 1), nn.Linear(32, 32)), match="Linear")
    other = mlp(2, 32)
    WeightOnlyQuantization(WeightOnlyConfig(bits=8)).apply(other)
    expect(good, target=other, match="(bits, group_size, symmetric)")

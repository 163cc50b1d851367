"""Tests for sparse packed checkpoints (slimkit.export.packed)."""

from __future__ import annotations

import json
import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open
from torch import nn

from slimkit.errors import CheckpointError, ConfigError
from slimkit.export import load_packed, load_packed_into, save_packed
from slimkit.export.packed import (
    METADATA_KEY,
    decode_gaps,
    decode_tensor,
    encode_gaps,
    encode_tensor,
)
from slimkit.measure.size import count_parameters

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Net(nn.Module):
    def __init__(self, width: int = 512) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 256), nn.ReLU(), nn.Linear(256, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def pruned_net(seed: int = 0, sparsity: float = 0.8) -> Net:
    """A Net whose Conv/Linear weights have exactly ``sparsity`` random zeros."""
    torch.manual_seed(seed)
    net = Net().eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                flat = module.weight.view(-1)
                flat[torch.randperm(flat.numel())[: round(sparsity * flat.numel())]] = 0.0
        bn = net.features[1]
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.num_batches_tracked.fill_(7)
    return net


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of a float tensor, as an integer tensor."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def zeros_to_positive(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t == 0, torch.zeros_like(t), t)


def expected(t: torch.Tensor, values_dtype: str) -> torch.Tensor:
    """Documented result: zeros become +0.0, values pass through values_dtype unless narrower."""
    vdtype = getattr(torch, values_dtype)
    stored = t.dtype if t.dtype.itemsize <= vdtype.itemsize else vdtype
    return zeros_to_positive(t).to(stored).to(t.dtype)


def assert_same_floats(actual: torch.Tensor, wanted: torch.Tensor) -> None:
    """Equal bit for bit, except that NaN payloads only need to be NaN."""
    assert actual.dtype == wanted.dtype and actual.shape == wanted.shape
    nan = torch.isnan(wanted)
    assert torch.equal(torch.isnan(actual), nan)
    assert torch.equal(bits(actual)[~nan], bits(wanted)[~nan])


def test_fp16_packing_at_80_percent_sparsity_is_at_most_015_of_dense_fp32_and_loads(tmp_path):
    net = pruned_net()
    assert 150_000 < count_parameters(net) < 300_000
    dense = {k: v.clone() for k, v in net.state_dict().items()}
    dense_bytes = len(safetensors.torch.save(dense))

    report = save_packed(net, tmp_path / "net.safetensors", values_dtype="float16")

    assert report.bytes_on_disk == (tmp_path / "net.safetensors").stat().st_size
    assert report.dense_fp32_bytes == dense_bytes
    assert report.ratio == pytest.approx(report.bytes_on_disk / dense_bytes)
    # payload bound: 1 mask bit + 0.2 * 16 value bits per 32 dense bits = 0.131
    assert 0.13 < report.ratio <= 0.15
    weights = [k for k in dense if k.endswith("weight") and dense[k].dim() > 1]
    assert {report.encodings[k] for k in weights} == {"bitmask"}
    assert report.encodings["features.1.num_batches_tracked"] == "raw"

    loaded, _ = load_packed(tmp_path / "net.safetensors")  # fp16 values come back upcast
    for name, tensor in dense.items():
        if tensor.is_floating_point():
            assert_same_floats(loaded[name], zeros_to_positive(tensor).half().float())
        else:
            assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype


def test_fp32_round_trip_is_bit_exact_with_signed_zero_nan_and_inf(tmp_path):
    net = pruned_net()
    with torch.no_grad():
        w = net.head[2].weight
        w[0, :6] = torch.tensor([-0.0, float("nan"), float("inf"), -float("inf"), 1e-40, -1e-40])
        net.features[1].weight[3] = -0.0  # a dense-encoded tensor holding -0.0
    original = {k: v.clone() for k, v in net.state_dict().items()}

    report = save_packed(net, tmp_path / "net.safetensors", values_dtype="float32")
    loaded, _ = load_packed(tmp_path / "net.safetensors")

    assert list(loaded) == list(original)
    assert report.ratio < 0.25
    for name, tensor in original.items():
        assert loaded[name].dtype == tensor.dtype
        if tensor.is_floating_point():
            assert torch.equal(bits(loaded[name]), bits(zeros_to_positive(tensor))), name
        else:
            assert torch.equal(loaded[name], tensor), name
    row = loaded["head.2.weight"][0, :6]
    assert not torch.signbit(row[0]) and torch.isnan(row[1])
    assert row[2].item() == math.inf and row[3].item() == -math.inf
    assert row[4].item() == pytest.approx(1e-40) and row[5].item() == pytest.approx(-1e-40)
    assert not torch.signbit(loaded["features.1.weight"][3])


def test_load_packed_into_restores_outputs_and_metadata(tmp_path):
    net = pruned_net(seed=0)
    save_packed(net, tmp_path / "net.safetensors", values_dtype="float32", metadata={"a.b": "1"})
    other = pruned_net(seed=1)
    assert load_packed_into(other, tmp_path / "net.safetensors") == {"a.b": "1"}
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(other(x), net(x))


def test_metadata_record_describes_every_tensor(tmp_path):
    net = pruned_net()
    save_packed(net, tmp_path / "n.safetensors", metadata={"run": "r1", "k": ""})
    with safe_open(str(tmp_path / "n.safetensors"), framework="pt") as handle:
        header = handle.metadata()
        keys = set(handle.keys())
    record = json.loads(header[METADATA_KEY])
    assert set(header) == {METADATA_KEY}
    assert (record["format"], record["version"]) == ("slimkit-packed", 1)
    assert record["values_dtype"] == "float16" and record["metadata"] == {"run": "r1", "k": ""}
    entry = record["tensors"]["head.0.weight"]
    assert (entry["encoding"], entry["shape"], entry["dtype"]) == ("bitmask", [512, 64], "float32")
    assert {"head.0.weight::mask", "head.0.weight::values", "head.0.bias::dense"} <= keys
    assert load_packed(tmp_path / "n.safetensors")[1] == {"run": "r1", "k": ""}


def test_encoding_choice_and_dtypes(tmp_path):
    gen = torch.Generator().manual_seed(0)
    very_sparse = torch.zeros(100_000)
    very_sparse[torch.randperm(100_000, generator=gen)[:1_000]] = 1.5
    state = {
        "dense": torch.randn(64, 64, generator=gen),
        "very_sparse": very_sparse,
        "all_zero": torch.zeros(1000),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5),
        "bf16": torch.tensor([1e30, 0.0, -3.0], dtype=torch.bfloat16),
        "f16": torch.tensor([1.0, 0.0, 65504.0], dtype=torch.float16),
        "f64": torch.tensor([1.0 / 3.0, 0.0], dtype=torch.float64),
        "mask": torch.tensor([True, False, True]),
        "count": torch.tensor(12345678901, dtype=torch.int64),
    }
    report = save_packed(state, tmp_path / "s.safetensors")
    loaded, _ = load_packed(tmp_path / "s.safetensors")

    assert report.encodings["dense"] == "dense"
    assert report.encodings["very_sparse"] == "index"
    assert report.encodings["mask"] == report.encodings["count"] == "raw"
    index_bytes = {i.name: i.stored_bytes for i in report.tensors}["very_sparse"]
    bitmask_parts = encode_tensor(very_sparse, encoding="bitmask")[1]
    assert index_bytes < sum(p.nbytes for p in bitmask_parts.values()) == 12_500 + 2_000
    for name, tensor in state.items():
        if tensor.is_floating_point():
            assert_same_floats(loaded[name], expected(tensor, "float16"))
        else:
            assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype
    assert loaded["bf16"][0].item() == pytest.approx(1e30, rel=1e-2)  # bf16 is never narrowed
    assert loaded["f64"][0].item() == torch.tensor(1.0 / 3.0).half().item()


@st.composite
def sparse_tensors(draw) -> torch.Tensor:
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9))
    values = draw(hnp.arrays(np.float32, shape, elements=st.floats(width=32)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    zero = rng.random(shape) < draw(st.floats(0.0, 1.0))
    signed_zero = np.where(rng.random(shape) < 0.5, np.float32(-0.0), np.float32(0.0))
    x = torch.from_numpy(np.where(zero, signed_zero, values).astype(np.float32))
    return x.to(draw(st.sampled_from(_FLOATS)))


@settings(max_examples=300, deadline=None)
@given(
    x=sparse_tensors(),
    values_dtype=st.sampled_from(["float32", "float16"]),
    encoding=st.sampled_from([None, "dense", "bitmask", "index"]),
)
def test_decode_inverts_encode(x, values_dtype, encoding):
    chosen, parts = encode_tensor(x, values_dtype=values_dtype, encoding=encoding)
    assert chosen == (encoding or chosen)
    out = decode_tensor(chosen, parts, shape=tuple(x.shape), dtype=x.dtype)
    assert_same_floats(out, expected(x, values_dtype))
    if x.dtype == torch.float32 and values_dtype == "float32":  # bit-exact, NaN payloads too
        assert torch.equal(bits(out), bits(zeros_to_positive(x)))


@given(positions=st.sets(st.integers(0, 200_000), max_size=300))
def test_gap_codes_round_trip(positions):
    ordered = np.array(sorted(positions), dtype=np.int64)
    codes = encode_gaps(ordered)
    gaps = np.diff(ordered, prepend=-1) - 1
    assert codes.dtype == np.uint8 and codes.size == ordered.size + int((gaps // 255).sum())
    assert np.array_equal(decode_gaps(codes), ordered)


def test_gap_codes_escape_layout():
    codes = encode_gaps(np.array([0, 255, 511, 1021]))
    assert codes.tolist() == [0, 254, 255, 0, 255, 254]
    with pytest.raises(ConfigError, match="strictly increasing"):
        encode_gaps(np.array([3, 3]))
    with pytest.raises(CheckpointError, match="escape"):
        decode_gaps(np.array([7, 255], dtype=np.uint8))


def test_report_serialises_and_renders_a_table(tmp_path):
    report = save_packed(pruned_net(), tmp_path / "net.safetensors")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["path"] == str(tmp_path / "net.safetensors")
    assert data["bytes_on_disk"] == report.bytes_on_disk and data["ratio"] == report.ratio
    assert data["tensors"][0] == {
        "name": "features.0.weight",
        "encoding": "bitmask",
        "shape": [32, 3, 3, 3],
        "dtype": "float32",
        "nonzero": 173,
        "stored_bytes": 108 + 173 * 2,
    }
    lines = str(report).splitlines()
    assert f"{report.ratio:.3f}x" in lines[0] and f"{report.bytes_on_disk:,} bytes" in lines[0]
    assert lines[1].split() == "tensor shape dtype encoding nonzero stored bytes".split()
    assert lines[2].split() == ["features.0.weight", "32x3x3x3", "float32", "bitmask", "173", "454"]
    assert len(lines) == 2 + len(report.tensors)


def test_missing_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_packed(tmp_path / "nope.safetensors")
    assert str(info.value) == f"packed checkpoint not found: {tmp_path / 'nope.safetensors'}"


@pytest.mark.parametrize("cut", [None, -10, 8])
def test_unreadable_files_are_checkpoint_errors(tmp_path, cut):
    path = tmp_path / "bad.safetensors"
    if cut is None:
        path.write_bytes(b"this is not a safetensors file")
    else:
        save_packed(pruned_net(), path)
        path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as info:
        load_packed(path)
    assert "\n" not in str(info.value) and isinstance(info.value.__cause__, SafetensorError)


W = "head.0.weight"


def _rewrite(path, edit_record=None, edit_tensors=None):
    """Re-save a packed file after editing its metadata record and/or stored tensors."""
    with safe_open(str(path), framework="pt") as handle:
        record = json.loads(handle.metadata()[METADATA_KEY])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    if edit_record:
        edit_record(record)
    if edit_tensors:
        edit_tensors(tensors)
    safetensors.torch.save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(record)})


def _drop_last(part):
    return lambda t: t.update({f"{W}::{part}": t[f"{W}::{part}"][:-1]})


@pytest.mark.parametrize(
    ("edit_record", "edit_tensors", "message"),
    [
        (lambda r: r.update(version=2), None, "format 'slimkit-packed' version 2 is not supported"),
        (lambda r: r.update(format="other"), None, "format 'other' version 1 is not supported"),
        (None, _drop_last("mask"), "mask has 4095 bytes, expected 32768 bits"),
        (None, _drop_last("values"), "bitmask part marks 6554 nonzeros but 6553 values"),
        (None, lambda t: t.pop(f"{W}::mask"), f"'{W}' lacks stored part(s) mask"),
        (None, lambda t: t.update(extra=torch.zeros(1)), "not described by metadata: extra"),
        (lambda r: r["tensors"][W].update(encoding="zip"), None, f"'{W}' has a bad metadata"),
        (lambda r: r["tensors"][W].update(dtype="load"), None, f"'{W}' has a bad metadata"),
    ],
)
def test_corrupt_packed_files_name_the_problem(tmp_path, edit_record, edit_tensors, message):
    path = tmp_path / "net.safetensors"
    save_packed(pruned_net(), path)
    _rewrite(path, edit_record, edit_tensors)
    with pytest.raises(CheckpointError) as info:
        load_packed(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_plain_safetensors_is_not_a_packed_checkpoint(tmp_path):
    safetensors.torch.save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="is not a slimkit packed checkpoint"):
        load_packed(tmp_path / "plain.safetensors")


@pytest.mark.parametrize(
    ("state", "options", "message"),
    [
        ({"w": torch.ones(2)}, {"values_dtype": "int8"}, "values_dtype must be"),
        ({"w": torch.ones(2)}, {"metadata": {"epoch": 3}}, "metadata must map str to str"),
        ({"a::b": torch.ones(2)}, {}, "must not contain '::'"),
        ({"w": [1.0]}, {}, "must be a tensor, got list"),
        ([torch.ones(2)], {}, "expected a state_dict or nn.Module, got list"),
    ],
)
def test_bad_save_arguments_are_config_errors(tmp_path, state, options, message):
    with pytest.raises(ConfigError, match=message):
        save_packed(state, tmp_path / "x.safetensors", **options)
    assert not list(tmp_path.iterdir())


def test_failed_save_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "net.safetensors"
    save_packed(pruned_net(seed=0), path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(CheckpointError, match=r"could not write packed checkpoint .*: disk full"):
        save_packed(pruned_net(seed=1), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["net.safetensors"]


def test_load_packed_into_names_shape_mismatches_and_key_problems(tmp_path):
    path = tmp_path / "net.safetensors"
    save_packed(pruned_net(), path)
    with pytest.raises(CheckpointError) as info:
        load_packed_into(Net(width=128), path)
    message = str(info.value)
    assert "does not fit Net: shape mismatch head.0.weight checkpoint (512, 64) vs model" in message
    assert "head.2.weight checkpoint (256, 512) vs model (256, 128)" in message
    assert "\n" not in message

    state = dict(pruned_net().state_dict())
    bias = state.pop("head.4.bias")
    save_packed({**state, "extra.weight": torch.ones(1)}, path)
    with pytest.raises(
        CheckpointError, match=r"missing keys head\.4\.bias; unexpected keys extra\.weight$"
    ):
        load_packed_into(Net(), path)

    save_packed({"head.4.bias": bias}, path)
    target = Net()
    load_packed_into(target, path, strict=False)
    assert torch.equal(target.head[4].bias, bias.half().float())

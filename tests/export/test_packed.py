"""Tests for sparse packed checkpoints (slimkit.export.packed)."""

from __future__ import annotations

import base64
import json
import math
import struct
import zlib

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
from slimkit.export import load_packed, load_packed_into, packed, save_packed
from slimkit.export.packed import (
    METADATA_KEY,
    USER_METADATA_KEY,
    decode_gaps,
    decode_tensor,
    encode_gaps,
    encode_tensor,
)
from slimkit.measure.size import count_parameters, dense_checkpoint_bytes
from slimkit.models import DigitsResNet

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


def encode_record(record: object) -> str:
    """The ``slimkit.packed`` header value for ``record``: compact JSON, zlib, base64."""
    text = json.dumps(record, separators=(",", ":"))
    return base64.b64encode(zlib.compress(text.encode())).decode()


def decode_record(text: str) -> dict:
    return json.loads(zlib.decompress(base64.b64decode(text)))


def read_packed(path) -> tuple[dict[str, str], dict, dict[str, torch.Tensor]]:
    """``(header, record, blobs)`` of a packed file, read with plain safetensors."""
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
        blobs = {k: handle.get_tensor(k) for k in handle.keys()}
    return header, decode_record(header[METADATA_KEY]), blobs


def header_overhead(report) -> int:
    """File bytes that are not tensor payload: the safetensors header, record included."""
    return report.bytes_on_disk - sum(info.stored_bytes for info in report.tensors)


def pruned_digits_resnet(sparsity: float = 0.8) -> nn.Module:
    """DigitsResNet with Conv2d/Linear weights pruned by one global magnitude threshold."""
    torch.manual_seed(0)
    model = DigitsResNet().eval()
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    magnitudes = torch.cat([w.detach().abs().reshape(-1) for w in weights])
    threshold = magnitudes.kthvalue(round(sparsity * magnitudes.numel())).values
    with torch.no_grad():
        for w in weights:
            w[w.abs() <= threshold] = 0.0
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros / magnitudes.numel() == pytest.approx(sparsity, abs=1e-4)
    return model


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


@pytest.mark.parametrize(("values_dtype", "bound"), [("float16", 0.15), ("float32", 0.25)])
def test_pruned_digits_resnet_packs_small_despite_many_small_tensors(tmp_path, values_dtype, bound):
    model = pruned_digits_resnet(0.8)
    assert count_parameters(model) == 77_754 and len(model.state_dict()) > 50
    path = tmp_path / "digits.safetensors"

    report = save_packed(model, path, values_dtype=values_dtype)

    # measured: 0.136 (float16) and 0.237 (float32); the payload alone is 0.132 and 0.233
    assert report.dense_fp32_bytes == dense_checkpoint_bytes(model)
    assert report.bytes_on_disk <= bound * dense_checkpoint_bytes(model)
    assert header_overhead(report) < 2_000
    fresh = DigitsResNet()
    load_packed_into(fresh, path)
    for name, tensor in model.state_dict().items():
        loaded = fresh.state_dict()[name]
        if tensor.is_floating_point():
            assert_same_floats(loaded, expected(tensor, values_dtype))
        else:
            assert torch.equal(loaded, tensor)


def test_header_overhead_is_a_small_constant_not_per_tensor(tmp_path):
    def overhead(count: int) -> int:
        state = {f"blocks.{i}.weight": torch.tensor([0.0, 1.5, 0.0, -2.0]) for i in range(count)}
        state |= {f"blocks.{i}.steps": torch.tensor(i) for i in range(count)}
        return header_overhead(save_packed(state, tmp_path / f"{count}.safetensors"))

    small, large = overhead(10), overhead(1_000)
    assert small < 700
    assert large - small < 10 * 1_980  # under 10 bytes per extra tensor, names included
    _, record, blobs = read_packed(tmp_path / "1000.safetensors")
    assert set(blobs) == set(record["blobs"]) == {"bits", "values.float16", "raw.int64"}


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
    # every tensor owns its memory: none is a view that keeps a whole stored blob alive
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in loaded.values())


def test_empty_state_dict_round_trips(tmp_path):
    report = save_packed({}, tmp_path / "e.safetensors", metadata={"empty": "yes"})
    assert report.tensors == () and report.bytes_on_disk < 300
    assert load_packed(tmp_path / "e.safetensors") == ({}, {"empty": "yes"})


def test_load_packed_into_restores_outputs_and_metadata(tmp_path):
    net = pruned_net(seed=0)
    save_packed(net, tmp_path / "net.safetensors", values_dtype="float32", metadata={"a.b": "1"})
    other = pruned_net(seed=1)
    assert load_packed_into(other, tmp_path / "net.safetensors") == {"a.b": "1"}
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(other(x), net(x))


def test_metadata_record_describes_every_tensor(tmp_path):
    net = pruned_net()
    path = tmp_path / "n.safetensors"
    report = save_packed(net, path, metadata={"run": "r1", "k": "", "note": "café"})
    header, record, blobs = read_packed(path)

    assert set(header) == {METADATA_KEY, USER_METADATA_KEY}
    assert json.loads(header[USER_METADATA_KEY]) == {"run": "r1", "k": "", "note": "café"}
    assert "café" in header[USER_METADATA_KEY]  # plain text, not escaped or compressed
    assert (record["format"], record["version"], packed.VERSION) == ("slimkit-packed", 4, 4)
    assert record["values_dtype"] == "float16"
    assert (
        set(record["blobs"]) == set(blobs) == {"bits", "values.float16", "raw.int64", "raw.float32"}
    )
    # BatchNorm's untouched weight (ones) and running stats (zeros, ones): one exact value each
    bn = {k: v[0] for k, v in record["tensors"].items() if k.startswith("features.1.")}
    assert bn["features.1.weight"] == bn["features.1.bias"] == "fill"  # untouched ones, zeros
    assert bn["features.1.running_var"] == "dense" and bn["features.1.num_batches_tracked"] == "raw"
    assert all(blob.dim() == 1 for blob in blobs.values()) and blobs["bits"].dtype == torch.uint8
    assert list(record["tensors"]) == list(net.state_dict())
    encoding, shape, dtype, refs = record["tensors"]["head.0.weight"]
    assert (encoding, shape, dtype) == ("bitmask", [512, 64], "float32")
    (mask_blob, _, mask_len), (values_blob, _, values_len) = refs
    assert record["blobs"][mask_blob] == "bits" and mask_len == 4096
    assert record["blobs"][values_blob] == "values.float16" and values_len == 6554
    # the parts tile every blob exactly, back to back in state_dict order
    spans: dict[str, list[tuple[int, int]]] = {name: [] for name in blobs}
    for _, _, _, refs in record["tensors"].values():
        for blob, offset, length in refs:
            spans[record["blobs"][blob]].append((offset, length))
    for name, found in spans.items():
        assert [offset for offset, _ in found] == [0, *np.cumsum([n for _, n in found])[:-1]]
        assert sum(n for _, n in found) == blobs[name].numel()
    # the safetensors header holds a handful of entries and a compressed record: ~1 KB
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert header_len < 1_200 and header_overhead(report) == 8 + header_len
    assert load_packed(path)[1] == {"run": "r1", "k": "", "note": "café"}


def test_any_tensor_name_round_trips(tmp_path):
    state = {
        "a::b": torch.tensor([0.0, 1.0]),
        "": torch.tensor([2.0]),
        'ü "quoted"\nline': torch.tensor([3, 4]),
    }
    save_packed(state, tmp_path / "n.safetensors", values_dtype="float32")
    loaded, user = load_packed(tmp_path / "n.safetensors")
    assert list(loaded) == list(state) and user == {}
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


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
    if chosen == "fill":  # a constant tensor: its one value, exact, zeros as +0.0
        assert_same_floats(out, zeros_to_positive(x))
        return
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
        "values_dtype": "float16",
    }
    lines = str(report).splitlines()
    assert f"{report.ratio:.3f}x" in lines[0] and f"{report.bytes_on_disk:,} bytes" in lines[0]
    assert lines[1].split() == "tensor shape dtype encoding values nonzero stored bytes".split()
    row = ["features.0.weight", "32x3x3x3", "float32", "bitmask", "float16", "173", "454"]
    assert lines[2].split() == row
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


def _rewrite(path, edit_record=None, edit_tensors=None, edit_header=None):
    """Re-save a packed file after editing its record, its stored blobs and/or its header."""
    header, record, tensors = read_packed(path)
    if edit_record:
        edit_record(record)
    if edit_tensors:
        edit_tensors(tensors)
    header[METADATA_KEY] = encode_record(record)
    if edit_header:
        edit_header(header)
    safetensors.torch.save_file(tensors, str(path), metadata=header)


def _ref(name, part, **changes):
    """Edit ``[blob, offset, length]`` of part number ``part`` of tensor ``name``."""

    def edit(record):
        ref = record["tensors"][name][3][part]
        for field, change in changes.items():
            i = ("blob", "offset", "length").index(field)
            ref[i] = change(ref[i], record) if callable(change) else change

    return edit


def _blob(record, name):
    return record["blobs"].index(name)


def _set_entry(field, value):
    return lambda r: r["tensors"][W].__setitem__(("encoding", "shape", "dtype").index(field), value)


@pytest.mark.parametrize(
    ("edit_record", "edit_tensors", "message"),
    [
        (lambda r: r.update(version=5), None, "format 'slimkit-packed' version 5 is not supported"),
        (lambda r: r.update(version=4.0), None, "version 4.0 is not supported"),
        (lambda r: r.update(format="other"), None, "format 'other' version 4 is not supported"),
        (lambda r: r.pop("tensors"), None, "'blobs' list of distinct names and a 'tensors' object"),
        (
            lambda r: r["blobs"].append("bits"),
            None,
            "'blobs' list of distinct names and a 'tensors' object",
        ),
        (_ref(W, 0, length=lambda n, r: n - 1), None, "mask has 4095 bytes, expected 32768 bits"),
        (_ref(W, 1, length=lambda n, r: n - 1), None, "bitmask part marks 6554 nonzeros but 6553"),
        (_ref("head.0.bias", 0, length=511), None, "dense part has 511 elements, shape (512,)"),
        (
            _ref(W, 0, offset=10**9),
            None,
            f"'{W}': mask part [1000000000:1000004096] is out of range",
        ),
        (_ref(W, 1, offset=lambda o, r: o + 10**6), None, "out of range of blob 'values.float16'"),
        (
            _ref(W, 0, blob=lambda b, r: _blob(r, "values.float16")),
            None,
            "mask part is in blob 'values.float16', not bits",
        ),
        (
            _ref(W, 1, blob=lambda b, r: _blob(r, "bits")),
            None,
            "values part is in blob 'bits', not a values",
        ),
        (_ref(W, 0, blob=99), None, f"'{W}' has a bad metadata entry"),
        (_ref(W, 0, offset=-1), None, f"'{W}' has a bad metadata entry"),
        (_ref(W, 0, length=True), None, f"'{W}' has a bad metadata entry"),
        (lambda r: r["tensors"][W].pop(), None, f"'{W}' has a bad metadata entry"),
        (_set_entry("encoding", "zip"), None, f"'{W}' has a bad metadata entry"),
        (_set_entry("dtype", "load"), None, f"'{W}' has a bad metadata entry"),
        (_set_entry("dtype", "int64"), None, f"'{W}' has a bad metadata entry"),
        (_set_entry("shape", [512, -64]), None, f"'{W}' has a bad metadata entry"),
        (None, lambda t: t.pop("bits"), "lacks stored blob(s) bits"),
        (None, lambda t: t.update(extra=torch.zeros(1)), "not described by metadata: extra"),
        (None, lambda t: t.update(bits=t["bits"][None]), "blob 'bits' is a (1, "),
        (
            None,
            lambda t: t.update({"values.float16": t["values.float16"].float()}),
            "tensor, expected 1-D float16",
        ),
        (
            lambda r: r["blobs"].append("values.int16"),
            lambda t: t.update({"values.int16": torch.zeros(1, dtype=torch.int16)}),
            "unknown blob name 'values.int16'",
        ),
        (
            lambda r: r.update(version=2) or r["blobs"].append("values.int8"),
            lambda t: t.update({"values.int8": torch.zeros(1, dtype=torch.int8)}),
            "unknown blob name 'values.int8'",  # version 2 had no int8 values
        ),
        (
            lambda r: r.update(version=2) or r["blobs"].append("scales.float32"),
            lambda t: t.update({"scales.float32": torch.ones(1)}),
            "unknown blob name 'scales.float32'",
        ),
        (
            lambda r: r.update(version=3),
            None,
            "'features.1.weight' has a bad metadata entry",  # version 3 had no fill encoding
        ),
        (
            _ref("features.1.weight", 0, blob=lambda b, r: _blob(r, "bits")),
            None,
            "'features.1.weight': fill part is in blob 'bits', not raw.float32",
        ),
        (
            _ref("features.1.weight", 0, length=2),
            None,
            "a fill part holds one value of 2+ elements, got 2 element(s) for shape (32,)",
        ),
        (
            lambda r: r["tensors"]["features.1.num_batches_tracked"][3].append([0, 0, 1]),
            None,
            "'features.1.num_batches_tracked' has a bad metadata entry",
        ),
    ],
)
def test_corrupt_packed_files_name_the_problem(tmp_path, edit_record, edit_tensors, message):
    path = tmp_path / "net.safetensors"
    save_packed(pruned_net(), path)
    _rewrite(path, edit_record, edit_tensors)
    with pytest.raises(CheckpointError) as info:
        load_packed(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def _deflated(text: str) -> str:
    return base64.b64encode(zlib.compress(text.encode())).decode()


def _truncated(header):
    data = base64.b64decode(header[METADATA_KEY])
    header[METADATA_KEY] = base64.b64encode(data[: len(data) // 2]).decode()


_NOT_RECORD = "record is not zlib-compressed base64 JSON"


@pytest.mark.parametrize(
    ("edit_header", "message"),
    [
        (lambda h: h.update({METADATA_KEY: "not base64!"}), _NOT_RECORD),
        (lambda h: h.update({METADATA_KEY: "ünïcode"}), _NOT_RECORD),
        (lambda h: h.update({METADATA_KEY: h[METADATA_KEY][:-5]}), _NOT_RECORD),
        (lambda h: h.update({METADATA_KEY: base64.b64encode(b"plain").decode()}), _NOT_RECORD),
        (_truncated, "truncated"),
        (lambda h: h.update({METADATA_KEY: _deflated("{'no': json}")}), _NOT_RECORD),
        (lambda h: h.update({METADATA_KEY: _deflated("[1, 2]")}), "record must be a JSON object"),
        (lambda h: h.update({METADATA_KEY: _deflated("[" * 10**6)}), _NOT_RECORD),
        (lambda h: h.update({METADATA_KEY: "{oops"}), "'slimkit.packed' record is not JSON"),
        (lambda h: h.pop(USER_METADATA_KEY), "no 'slimkit.user_metadata'"),
        (lambda h: h.update({USER_METADATA_KEY: "{"}), "'slimkit.user_metadata' is not JSON"),
        (lambda h: h.update({USER_METADATA_KEY: "[" * 10**6}), "user_metadata' is not JSON"),
        (lambda h: h.update({USER_METADATA_KEY: '{"a": 1}'}), "must be a JSON object of strings"),
    ],
)
def test_undecodable_records_are_checkpoint_errors(tmp_path, edit_header, message):
    path = tmp_path / "net.safetensors"
    save_packed(pruned_net(), path)
    _rewrite(path, edit_header=edit_header)
    with pytest.raises(CheckpointError) as info:
        load_packed(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_records_that_inflate_too_far_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "net.safetensors"
    save_packed(pruned_net(), path)
    monkeypatch.setattr(packed, "_MAX_RECORD_BYTES", 100)
    with pytest.raises(CheckpointError, match=r"record is not .*: it inflates past 100 bytes$"):
        load_packed(path)


def test_version_1_files_are_rejected_as_unsupported(tmp_path):
    path = tmp_path / "v1.safetensors"
    record = {
        "format": "slimkit-packed",
        "version": 1,
        "values_dtype": "float16",
        "tensors": {"w": {"encoding": "dense", "shape": [2], "dtype": "float32"}},
        "metadata": {},
    }
    safetensors.torch.save_file(
        {"w::dense": torch.ones(2, dtype=torch.float16)},
        str(path),
        metadata={METADATA_KEY: json.dumps(record)},
    )
    with pytest.raises(CheckpointError) as info:
        load_packed(path)
    assert str(info.value) == (
        f"{path}: format 'slimkit-packed' version 1 is not supported "
        "(expected 'slimkit-packed' version 2 or 3 or 4)"
    )

    record["version"] = 4  # a current record must be compressed, never plain JSON
    safetensors.torch.save_file({}, str(path), metadata={METADATA_KEY: json.dumps(record)})
    with pytest.raises(CheckpointError, match=r"record must be zlib-compressed base64$"):
        load_packed(path)


def test_plain_safetensors_is_not_a_packed_checkpoint(tmp_path):
    safetensors.torch.save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="is not a slimkit packed checkpoint"):
        load_packed(tmp_path / "plain.safetensors")


@pytest.mark.parametrize(
    ("state", "options", "message"),
    [
        (
            {"w": torch.ones(2)},
            {"values_dtype": "int4"},
            "values_dtype must be one of 'float32', 'float16', 'int8', got 'int4'",
        ),
        ({"w": torch.ones(2)}, {"metadata": {"epoch": 3}}, "metadata must map str to str"),
        ({3: torch.ones(2)}, {}, "state_dict keys must be str, got int 3"),
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


# --- int8 values ----------------------------------------------------------------------------


def int8_tolerance(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per-element bound on ``|decoded - x|``: half a step, plus rounding in float arithmetic."""
    step = scales.double().reshape(-1, *[1] * (x.dim() - 1))
    info = torch.finfo(x.dtype)
    rounding = x.double().abs() * info.eps + info.smallest_normal * info.eps
    return step * (0.5 + 1e-5) + rounding


def random_pruned(shape: tuple[int, ...], sparsity: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * torch.rand(shape[0], *[1] * (len(shape) - 1))
    flat = w.view(-1)
    flat[torch.randperm(flat.numel(), generator=gen)[: round(sparsity * flat.numel())]] = 0.0
    return w


@pytest.mark.parametrize("dtype", _FLOATS)
@pytest.mark.parametrize("shape", [(96, 40), (16, 8, 3, 3)])
def test_int8_round_trip_is_within_half_a_step_and_keeps_zeros_exact(tmp_path, shape, dtype):
    w = random_pruned(shape, 0.7).to(dtype)
    w[3] = 0.0  # an all-zero output channel
    w.view(-1)[1] = -0.0
    path = tmp_path / "w.safetensors"

    report = save_packed({"w": w}, path, values_dtype="int8")
    loaded = load_packed(path)[0]["w"]
    _, record, blobs = read_packed(path)

    assert report.values_dtype == record["values_dtype"] == "int8"
    assert (report.tensors[0].encoding, report.tensors[0].values_dtype) == ("bitmask", "int8")
    assert set(record["blobs"]) == {"bits", "values.int8", "scales.float32"}
    scales = blobs["scales.float32"]
    top = w.double().abs().reshape(shape[0], -1).amax(dim=1)
    assert torch.allclose(scales.double(), top / 127, rtol=1e-7, atol=0) and scales[3] == 0
    assert loaded.dtype == dtype and loaded.shape == w.shape
    assert torch.equal(bits(loaded[w == 0]), torch.zeros_like(bits(loaded[w == 0])))  # +0.0
    error = (loaded.double() - w.double()).abs()
    assert (error <= int8_tolerance(w, scales)).all()


def test_int8_is_lossless_for_weights_already_on_a_per_row_int8_grid(tmp_path):
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (256, 64), generator=gen)
    codes[:, :2] = torch.tensor([127, -127])  # every row reaches both ends of the grid
    codes = codes[:, torch.randperm(64, generator=gen)]
    scale = torch.exp(torch.empty(256).uniform_(-30.0, 30.0, generator=gen))  # 1e-13 .. 1e13
    w = codes.float() * scale[:, None]
    assert (w == 0).float().mean() > 0  # code 0 is a pruned weight, kept exact by the mask

    save_packed({"w": w}, tmp_path / "w.safetensors", values_dtype="int8")
    loaded = load_packed(tmp_path / "w.safetensors")[0]["w"]

    assert torch.equal(loaded == 0, w == 0)
    torch.testing.assert_close(loaded, w, rtol=1e-6, atol=0)
    exact_rows = int((loaded == w).all(dim=1).sum())
    assert exact_rows >= 0.9 * len(w)  # measured: ~99% of rows come back bit for bit

    # the grid of slimkit's per-channel symmetric weight quantization (scale = max|w| / 127)
    from slimkit.quant.affine import QuantSpec, fake_quantize, qparams_from_range

    spec = QuantSpec(bits=8, signed=True, symmetric=True, narrow_range=True)
    raw = random_pruned((128, 200), 0.5, seed=1)
    top = raw.abs().amax(dim=1)
    scale, zero_point = qparams_from_range(-top, top, spec)
    quantized = fake_quantize(raw, scale, zero_point, spec, 0)
    encoding, parts = encode_tensor(quantized, values_dtype="int8")
    out = decode_tensor(encoding, parts, shape=tuple(quantized.shape), dtype=torch.float32)
    torch.testing.assert_close(out, quantized, rtol=1e-6, atol=0)
    assert torch.equal(out == 0, quantized == 0)


def test_int8_at_80_percent_sparsity_is_under_009_of_dense_fp32_and_below_float16(tmp_path):
    w = random_pruned((512, 512), 0.8)
    ratios, stored = {}, {}
    for values_dtype in ("float32", "float16", "int8"):
        report = save_packed(
            {"w": w}, tmp_path / f"{values_dtype}.safetensors", values_dtype=values_dtype
        )
        ratios[values_dtype], stored[values_dtype] = report.ratio, report.tensors[0].stored_bytes
    print("512x512 at 80% sparsity, bytes / dense fp32:", ratios)
    nonzero = int((w != 0).sum())
    assert stored["int8"] == 512 * 512 // 8 + nonzero + 4 * 512  # mask + codes + scales
    assert stored["float16"] == 512 * 512 // 8 + 2 * nonzero
    # payload bound: (1 mask bit + 0.2 * 8 code bits) / 32 dense bits + scales = 0.0832
    assert ratios["int8"] < 0.09 < ratios["float16"] < ratios["float32"]


def test_int8_mixed_state_dict_round_trips_and_loads_into_the_model(tmp_path):
    net = pruned_net()
    with torch.no_grad():
        net.head[4].weight[:, 0] = torch.tensor([float("nan"), *range(9)])  # not int8-able
    state = {k: v.clone() for k, v in net.state_dict().items()}
    path = tmp_path / "net.safetensors"

    report = save_packed(net, path, values_dtype="int8", metadata={"q": "int8"})
    loaded, user = load_packed(path)
    _, record, blobs = read_packed(path)

    assert user == {"q": "int8"} and list(loaded) == list(state)
    blob_names = {"bits", "values.int8", "scales.float32", "values.float16", "raw.int64"}
    assert set(blobs) == blob_names | {"raw.float32"}  # raw.float32: BatchNorm's constant affine
    values = {info.name: info.values_dtype for info in report.tensors}
    assert values["features.0.weight"] == values["head.0.weight"] == "int8"  # conv, linear
    assert values["head.0.bias"] == values["features.1.running_var"] == "float16"
    assert values["head.4.weight"] == "float16"  # NaN: kept as under values_dtype="float16"
    assert values["features.1.num_batches_tracked"] is None
    infos = {info.name: info for info in report.tensors}
    head = infos["head.0.weight"]
    assert head.stored_bytes == 512 * 64 // 8 + head.nonzero + 4 * 512
    assert [len(record["tensors"][k][3]) for k in ("head.0.weight", "head.0.bias")] == [3, 1]
    assert report.bytes_on_disk == path.stat().st_size
    assert report.bytes_on_disk - sum(i.stored_bytes for i in report.tensors) < 1_200
    assert report.ratio < 0.095  # measured 0.089 (float16: 0.134)
    for name, tensor in state.items():
        out = loaded[name]
        assert out.dtype == tensor.dtype and out.shape == tensor.shape
        if values[name] == "int8":
            scales = encode_tensor(tensor, values_dtype="int8")[1]["scales"]
            assert (out[tensor == 0] == 0).all()  # nonzeros under half a step may become 0
            assert ((out - tensor).abs() <= int8_tolerance(tensor, scales)).all(), name
        elif tensor.is_floating_point():
            assert_same_floats(out, expected(tensor, "float16"))
        else:
            assert torch.equal(out, tensor)

    with torch.no_grad():
        net.head[4].weight[0, 0] = 0.5
    fresh = Net()
    assert load_packed_into(fresh, path) == {"q": "int8"}
    fresh.head[4].weight.data[0, 0] = 0.5
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(fresh(x), net(x), rtol=0.05, atol=0.02)


@st.composite
def int8_cases(draw) -> torch.Tensor:
    x = draw(sparse_tensors())
    if x.dim() >= 2 and draw(st.booleans()):  # bounded values, so most cases are quantized
        x = torch.where(torch.isfinite(x), x, torch.zeros_like(x)).clamp(-1e4, 1e4)
    return x


@settings(max_examples=300, deadline=None)
@given(x=int8_cases(), encoding=st.sampled_from([None, "dense", "bitmask", "index"]))
def test_int8_decode_is_within_half_a_step(x, encoding):
    chosen, parts = encode_tensor(x, values_dtype="int8", encoding=encoding)
    out = decode_tensor(chosen, parts, shape=tuple(x.shape), dtype=x.dtype)
    if chosen == "fill":  # a constant tensor: its one value, exact, zeros as +0.0
        assert_same_floats(out, zeros_to_positive(x))
        return
    if x.dim() < 2 or not torch.isfinite(x).all():  # biases and norms, NaN/inf: float16 values
        assert "scales" not in parts
        assert_same_floats(out, expected(x, "float16"))
        return
    scales = parts["scales"]
    assert parts["dense" if chosen == "dense" else "values"].dtype == torch.int8
    assert scales.dtype == torch.float32 and scales.shape == (x.shape[0],)
    assert out.dtype == x.dtype and torch.isfinite(out).all()
    zero = x == 0
    assert torch.equal(bits(out[zero]), torch.zeros_like(bits(out[zero])))  # +0.0 exactly
    assert ((out.double() - x.double()).abs() <= int8_tolerance(x, scales)).all()


_V2_FILE = (  # written by save_packed(..., values_dtype="float16") before int8 values existed
    "iAIAAAAAAAB7Il9fbWV0YWRhdGFfXyI6eyJzbGlta2l0LnBhY2tlZCI6ImVOcGRqOUdPZ3lBVVJQL2xQdDgxZ3EwUC9vb2hH"
    "NnpZRWhFTWw3YTdhZnJ2dlZBM1p2c0VHYzRNTXcrWVFseDBnZzdJMldXMjZXdlZwOW1NZ0hBemtXencwRW0rYTNjMTlEMm0z"
    "OVV3TzdtZ2syZ1pHbHdZQ0xvZUJwc0kvc0JxQnpaaDJKV283NVgxcVQyQVFrakdVNGljOElCVDhMZnFidXo1a3JiQVJkTU0y"
    "RXNVS0ZFeVhVSWF5VnBmWTQxQ1lTLzRiSlRpUjFwMUpKT3Qxby9taDZHMnJqOU5BZy9GMUhCZU5nMVdsL29qOXpENXIvOEdn"
    "Y2NOdkdnM2ZkYks4RDRzeHg5TEo4bWQzaTVLWmkzNVBKb0pWdDdMR1c3S0FLV2V6eGNscDNiTiIsInNsaW1raXQudXNlcl9t"
    "ZXRhZGF0YSI6IntcIndyaXR0ZW5fYnlcIjpcInYyXCJ9In0sInJhdy5pbnQ2NCI6eyJkdHlwZSI6Ikk2NCIsInNoYXBlIjpb"
    "MV0sImRhdGFfb2Zmc2V0cyI6WzAsOF19LCJ2YWx1ZXMuYmZsb2F0MTYiOnsiZHR5cGUiOiJCRjE2Iiwic2hhcGUiOlsyXSwi"
    "ZGF0YV9vZmZzZXRzIjpbOCwxMl19LCJ2YWx1ZXMuZmxvYXQxNiI6eyJkdHlwZSI6IkYxNiIsInNoYXBlIjpbN10sImRhdGFf"
    "b2Zmc2V0cyI6WzEyLDI2XX0sImJpdHMiOnsiZHR5cGUiOiJVOCIsInNoYXBlIjpbNl0sImRhdGFfb2Zmc2V0cyI6WzI2LDMy"
    "XX19ICAgICAHAAAAAAAAAIA/IMAAOAC9AEIAPgDAZi4AuFID//9CkA=="
)


def test_version_2_files_still_load(tmp_path):
    path = tmp_path / "v2.safetensors"
    path.write_bytes(base64.b64decode(_V2_FILE))
    _, record, _ = read_packed(path)
    assert record["version"] == 2
    encodings = {name: entry[0] for name, entry in record["tensors"].items()}
    assert list(encodings.values()) == ["bitmask", "index", "dense", "bitmask", "raw"]

    loaded, user = load_packed(path)

    sparse = torch.zeros(600)
    sparse[3], sparse[580] = 1.5, -2.0
    wanted = {
        "conv.weight": torch.tensor([0.0, 0.5, 0.0, -1.25, 0.0, 0.0, 3.0, 0.0]).reshape(2, 1, 2, 2),
        "sparse": sparse,
        "bias": torch.tensor([0.1, -0.5]).half().float(),
        "half": torch.tensor([[1.0, 0.0], [0.0, -2.5]], dtype=torch.bfloat16),
        "steps": torch.tensor(7),
    }
    assert user == {"written_by": "v2"} and list(loaded) == list(wanted)
    for name, tensor in wanted.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


B = "head.0.bias"


@pytest.mark.parametrize(
    ("edit_record", "edit_tensors", "message"),
    [
        (lambda r: r["tensors"][W][3].pop(), None, "int8 values need a scales part (one per row)"),
        (
            _ref(W, 2, length=lambda n, r: n - 1),
            None,
            "scales part is a (511,) float32 tensor, expected 512 float32 values (one per row)",
        ),
        (
            _ref(W, 1, blob=lambda b, r: _blob(r, "values.float16"), offset=0, length=8),
            None,
            "a scales part needs int8 bitmask values, got float16",
        ),
        (
            lambda r: r["tensors"][B][3].append(list(r["tensors"][W][3][2])),
            None,
            f"'{B}': a scales part needs int8 dense values, got float16",
        ),
        (
            lambda r: r["tensors"][B][3].__setitem__(
                slice(None), [[_blob(r, "values.int8"), 0, 512], list(r["tensors"][W][3][2])]
            ),
            None,
            f"'{B}': int8 values need 2 or more dims, got shape (512,)",
        ),
        (
            _ref(W, 2, blob=lambda b, r: _blob(r, "bits")),
            None,
            "scales part is in blob 'bits', not scales.float32",
        ),
        (
            lambda r: r["tensors"][W][3].append(list(r["tensors"][W][3][2])),
            None,
            f"'{W}' has a bad metadata entry",
        ),
        (
            None,
            lambda t: t.update({"scales.float32": t["scales.float32"].half()}),
            "blob 'scales.float32' is a (",
        ),
        (None, lambda t: t["scales.float32"].fill_(float("nan")), "scales must be finite and >= 0"),
        (None, lambda t: t["scales.float32"].fill_(-1.0), "scales must be finite and >= 0"),
        (lambda r: r.update(version=2), None, "unknown blob name 'values.int8'"),
    ],
)
def test_corrupt_int8_files_name_the_problem(tmp_path, edit_record, edit_tensors, message):
    path = tmp_path / "net.safetensors"
    save_packed(pruned_net(), path, values_dtype="int8")
    _rewrite(path, edit_record, edit_tensors)
    with pytest.raises(CheckpointError) as info:
        load_packed(path)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.zeros(40, dtype=torch.int32),  # a symmetric quantizer's per-channel zero points
        torch.ones(3, 5, dtype=torch.bool),
        torch.full((7,), 0.125, dtype=torch.float32),
        torch.tensor([[0.0, -0.0, 0.0]], dtype=torch.float64),  # zeros come back +0.0
        torch.full((4,), math.nan, dtype=torch.float16),
        torch.full((6,), 3, dtype=torch.uint8),
    ],
    ids=["int32-zeros", "bool", "float32", "negative-zero", "nan", "uint8"],
)
def test_constant_tensors_are_stored_as_one_exact_value(tensor):
    encoding, parts = encode_tensor(tensor, values_dtype="int8")

    assert encoding == "fill" and parts["fill"].numel() == 1
    assert parts["fill"].dtype == tensor.dtype  # exact: never float16 or int8 codes
    back = decode_tensor(encoding, parts, shape=tuple(tensor.shape), dtype=tensor.dtype)
    assert back.shape == tensor.shape and back.dtype == tensor.dtype
    if tensor.is_floating_point():
        tensor = torch.where(tensor == 0, 0.0, tensor).to(tensor.dtype)  # the documented +0.0
    assert torch.equal(back.view(torch.uint8), tensor.view(torch.uint8))  # bitwise, NaN too
    assert back.is_contiguous()  # a real tensor, not an expanded view of the stored element


@pytest.mark.parametrize(
    "tensor",
    [
        torch.tensor([1, 1, 2], dtype=torch.int32),
        torch.tensor([math.nan, 1.0]),
        torch.zeros(1, dtype=torch.int32),  # one element: nothing to gain
        torch.zeros(0),
    ],
)
def test_tensors_that_vary_or_are_tiny_are_not_filled(tensor):
    assert encode_tensor(tensor)[0] != "fill"
    with pytest.raises(ConfigError, match="needs two or more bitwise-equal elements"):
        encode_tensor(tensor, encoding="fill")


def test_fill_shrinks_a_quantized_checkpoint_and_round_trips(tmp_path):
    state = {
        "w": torch.randn(32, 16),
        "w_zero_point": torch.zeros(32, dtype=torch.int32),
        "calibrated": torch.ones((), dtype=torch.bool),
        "flags": torch.ones(32, dtype=torch.bool),
    }
    report = save_packed(state, tmp_path / "q.safetensors", values_dtype="int8")
    loaded, _ = load_packed(tmp_path / "q.safetensors")

    assert report.encodings == {
        "w": "dense",
        "w_zero_point": "fill",
        "calibrated": "raw",
        "flags": "fill",
    }
    sizes = {info.name: info.stored_bytes for info in report.tensors}
    assert sizes["w_zero_point"] == 4 and sizes["flags"] == 1
    for name in ("w_zero_point", "calibrated", "flags"):
        assert torch.equal(loaded[name], state[name]) and loaded[name].dtype == state[name].dtype
    fill = {info.name: info for info in report.tensors}["w_zero_point"]
    assert fill.nonzero is None and fill.values_dtype is None


def test_version_3_files_without_fill_still_load(tmp_path):
    path = tmp_path / "v3.safetensors"
    net = pruned_net()
    with torch.no_grad():
        net.features[1].weight.uniform_(0.5, 1.5)  # no constant tensor left: a file v3 can hold
        net.features[1].bias.normal_()
    save_packed(net, path, values_dtype="int8")
    _, record, _ = read_packed(path)
    assert "fill" not in {entry[0] for entry in record["tensors"].values()}
    _rewrite(path, lambda r: r.update(version=3))

    loaded, _ = load_packed(path)
    assert read_packed(path)[1]["version"] == 3
    assert set(loaded) == set(net.state_dict())

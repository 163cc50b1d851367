"""Property tests of the affine quantization math against torch and ONNX Runtime."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnxruntime.quantization.quant_utils import compute_scale_zp

from slimkit.errors import ConfigError
from slimkit.quant.affine import (
    QuantSpec,
    dequantize,
    dequantize_per_group,
    fake_quantize,
    pack_int4,
    qparams_from_range,
    quantize,
    quantize_per_group,
    tensor_range,
    unpack_int4,
)

FAST = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)

finite32 = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def specs(draw, bits=st.integers(2, 8)):
    """Any valid per-tensor spec, narrow and reduced ranges included."""
    n_bits, signed, symmetric = draw(bits), draw(st.booleans()), draw(st.booleans())
    return QuantSpec(
        bits=n_bits,
        signed=signed,
        symmetric=symmetric,
        narrow_range=signed and symmetric and draw(st.booleans()),
        reduce_range=n_bits >= 3 and draw(st.booleans()),
    )


@st.composite
def spec_and_range(draw, spec_strategy=None):
    spec = draw(specs() if spec_strategy is None else spec_strategy)
    a, b = sorted([draw(finite32), draw(finite32)])
    return spec, a, b


@st.composite
def tensor_with_qparams(draw, spec_strategy=None):
    """A float32 vector, a spec, and qparams from a random range; some values sit on ties."""
    spec, lo, hi = draw(spec_and_range(spec_strategy))
    scale, zp = qparams_from_range(lo, hi, spec)
    s = float(scale)
    values = draw(st.lists(finite32, min_size=1, max_size=32))
    ties = draw(st.lists(st.integers(-300, 300), max_size=8))
    x = torch.tensor(values + [(k + 0.5) * s for k in ties], dtype=torch.float32)
    return x, spec, scale, zp


# ---------------------------------------------------------------- QuantSpec


@pytest.mark.parametrize(
    ("kwargs", "qmin", "qmax"),
    [
        ({}, -128, 127),
        ({"signed": False}, 0, 255),
        ({"symmetric": True, "narrow_range": True}, -127, 127),
        ({"reduce_range": True}, -64, 63),
        ({"signed": False, "reduce_range": True}, 0, 127),
        ({"symmetric": True, "narrow_range": True, "reduce_range": True}, -63, 63),
        ({"bits": 4}, -8, 7),
        ({"bits": 4, "signed": False}, 0, 15),
        ({"bits": 2}, -2, 1),
    ],
)
def test_qmin_qmax(kwargs, qmin, qmax):
    spec = QuantSpec(**kwargs)
    assert (spec.qmin, spec.qmax) == (qmin, qmax)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bits": 9}, "bits"),
        ({"bits": 1}, "bits"),
        ({"bits": 8.0}, "bits"),
        ({"bits": True}, "bits"),
        ({"signed": 1}, "signed"),
        ({"granularity": "per_row"}, "granularity"),
        ({"axis": "0"}, "axis"),
        ({"granularity": "per_group"}, "group_size"),
        ({"granularity": "per_group", "group_size": 0}, "group_size"),
        ({"group_size": 32}, "group_size"),
        ({"narrow_range": True}, "narrow_range"),
        ({"bits": 2, "reduce_range": True}, "reduce_range"),
    ],
)
def test_spec_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field) as info:
        QuantSpec(**kwargs)
    assert "\n" not in str(info.value)


def test_spec_dict_round_trip_and_unknown_keys():
    spec = QuantSpec(bits=4, symmetric=True, granularity="per_group", group_size=32)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ConfigError, match="bitz"):
        QuantSpec.from_dict({"bitz": 4})


# ---------------------------------------------------------------- qparams


@FAST
@given(spec_and_range())
def test_qparams_match_onnxruntime_compute_scale_zp(case):
    spec, lo, hi = case
    scale, zp = qparams_from_range(lo, hi, spec)
    assert spec.qmin <= int(zp) <= spec.qmax
    assert torch.isfinite(scale) and scale > 0
    qtype = np.int8 if spec.signed else np.uint8
    ort_zp, ort_scale = compute_scale_zp(
        np.float32(lo), np.float32(hi), qtype(spec.qmin), qtype(spec.qmax), spec.symmetric
    )
    if spec.symmetric and not spec.signed and ort_scale == 1.0 and lo == hi == 0:
        return  # documented: we keep the midpoint zero point on an all-zero range
    assert np.float32(scale.item()) == ort_scale
    assert int(zp) == int(ort_zp)


@FAST
@given(spec_and_range())
def test_zero_is_exactly_representable(case):
    spec, lo, hi = case
    scale, zp = qparams_from_range(lo, hi, spec)
    assert fake_quantize(torch.zeros(3), scale, zp, spec).eq(0).all()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("signed", [False, True])
def test_all_zero_range_gives_unit_scale(signed, symmetric):
    spec = QuantSpec(signed=signed, symmetric=symmetric)
    scale, zp = qparams_from_range(torch.zeros(4), torch.zeros(4), spec)
    assert scale.eq(1.0).all() and scale.dtype == torch.float32 and zp.dtype == torch.int32
    assert fake_quantize(torch.zeros(4, 2), scale, zp, spec, axis=0).eq(0).all()


def test_symmetric_zero_points_are_grid_midpoints():
    _, zp = qparams_from_range(
        torch.tensor([-1.0, -3.0]),
        torch.tensor([2.0, 0.5]),
        QuantSpec(signed=False, symmetric=True),
    )
    assert zp.tolist() == [128, 128]
    _, zp = qparams_from_range(-1.0, 2.0, QuantSpec(symmetric=True))
    assert int(zp) == 0


def test_qparams_reject_bad_ranges():
    with pytest.raises(ConfigError, match="finite"):
        qparams_from_range(float("nan"), 1.0, QuantSpec())
    with pytest.raises(ConfigError, match="min_val must be <= max_val"):
        qparams_from_range(2.0, 1.0, QuantSpec())


# ---------------------------------------------------------------- round trip properties


def _grid_ends(scale, zp, spec):
    return (spec.qmin - zp.double()) * scale.double(), (spec.qmax - zp.double()) * scale.double()


@FAST
@given(tensor_with_qparams())
def test_round_trip_error_and_clamping(case):
    x, spec, scale, zp = case
    y = fake_quantize(x, scale, zp, spec).double()
    x64, s = x.double(), float(scale)
    lo, hi = _grid_ends(scale, zp, spec)
    inside = (x64 >= lo) & (x64 <= hi)
    tol = s / 2 + 1e-6 * (x64.abs() + s)
    assert ((y - x64).abs() <= tol)[inside].all()
    below, above = x64 < lo, x64 > hi
    assert torch.allclose(y[below], lo.expand_as(y)[below], rtol=1e-6)
    assert torch.allclose(y[above], hi.expand_as(y)[above], rtol=1e-6)


@FAST
@given(tensor_with_qparams())
def test_fake_quantize_is_idempotent(case):
    x, spec, scale, zp = case
    once = fake_quantize(x, scale, zp, spec)
    assert torch.equal(fake_quantize(once, scale, zp, spec), once)


@FAST
@given(tensor_with_qparams())
def test_quantize_codes_dtype_and_bounds(case):
    x, spec, scale, zp = case
    q = quantize(x, scale, zp, spec)
    assert q.dtype == (torch.int8 if spec.signed else torch.uint8)
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    assert torch.equal(dequantize(q, scale, zp), fake_quantize(x, scale, zp, spec))


# ---------------------------------------------------------------- agreement with torch


def _near_tie(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    v = x.double() / scale.double()
    return ((v - v.floor() - 0.5).abs() <= 1e-6 * (v.abs() + 1)).to(torch.bool)


def _assert_matches_torch(ours, theirs, x, scale):
    """Equal, except on float32 near-ties where ``x*(1/s)`` and ``x/s`` round apart: one step."""
    diff = (ours.double() - theirs.double()).abs()
    tie = _near_tie(x, scale)
    assert diff[~tie].eq(0).all()
    assert (diff[tie] <= scale.double().expand_as(diff)[tie] * (1 + 1e-6)).all()


@FAST
@given(tensor_with_qparams(), st.booleans())
def test_matches_torch_fake_quantize_per_tensor(case, power_of_two):
    x, spec, scale, zp = case
    if power_of_two:
        scale = torch.exp2(torch.log2(scale).round())
    ours = fake_quantize(x, scale, zp, spec)
    theirs = torch.fake_quantize_per_tensor_affine(x, scale, zp, spec.qmin, spec.qmax)
    if power_of_two:
        assert torch.equal(ours, theirs)
    else:
        _assert_matches_torch(ours, theirs, x, scale)


@FAST
@given(
    st.lists(spec_and_range(), min_size=1, max_size=5),
    st.integers(1, 6),
    st.integers(0, 2**31 - 1),
)
def test_matches_torch_fake_quantize_per_channel(cases, rows, seed):
    spec = dataclasses.replace(cases[0][0], granularity="per_channel", axis=1)
    lo, hi = torch.tensor([a for _, a, _ in cases]), torch.tensor([b for _, _, b in cases])
    scale, zp = qparams_from_range(lo, hi, spec)
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(rows, len(cases), generator=g) * 1.4 - 0.2) * (hi - lo) + lo
    ours = fake_quantize(x, scale, zp, spec)
    theirs = torch.fake_quantize_per_channel_affine(x, scale, zp, 1, spec.qmin, spec.qmax)
    _assert_matches_torch(ours, theirs, x, scale.reshape(1, -1))


# ---------------------------------------------------------------- agreement with ONNX Runtime

_ONNX_TYPE = {True: TensorProto.INT8, False: TensorProto.UINT8}


@functools.cache
def _ort_session(op: str, signed: bool, axis: int | None) -> ort.InferenceSession:
    """A one-node QuantizeLinear/DequantizeLinear (opset 13) model with runtime qparams."""
    int_t = _ONNX_TYPE[signed]
    in_t, out_t = (
        (TensorProto.FLOAT, int_t) if op == "QuantizeLinear" else (int_t, TensorProto.FLOAT)
    )
    node = helper.make_node(
        op, ["x", "scale", "zp"], ["y"], **({} if axis is None else {"axis": axis})
    )
    graph = helper.make_graph(
        [node],
        "qdq",
        [
            helper.make_tensor_value_info("x", in_t, None),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("zp", int_t, None),
        ],
        [helper.make_tensor_value_info("y", out_t, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _run_ort(op, signed, axis, x, scale, zp):
    zp_np = zp.numpy().astype(np.int8 if signed else np.uint8)
    feeds = {"x": x.numpy(), "scale": scale.numpy().astype(np.float32), "zp": zp_np}
    return torch.from_numpy(_ort_session(op, signed, axis).run(None, feeds)[0])


spec8 = st.builds(QuantSpec, signed=st.booleans(), symmetric=st.booleans())


@FAST
@given(tensor_with_qparams(spec8))
def test_matches_onnxruntime_per_tensor(case):
    x, spec, scale, zp = case
    q = quantize(x, scale, zp, spec)
    assert torch.equal(q, _run_ort("QuantizeLinear", spec.signed, None, x, scale, zp))
    y = _run_ort("DequantizeLinear", spec.signed, None, q, scale, zp)
    assert torch.equal(dequantize(q, scale, zp), y)


@FAST
@given(st.lists(spec_and_range(spec8), min_size=1, max_size=6), st.integers(0, 2**31 - 1))
def test_matches_onnxruntime_per_axis(cases, seed):
    spec = dataclasses.replace(cases[0][0], granularity="per_channel", axis=0)
    lo, hi = torch.tensor([a for _, a, _ in cases]), torch.tensor([b for _, _, b in cases])
    scale, zp = qparams_from_range(lo, hi, spec)
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(3, len(cases), 2, generator=g) * 1.4 - 0.2) * (hi - lo)[:, None] + lo[:, None]
    x = x.transpose(0, 1).contiguous()  # channels on axis 0
    q = quantize(x, scale, zp, spec)
    assert torch.equal(q, _run_ort("QuantizeLinear", spec.signed, 0, x, scale, zp))
    y = _run_ort("DequantizeLinear", spec.signed, 0, q, scale, zp)
    assert torch.equal(dequantize(q, scale, zp, axis=0), y)


def _ort_run_opset21(nodes, initializers, x):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)] if x is not None else [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {} if x is None else {"x": x.numpy()})[0])


@pytest.mark.parametrize("signed", [True, False])
def test_int4_packing_and_fake_quant_match_onnxruntime(signed):
    spec = QuantSpec(bits=4, signed=signed)
    x = torch.randn(7, generator=torch.Generator().manual_seed(0)) * 3
    scale, zp = qparams_from_range(-2.0, 5.0, spec)
    int4 = TensorProto.INT4 if signed else TensorProto.UINT4
    s_init = helper.make_tensor("s", TensorProto.FLOAT, [], [float(scale)])
    z_init = helper.make_tensor("z", int4, [], [int(zp)])
    q = quantize(x, scale, zp, spec)
    packed = pack_int4(q)
    q_init = helper.make_tensor("q", int4, [q.numel()], packed.numpy().tobytes(), raw=True)
    dq = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])
    y = _ort_run_opset21([dq], [q_init, s_init, z_init], None)
    assert torch.equal(y, dequantize(unpack_int4(packed, q.numel(), signed), scale, zp))
    qdq = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["qx"]),
        helper.make_node("DequantizeLinear", ["qx", "s", "z"], ["y"]),
    ]
    assert torch.equal(
        _ort_run_opset21(qdq, [s_init, z_init], x), fake_quantize(x, scale, zp, spec)
    )


@pytest.mark.parametrize("signed", [True, False])
def test_per_group_matches_onnxruntime_blocked_qdq(signed):
    spec = QuantSpec(signed=signed, granularity="per_group", group_size=4)
    w = torch.randn(3, 2, 12, generator=torch.Generator().manual_seed(1))
    scale, zp = qparams_from_range(*tensor_range(w, spec), spec)
    assert scale.shape == (3, 2, 3)
    int_t = _ONNX_TYPE[signed]
    inits = [
        helper.make_tensor("s", TensorProto.FLOAT, list(scale.shape), scale.flatten().tolist()),
        helper.make_tensor("z", int_t, list(zp.shape), zp.flatten().tolist()),
    ]
    qdq = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=-1, block_size=4),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=-1, block_size=4),
    ]
    assert torch.equal(_ort_run_opset21(qdq, inits, w), fake_quantize(w, scale, zp, spec))


# ---------------------------------------------------------------- per-group, ranges, packing


def test_per_group_equals_per_channel_on_the_group_view():
    spec = QuantSpec(bits=4, symmetric=True, granularity="per_group", group_size=8)
    w = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    scale, zp = qparams_from_range(*tensor_range(w, spec), spec)
    q = quantize_per_group(w, scale, zp, spec)
    per_channel = QuantSpec(bits=4, symmetric=True, granularity="per_channel", axis=0)
    rows = w.reshape(-1, 8)
    assert torch.equal(q.reshape(-1, 8), quantize(rows, scale.flatten(), zp.flatten(), per_channel))
    back = dequantize_per_group(q, scale, zp, 8)
    assert ((back - w).abs() <= scale.repeat_interleave(8, dim=-1) / 2 + 1e-6).all()


def test_per_group_errors_name_shape_and_group_size():
    spec = QuantSpec(granularity="per_group", group_size=4)
    with pytest.raises(ConfigError, match=r"\(3, 10\).*group_size=4"):
        quantize_per_group(torch.zeros(3, 10), torch.ones(3, 2), torch.zeros(3, 2), spec)
    with pytest.raises(ConfigError, match=r"\(3, 2\)"):
        quantize_per_group(torch.zeros(3, 8), torch.ones(3), torch.zeros(3), spec)


def test_per_channel_and_per_tensor_shape_errors():
    spec = QuantSpec(granularity="per_channel", axis=1)
    with pytest.raises(ConfigError, match="axis 1"):
        quantize(torch.zeros(2, 3), torch.ones(2), torch.zeros(2), spec)
    with pytest.raises(ConfigError, match="per-tensor"):
        dequantize(torch.zeros(2, 3, dtype=torch.int8), torch.ones(2), torch.zeros(2))
    with pytest.raises(ConfigError, match="out of range"):
        quantize(torch.zeros(2, 3), torch.ones(2), torch.zeros(2), spec, axis=5)


def test_tensor_range_shapes():
    x = torch.arange(24.0).reshape(2, 3, 4)
    lo, hi = tensor_range(x, QuantSpec())
    assert (lo.item(), hi.item()) == (0.0, 23.0)
    lo, hi = tensor_range(x, QuantSpec(granularity="per_channel", axis=1))
    assert lo.tolist() == [0.0, 4.0, 8.0] and hi.tolist() == [15.0, 19.0, 23.0]
    lo, hi = tensor_range(x, QuantSpec(granularity="per_group", group_size=2))
    assert lo.shape == (2, 3, 2) and lo[0, 0].tolist() == [0.0, 2.0]


@FAST
@given(st.lists(st.integers(-8, 7), max_size=33), st.booleans())
def test_int4_pack_round_trip(values, signed):
    q = torch.tensor(values, dtype=torch.int8)
    if not signed:
        q = q + 8
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.numel() == (len(values) + 1) // 2
    assert torch.equal(unpack_int4(packed, len(values), signed), q.to(torch.int8))


def test_int4_pack_layout_and_errors():
    packed = pack_int4(torch.tensor([-8, 7, 3], dtype=torch.int8))
    assert packed.tolist() == [0x78, 0x03]
    with pytest.raises(ConfigError, match="-8, 15"):
        pack_int4(torch.tensor([16]))
    with pytest.raises(ConfigError, match="integer tensor"):
        pack_int4(torch.tensor([1.0]))
    with pytest.raises(ConfigError, match="numel"):
        unpack_int4(packed, 5, signed=True)

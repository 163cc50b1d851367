"""AVX2 u8 x s8 pair saturation: hand-computed cases, im2col layout, model-level emulation."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimkit.errors import ConfigError, StateError, UnsupportedModuleError
from slimkit.quant import saturation
from slimkit.quant.ptq import StaticQuantization, StaticQuantizationConfig
from slimkit.quant.saturation import (
    INT16_MAX,
    conv_input_matrix,
    conv_weight_matrix,
    emulate_u8s8_saturation,
    input_qparams,
    needs_reduce_range,
    pair_can_saturate,
    pair_saturation,
    reduce_weight_range_,
    saturation_report,
)


def _u8(rows):
    return torch.tensor(rows, dtype=torch.uint8)


def _s8(rows):
    return torch.tensor(rows, dtype=torch.int8)


def test_full_range_pair_saturates_to_int16_max():
    r = pair_saturation(_u8([[255, 255]]), _s8([[127, 127]]))
    assert (r.pairs, r.saturated_pairs, r.rate) == (1, 1, 1.0)
    assert int(r.exact[0, 0]) == 2 * 255 * 127 == 64770
    assert int(r.emulated[0, 0]) == INT16_MAX
    assert int(r.error[0, 0]) == 32767 - 64770
    assert r.affected_fraction == 1.0


def test_negative_pair_saturates_to_int16_min():
    r = pair_saturation(_u8([[200, 255]]), _s8([[-128, -128]]))
    assert int(r.exact[0, 0]) == -(200 + 255) * 128 == -58240
    assert int(r.emulated[0, 0]) == -32768


def test_pairs_are_adjacent_entries_along_k():
    # K = 4: pairs (0, 1) and (2, 3). Only the first pair overflows; opposite signs never do.
    a = _u8([[255, 255, 255, 255]])
    w = _s8([[127, 127, 127, -127]])
    r = pair_saturation(a, w)
    assert (r.pairs, r.saturated_pairs) == (2, 1)
    assert int(r.exact[0, 0]) == 255 * 127 * 2
    assert int(r.emulated[0, 0]) == INT16_MAX + 0
    # the same values with the big products split across pairs do not saturate
    r = pair_saturation(_u8([[255, 255, 255, 255]]), _s8([[127, -127, 127, 127]]))
    assert r.saturated_pairs == 1  # (127, 127) is still a pair at (2, 3)
    r = pair_saturation(_u8([[255, 255, 255, 255]]), _s8([[127, -127, -127, 127]]))
    assert r.saturated_pairs == 0 and int(r.exact[0, 0]) == 0


def test_just_below_and_above_the_limit():
    # 129 * 127 * 2 = 32766 fits in int16; 129 * 127 + 130 * 127 = 32893 does not
    assert pair_saturation(_u8([[129, 129]]), _s8([[127, 127]])).saturated_pairs == 0
    r = pair_saturation(_u8([[129, 130]]), _s8([[127, 127]]))
    assert r.saturated_pairs == 1 and int(r.exact[0, 0]) == 32893


def test_odd_k_is_padded_with_a_zero_product():
    r = pair_saturation(_u8([[255, 255, 255]]), _s8([[127, 127, 127]]))
    assert r.pairs == 2 and r.saturated_pairs == 1
    assert int(r.emulated[0, 0]) == INT16_MAX + 255 * 127


def test_seven_bit_codes_never_saturate():
    torch.manual_seed(0)
    a7 = torch.randint(0, 128, (64, 96), dtype=torch.int32)
    w8 = torch.randint(-127, 128, (16, 96), dtype=torch.int32)
    assert pair_saturation(a7, w8).saturated_pairs == 0
    a7[:] = 127
    w8[:] = 127
    assert pair_saturation(a7, w8).saturated_pairs == 0  # 2 * 127 * 127 = 32258
    a8 = torch.full((4, 8), 255, dtype=torch.int32)
    assert pair_saturation(a8, torch.full((2, 8), 64, dtype=torch.int32)).saturated_pairs == 0
    assert pair_saturation(a8, torch.full((2, 8), -64, dtype=torch.int32)).saturated_pairs == 0
    assert not pair_can_saturate(127, 127)
    assert not pair_can_saturate(255, 64)
    assert pair_can_saturate(255, 127)
    assert pair_can_saturate(255, 65)


def test_exact_accumulator_equals_integer_matmul_and_chunking(monkeypatch):
    torch.manual_seed(1)
    a = torch.randint(0, 256, (300, 50), dtype=torch.int32)
    w = torch.randint(-128, 128, (7, 50), dtype=torch.int32)
    r = pair_saturation(a, w)
    assert torch.equal(r.exact, a.long() @ w.long().T)
    assert r.pairs == 300 * 7 * 25
    assert 0 < r.saturated_pairs < r.pairs
    monkeypatch.setattr(saturation, "_CHUNK_ELEMENTS", 100)  # 1 row per chunk
    chunked = pair_saturation(a, w)
    assert chunked.saturated_pairs == r.saturated_pairs
    assert torch.equal(chunked.emulated, r.emulated) and torch.equal(chunked.exact, r.exact)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_pair_sums(seed):
    g = torch.Generator().manual_seed(seed)
    k = 9 + seed  # odd and even K
    a = torch.randint(0, 256, (200, k), generator=g)
    a[a < 128] //= 8  # mostly small codes, as after ReLU, with some large ones
    w = torch.randint(-128, 128, (5, k), generator=g)
    r = pair_saturation(a, w)
    pad_a, pad_w = F.pad(a, (0, k % 2)), F.pad(w, (0, k % 2))
    sums = (pad_a.reshape(200, 1, -1, 2) * pad_w.reshape(1, 5, -1, 2)).sum(-1)
    clamped = sums.clamp(-32768, 32767)
    assert r.saturated_pairs == int((sums != clamped).sum()) > 0
    assert torch.equal(r.emulated, clamped.sum(-1))
    assert torch.equal(r.exact, sums.sum(-1))


def test_input_validation():
    with pytest.raises(ConfigError, match="activations must lie in"):
        pair_saturation(torch.tensor([[256]]), _s8([[1]]))
    with pytest.raises(ConfigError, match="weights must lie in"):
        pair_saturation(_u8([[1]]), torch.tensor([[-129]]))
    with pytest.raises(ConfigError, match="must match"):
        pair_saturation(_u8([[1, 2]]), _s8([[1]]))
    with pytest.raises(ConfigError, match="2-D"):
        pair_saturation(_u8([1]), _s8([[1]]))
    with pytest.raises(ConfigError, match="integer codes"):
        pair_saturation(torch.tensor([[0.5]]), _s8([[1]]))


@pytest.mark.parametrize(
    ("groups", "stride", "padding", "zero_point"),
    [(1, 1, 1, 0), (1, 2, 1, 37), (2, 1, 0, 128), (4, 2, 1, 5)],
)
def test_conv_matrices_reproduce_the_integer_convolution(groups, stride, padding, zero_point):
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 8, 3, stride=stride, padding=padding, groups=groups, bias=False)
    x = torch.randint(0, 256, (2, 8, 6, 6))
    w = torch.randint(-127, 128, conv.weight.shape)
    a_mats = conv_input_matrix(x, conv, zero_point)
    w_mats = conv_weight_matrix(w, groups)
    got = torch.cat([a.long() @ b.long().T for a, b in zip(a_mats, w_mats, strict=True)], dim=1)
    padded = F.pad(x.double(), (padding,) * 4, value=float(zero_point))
    ref = F.conv2d(padded, w.double(), stride=stride, groups=groups)  # (N, M, oh, ow)
    assert torch.equal(got, ref.permute(0, 2, 3, 1).reshape(-1, 8).long())
    # K is ordered (kh, kw, c): the first two entries of a row are two channels at one position
    if groups == 1:
        assert torch.equal(w_mats[0][:, :2], w[:, :2, 0, 0].int())


def test_conv_matrix_errors():
    with pytest.raises(UnsupportedModuleError, match="Conv2d"):
        conv_input_matrix(torch.zeros(1, 1, 4, 4), nn.Linear(1, 1), 0)
    with pytest.raises(UnsupportedModuleError, match="padding"):
        conv_input_matrix(torch.zeros(1, 1, 4, 4), nn.Conv2d(1, 1, 3, padding="same"), 0)
    with pytest.raises(ConfigError, match="codes must be"):
        conv_input_matrix(torch.zeros(1, 2, 4, 4), nn.Conv2d(1, 1, 3), 0)
    with pytest.raises(ConfigError, match="weight codes"):
        conv_weight_matrix(torch.zeros(3, 1, 3, 3), groups=2)


def test_needs_reduce_range_from_isa_flags():
    assert needs_reduce_range({"avx2": True, "avx512f": False, "avx512_vnni": False})
    assert needs_reduce_range({"avx2": True, "avx512f": True, "avx512_vnni": False})
    assert not needs_reduce_range({"avx2": True, "avx512_vnni": True})
    assert not needs_reduce_range({"avx2": True, "avx_vnni": True})
    assert not needs_reduce_range({"avx2": True, "amx": True})
    assert not needs_reduce_range({"avx2": False})  # ARM / unknown
    assert not needs_reduce_range({"avx2": None})
    assert isinstance(needs_reduce_range(), bool)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.dw(self.conv(x)), 1))


def _calibrated(reduce_range: bool):
    torch.manual_seed(3)
    model = _Net()
    with torch.no_grad():  # weights whose per-channel max sits next to a same-sign partner
        model.conv.weight.abs_()
    batches = [torch.rand(16, 4, 4, 4) for _ in range(2)]
    technique = StaticQuantization(StaticQuantizationConfig(reduce_range=reduce_range))
    technique.apply(model)
    technique.calibrate(model, batches)
    return technique, model, batches


def _quantized(reduce_range: bool):
    technique, model, batches = _calibrated(reduce_range)
    return model, input_qparams(technique), batches


def test_emulation_changes_outputs_only_where_pairs_saturate():
    model, qparams, _ = _quantized(reduce_range=False)
    x = torch.ones(4, 4, 4, 4)  # the calibration max everywhere: codes 255
    with torch.no_grad():
        clean = model(x)
        with emulate_u8s8_saturation(model, qparams) as report:
            saturated = model(x)
        after = model(x)
    assert torch.equal(clean, after)  # hooks are gone
    assert report.layers["dw"].kernel == "int32" and report.layers["dw"].pairs == 0
    conv = report.layers["conv"]
    assert conv.kernel == "u8s8" and conv.saturated_pairs > 0 and conv.max_error_codes > 0
    assert 0 < report.rate <= 1 and report.to_dict()["layers"]["conv"]["rate"] == conv.rate
    assert not torch.equal(clean, saturated)


def test_emulation_is_exact_with_seven_bit_activations():
    model, qparams, batches = _quantized(reduce_range=True)
    x = torch.ones(4, 4, 4, 4)
    with torch.no_grad():
        clean = model(x)
        with emulate_u8s8_saturation(model, qparams) as report:
            emulated = torch.cat([model(b) for b in itertools.chain(batches, [x])])
    assert report.pairs > 0 and report.saturated_pairs == 0
    assert torch.equal(emulated[-4:], clean)


def test_emulation_errors():
    model, _, _ = _quantized(reduce_range=False)
    with pytest.raises(ConfigError, match="not a module"):
        with emulate_u8s8_saturation(model, {"nope": (1.0, 0)}):
            pass
    with pytest.raises(UnsupportedModuleError, match="only Conv2d and Linear"):
        with emulate_u8s8_saturation(model, {"": (1.0, 0)}):
            pass
    plain = _Net()
    with pytest.raises(UnsupportedModuleError, match="no calibrated slimkit weight quantizer"):
        with emulate_u8s8_saturation(plain, {"conv": (1.0, 0)}):
            plain(torch.rand(1, 4, 4, 4))


def test_docstring_examples():
    import doctest

    assert doctest.testmod(saturation).failed == 0


def test_seven_bit_weights_remove_saturation_and_export(tmp_path):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from slimkit.export.qdq import export_qdq
    from slimkit.measure.latency import ort_session

    technique, model, _ = _calibrated(reduce_range=False)
    qparams = input_qparams(technique)
    assert set(qparams) == {"conv", "dw", "fc"}
    x = torch.ones(4, 4, 4, 4)
    before = saturation_report(model, qparams, [(x, None)])
    needed = [n for n, s in before.layers.items() if s.saturated_pairs]
    assert "conv" in needed and "dw" not in needed  # depthwise runs an int32 kernel
    assert reduce_weight_range_(technique, reversed(needed)) == needed  # model order
    assert saturation_report(model, qparams, [x]).saturated_pairs == 0
    assert model.training is False
    assert reduce_weight_range_(technique) == ["conv", "fc"]  # all u8s8 layers, not depthwise
    codes = torch.round(
        model.conv.weight / model.conv.parametrizations.weight[0].scale[:, None, None, None]
    )
    assert int(codes.abs().max()) == 63

    path = export_qdq(model, x[:1], tmp_path / "w7.onnx")
    proto = onnx.load(str(path))
    int8 = [numpy_helper.to_array(i) for i in proto.graph.initializer]
    int8 = [a for a in int8 if a.dtype == np.int8 and a.ndim > 1]
    assert len(int8) == 3 and max(int(np.abs(a).max()) for a in int8[:1]) <= 63
    with torch.no_grad():
        want = model(x).numpy()
    got = ort_session(path).run(None, {"input": x.numpy()})[0]
    step = float(model.activation_quantizers["fc"].scale)
    assert np.abs(got - want).max() <= step * 1.01 + 1e-6


def test_remedy_errors():
    technique = StaticQuantization()
    technique.apply(_Net())
    with pytest.raises(StateError, match="calibrated"):
        reduce_weight_range_(technique)
    with pytest.raises(StateError, match="calibrated"):
        input_qparams(technique)
    technique, _, _ = _calibrated(reduce_range=False)
    with pytest.raises(ConfigError, match="'nope' not quantized by this technique"):
        reduce_weight_range_(technique, ["conv", "nope"])


def test_reduce_weight_range_option_applies_the_remedy_at_calibration():
    torch.manual_seed(3)
    model = _Net()
    with torch.no_grad():
        model.conv.weight.abs_()
    batches = [torch.rand(16, 4, 4, 4) for _ in range(2)]
    technique = StaticQuantization(StaticQuantizationConfig(reduce_weight_range=True))
    technique.apply(model)
    technique.calibrate(model, batches)
    qparams = input_qparams(technique)
    assert saturation_report(model, qparams, [torch.ones(4, 4, 4, 4)]).saturated_pairs == 0
    for name in ("conv", "fc"):  # u8s8 layers on 7-bit codes; the depthwise conv keeps 8
        layer = getattr(model, name)
        scale = layer.parametrizations.weight[0].scale
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        assert int(torch.round(layer.weight / scale.view(shape)).abs().max()) == 63
    dw = model.dw.parametrizations.weight[0].scale.view(-1, 1, 1, 1)
    assert int(torch.round(model.dw.weight / dw).abs().max()) == 127

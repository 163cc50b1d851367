"""Magnitude pruning on real modules: schedules, patterns, rankings, importance, life cycle."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import textwrap
from collections import OrderedDict
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrize

from slimkit import (
    NM,
    Block,
    Compressor,
    ConfigError,
    ConstantSchedule,
    MagnitudePruning,
    MagnitudePruningConfig,
    PolynomialSchedule,
    StateError,
    TrialsSchedule,
    strip_pruning,
)
from slimkit.prune.magnitude import WeightMask, weight_mask_of
from slimkit.prune.masks import layer_mask, prune_count

# --- helpers ------------------------------------------------------------------------------------

LAYERS = {
    "linear": (lambda: nn.Linear(16, 8), (3, 16)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3), (2, 4, 9)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 6, 6)),
    "conv3d": (lambda: nn.Conv3d(4, 4, 2, stride=2), (2, 4, 4, 4, 4)),
}
CONV_FN = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def make_layer(kind: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    factory, input_shape = LAYERS[kind]
    torch.manual_seed(seed)
    layer = factory()
    return layer, torch.randn(input_shape, generator=torch.Generator().manual_seed(seed + 100))


def functional(layer: nn.Module, x: torch.Tensor, weight, bias) -> torch.Tensor:
    """The layer's op with explicit weight and bias (no parametrization involved)."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    conv = next(fn for cls, fn in CONV_FN.items() if isinstance(layer, cls))
    return conv(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def prune(model: nn.Module, **config) -> tuple[Compressor, MagnitudePruning]:
    technique = MagnitudePruning(MagnitudePruningConfig(**config))
    return Compressor([technique]).apply(model), technique


def mask_of(module: nn.Module) -> torch.Tensor:
    return weight_mask_of(module).mask


def original_of(module: nn.Module) -> torch.Tensor:
    return module.parametrizations.weight.original


def zeros(mask: torch.Tensor) -> int:
    return int((mask == 0).sum())


def small_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 6, 3),
            act=nn.ReLU(),
            flat=nn.Flatten(),
            fc=nn.Linear(6 * 4 * 4, 5),
        )
    )


def cnn_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(i)
    return torch.randn(4, 3, 6, 6, generator=gen), torch.randn(4, 5, generator=gen)


def train_step(model, optimizer, compressor, i: int) -> None:
    x, y = cnn_batch(i)
    F.mse_loss(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    compressor.step()


def run_python(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    path = cwd / "script.py"
    path.write_text(script)
    result = subprocess.run(
        [sys.executable, str(path), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# --- masks on every supported layer type --------------------------------------------------------


@pytest.mark.parametrize("kind", LAYERS)
def test_one_shot_masks_are_parametrizations_and_bias_is_untouched(kind):
    layer, x = make_layer(kind)
    model = nn.Sequential(layer)
    weight0, bias0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    compressor, technique = prune(model, sparsity=0.5)

    assert parametrize.is_parametrized(layer, "weight")
    assert not parametrize.is_parametrized(layer, "bias")
    assert isinstance(layer.parametrizations.weight[0], WeightMask)
    assert torch.equal(original_of(layer), weight0)  # the stored weight itself is untouched
    mask = mask_of(layer)
    assert mask.shape == weight0.shape
    assert zeros(mask) == prune_count(weight0.numel(), 0.5)
    assert float(weight0.abs()[mask == 0].max()) <= float(weight0.abs()[mask == 1].min())
    assert torch.equal(layer.weight, weight0 * mask)
    assert torch.equal(layer.bias, bias0) and (layer.bias != 0).all()
    assert torch.equal(model(x), functional(layer, x, weight0 * mask, bias0))
    assert technique.layer_sparsity() == {"0": zeros(mask) / mask.numel()}
    assert technique.plan(model).names == ["0"]
    assert compressor.updated == [technique]


@pytest.mark.parametrize("kind", LAYERS)
def test_polynomial_schedule_hits_the_target_at_every_update_step(kind):
    schedule = PolynomialSchedule(final=0.75, begin=2, end=10, frequency=3)
    layer, x = make_layer(kind)
    model = nn.Sequential(layer)
    compressor, technique = prune(model, schedule=schedule)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    numel = layer.weight.numel()
    acted, history = [], []
    for step in range(1, 15):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        before = mask_of(layer).clone()
        compressor.step()
        mask = mask_of(layer)
        if technique in compressor.updated:
            acted.append(step)
            assert schedule.is_update_step(step)
            assert technique.target == schedule.value(step)
            assert zeros(mask) == prune_count(numel, schedule.value(step))
        else:
            assert torch.equal(mask, before)
        history.append(zeros(mask))
    # step 2 is an update step but its target (initial 0.0) prunes nothing
    assert acted == [5, 8, 10]
    assert history == sorted(history) and history[-1] == prune_count(numel, 0.75)
    assert technique.overall_sparsity() == prune_count(numel, 0.75) / numel


def test_constant_one_shot_prunes_at_apply_and_then_holds():
    model = small_cnn()
    compressor, technique = prune(model, sparsity=0.6)
    masks = {n: mask_of(model.get_submodule(n)).clone() for n in ("conv", "fc")}
    for name, mask in masks.items():
        assert zeros(mask) == prune_count(mask.numel(), 0.6), name
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(5):
        train_step(model, optimizer, compressor, i)
        assert compressor.updated == []
    for name, mask in masks.items():
        assert torch.equal(mask_of(model.get_submodule(name)), mask)
    assert technique.target == 0.6


def test_trials_schedule_steps_in_equal_increments():
    model = small_cnn()
    schedule = TrialsSchedule(target=0.6, num_trials=3, step_interval=2, begin=1)
    compressor, technique = prune(model, schedule=schedule)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    numel = model.fc.weight.numel()
    seen = {}
    for i in range(1, 9):
        train_step(model, optimizer, compressor, i)
        if compressor.updated:
            seen[i] = zeros(mask_of(model.fc))
    assert seen == {
        1: prune_count(numel, 0.2),
        3: prune_count(numel, 0.4),
        5: prune_count(numel, 0.6),
    }
    assert technique.target == pytest.approx(0.6)


def test_masks_are_monotone_and_pruned_weights_stay_zero_under_adam():
    model = small_cnn()
    schedule = PolynomialSchedule(final=0.8, begin=1, end=24, frequency=3)
    compressor, _ = prune(model, schedule=schedule)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.01)
    layers = [model.conv, model.fc]
    biases = [layer.bias.detach().clone() for layer in layers]
    previous = [mask_of(layer).clone() for layer in layers]
    for i in range(40):
        x, y = cnn_batch(i)
        F.mse_loss(model(x), y).backward()
        for layer, mask in zip(layers, previous, strict=True):
            # the gradient reaching a pruned weight is exactly zero
            assert bool((original_of(layer).grad[mask == 0] == 0).all())
        optimizer.step()
        optimizer.zero_grad()
        compressor.step()
        for j, layer in enumerate(layers):
            mask = mask_of(layer)
            assert bool(((previous[j] == 0) <= (mask == 0)).all()), f"step {i}: a weight regrew"
            assert bool((layer.weight[mask == 0] == 0).all())
            previous[j] = mask.clone()
    for layer, bias in zip(layers, biases, strict=True):
        assert zeros(mask_of(layer)) == prune_count(layer.weight.numel(), 0.8)
        assert not torch.equal(layer.bias, bias)  # biases train and are never masked
        assert int((layer.bias == 0).sum()) == 0
    # Adam's momentum and weight decay move the stored weights; the mask still zeroes them
    assert float(original_of(model.fc).detach()[mask_of(model.fc) == 0].abs().max()) > 0


def two_scale_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(big=nn.Linear(16, 16), act=nn.ReLU(), small=nn.Linear(16, 8)))
    with torch.no_grad():
        model.big.weight.mul_(1.5)
    return model


def test_global_ranking_uses_one_threshold_across_layers():
    model = two_scale_model()
    weights = {n: model.get_submodule(n).weight.detach().abs().clone() for n in ("big", "small")}
    _, technique = prune(model, sparsity=0.5, ranking="global")
    total = sum(w.numel() for w in weights.values())
    sparsities = technique.layer_sparsity()
    assert abs(technique.overall_sparsity() - 0.5) <= 1 / total
    assert sum(zeros(mask_of(model.get_submodule(n))) for n in weights) == prune_count(total, 0.5)
    assert sparsities["small"] - sparsities["big"] > 0.1  # smaller weights are pruned more
    thresholds = set(technique.thresholds.values())
    assert len(thresholds) == 1
    (threshold,) = thresholds
    for name, w in weights.items():
        mask = mask_of(model.get_submodule(name))
        assert float(w[mask == 0].max()) <= threshold <= float(w[mask == 1].min())
    assert threshold == max(
        float(w[mask_of(model.get_submodule(n)) == 0].max()) for n, w in weights.items()
    )


def test_local_ranking_prunes_every_layer_to_the_target():
    model = two_scale_model()
    weights = {n: model.get_submodule(n).weight.detach().abs().clone() for n in ("big", "small")}
    _, technique = prune(model, sparsity=0.5, ranking="local")
    for name, w in weights.items():
        mask = mask_of(model.get_submodule(name))
        assert zeros(mask) == prune_count(w.numel(), 0.5)
        assert technique.thresholds[name] == float(w[mask == 0].max())
    assert technique.thresholds["big"] != technique.thresholds["small"]


# --- importance ---------------------------------------------------------------------------------


def run_oscillating(importance: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight 0 swings between +1 and -1 and happens to be near zero at the update step."""
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    original = model[0].weight

    def set_weights(a: float) -> None:
        with torch.no_grad():
            weight = original_of(model[0]) if parametrize.is_parametrized(model[0]) else original
            weight.copy_(torch.tensor([[a, 0.3, 0.9, 1.2]]))

    set_weights(1.0)
    config = dict(schedule=ConstantSchedule(target=0.25, begin=6), importance=importance)
    compressor, _ = prune(model, **config, ema_alpha=0.8)
    history = [1.0, -1.0, 1.0, -1.0, 1.0, 0.05]
    for a in history:  # steps 1..6, the masks move at step 6
        set_weights(a)
        compressor.step()
    expected_ema = torch.tensor([1.0, 0.3, 0.9, 1.2])
    for a in history:
        expected_ema = 0.8 * expected_ema + 0.2 * torch.tensor([abs(a), 0.3, 0.9, 1.2])
    return mask_of(model[0]).reshape(-1), expected_ema


def test_ema_importance_smooths_an_oscillating_weight():
    magnitude_mask, _ = run_oscillating("magnitude")
    ema_mask, expected = run_oscillating("ema")
    # plain magnitude sees |w0| = 0.05 at the update step and prunes it;
    # the EMA remembers w0 was large (0.81) and prunes the steady 0.3 instead
    assert torch.equal(magnitude_mask, torch.tensor([0.0, 1.0, 1.0, 1.0]))
    assert torch.equal(ema_mask, torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert expected[0] == pytest.approx(0.81)


def test_ema_importance_buffer_follows_the_documented_update():
    model = nn.Sequential(nn.Linear(3, 2))
    w0 = model[0].weight.detach().abs().clone()
    compressor, _ = prune(
        model, schedule=ConstantSchedule(target=0.5, begin=50), importance="ema", ema_alpha=0.7
    )
    state = weight_mask_of(model[0])
    assert torch.equal(state.importance, w0)
    expected = w0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for i in range(3):
        model(torch.randn(4, 3, generator=torch.Generator().manual_seed(i))).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        compressor.step()
        expected = 0.7 * expected + 0.3 * model[0].weight.detach().abs()
        assert torch.allclose(state.importance, expected)


def test_taylor_one_shot_without_gradients_raises_naming_the_layer():
    model = nn.Sequential(OrderedDict(encoder=nn.Linear(4, 4)))
    with pytest.raises(StateError, match="'encoder'") as info:
        Compressor([MagnitudePruningConfig(sparsity=0.5, importance="taylor")]).apply(model)
    assert "gradient" in str(info.value)


def test_taylor_prunes_by_weight_times_gradient_averaged_over_steps():
    model = nn.Sequential(nn.Linear(8, 1, bias=False))
    w = torch.tensor([[0.1, 1.0, 0.5, 0.2, 0.8, 0.3, 0.9, 0.05]])
    with torch.no_grad():
        model[0].weight.copy_(w)
    compressor, technique = prune(
        model, schedule=ConstantSchedule(target=0.5, begin=2), importance="taylor"
    )
    x1 = torch.tensor([[100.0, 0.01, 1.0, 10.0, 0.1, 5.0, 0.02, 50.0]])
    x2 = torch.tensor([[50.0, 0.02, 3.0, 10.0, 0.3, 1.0, 0.01, 80.0]])
    for x in (x1, x2):  # d(sum of outputs)/dw = x; no optimizer step so w stays fixed
        model(x).sum().backward()
        compressor.step()  # reads .grad: call it before zero_grad
        model.zero_grad()
    assert compressor.updated == [technique]
    state = weight_mask_of(model[0])
    taylor = ((w * x1).abs() + (w * x2).abs()) / 2
    assert torch.allclose(state.importance, 2 * taylor)
    expected = layer_mask(taylor, torch.ones_like(w), 0.5)
    assert torch.equal(mask_of(model[0]), expected)
    # |w| alone would choose differently: the large weights with tiny gradients go
    assert not torch.equal(expected, layer_mask(w.abs(), torch.ones_like(w), 0.5))
    # mean |w * g| = [7.5, .015, 1, 2, .16, .9, .0135, 3.25]; |w| would prune 7, 0, 3, 5
    assert torch.equal(expected, torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]]))
    assert int(state.importance_count) == 0  # statistics restart after a mask update


# --- patterns -----------------------------------------------------------------------------------


def pattern_layer(kind: str, in_features: int = 32) -> nn.Module:
    torch.manual_seed(1)
    return nn.Linear(in_features, 16) if kind == "linear" else nn.Conv2d(in_features // 2, 8, 3)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("block", [(1, 16), (4, 4)])
def test_block_pattern_prunes_whole_blocks(kind, block):
    layer = pattern_layer(kind)  # conv view is (8, 144): 1x16 and 4x4 both divide it
    scores = layer.weight.detach().abs().reshape(layer.weight.shape[0], -1).clone()
    prune(nn.Sequential(layer), sparsity=0.5, pattern=Block(shape=block))
    mask = mask_of(layer).reshape(scores.shape)
    br, bc = block
    blocks = mask.reshape(mask.shape[0] // br, br, -1, bc).permute(0, 2, 1, 3).flatten(2)
    assert bool((blocks.amin(-1) == blocks.amax(-1)).all())
    assert zeros(mask) == prune_count(mask.numel(), 0.5)  # whole blocks divide the target
    means = scores.reshape(mask.shape[0] // br, br, -1, bc).permute(0, 2, 1, 3).flatten(2).mean(-1)
    kept = blocks[..., 0] == 1
    assert float(means[~kept].max()) <= float(means[kept].min())
    assert bool((layer.weight.reshape(scores.shape)[mask == 0] == 0).all())


def test_block_pattern_with_ragged_edges_on_a_conv():
    torch.manual_seed(2)
    layer = nn.Conv2d(5, 6, 3)  # view (6, 45): 4x4 blocks leave a ragged row and column
    prune(nn.Sequential(layer), sparsity=0.5, pattern=Block(shape=(4, 4)))
    mask = mask_of(layer).reshape(6, 45)
    for r in range(0, 6, 4):
        for c in range(0, 45, 4):
            block = mask[r : r + 4, c : c + 4]
            assert bool((block == block[0, 0]).all())
    target = prune_count(270, 0.5)
    assert target - 16 < zeros(mask) <= target


def nm_groups(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Groups of m along in-channels at each kernel position (via an explicit permute)."""
    if weight.dim() == 4:
        weight = weight.permute(0, 2, 3, 1)
    return weight.reshape(-1, weight.shape[-1] // m, m)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_pattern_keeps_n_of_every_m_input_channels(kind, nm):
    n, m = nm
    layer = pattern_layer(kind)  # in channels 32 (linear) / 16 (conv)
    scores = layer.weight.detach().abs().clone()
    _, technique = prune(nn.Sequential(layer), pattern=NM(n=n, m=m))
    mask = mask_of(layer)
    kept = nm_groups(mask, m)
    assert bool((kept.sum(-1) == n).all())
    group_scores = nm_groups(scores, m)
    assert bool(
        (
            torch.where(kept == 0, group_scores, -1.0).amax(-1)
            <= torch.where(kept == 1, group_scores, 9.0).amin(-1)
        ).all()
    )
    assert technique.overall_sparsity() == (m - n) / m


def test_nm_pattern_tightens_gradually_with_a_schedule():
    layer = pattern_layer("linear")
    model = nn.Sequential(layer)
    schedule = PolynomialSchedule(final=0.5, begin=1, end=4, frequency=1, power=1.0)
    compressor, _ = prune(model, pattern=NM(n=2, m=4), schedule=schedule)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    per_group = []
    for step in range(1, 6):
        x = torch.randn(2, 32, generator=torch.Generator().manual_seed(step))
        model(x).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        compressor.step()
        pruned = 4 - nm_groups(mask_of(layer), 4).sum(-1)
        assert bool((pruned == pruned.flatten()[0]).all())
        per_group.append(int(pruned.flatten()[0]))
    # targets 0, 1/6, 1/3, 1/2, 1/2 -> round(s * 4) = 0, 1, 1, 2, 2 per group of 4
    expected = [min(2, math.floor(schedule.value(step) * 4 + 0.5)) for step in range(1, 6)]
    assert per_group == expected == [0, 1, 1, 2, 2]


def test_nm_pattern_skips_layers_with_indivisible_in_channels():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(16, 6), act=nn.ReLU(), fc2=nn.Linear(6, 3)))
    technique = MagnitudePruning(MagnitudePruningConfig(pattern=NM(n=2, m=4)))
    plan = technique.plan(model)
    assert plan.names == ["fc1"]
    assert plan.skipped == [("fc2", "6 input channels not divisible by m=4")]
    Compressor([technique]).apply(model)
    assert parametrize.is_parametrized(model.fc1, "weight")
    assert not parametrize.is_parametrized(model.fc2)
    assert ("fc2", "6 input channels not divisible by m=4") in technique.summary().skipped
    with pytest.raises(ConfigError, match="no module left"):
        MagnitudePruning(MagnitudePruningConfig(pattern=NM(n=2, m=4))).plan(
            nn.Sequential(nn.Linear(6, 3))
        )


# --- config errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        (dict(sparsity=-0.1), "sparsity"),
        (dict(sparsity=1.0), "sparsity"),
        (dict(sparsity=1.5), "sparsity"),
        (dict(sparsity=0.5, pattern={"kind": "block", "shape": [0, 4]}), "pattern"),
        (dict(sparsity=0.5, pattern={"kind": "block", "shape": [4, 0]}), "pattern"),
        (
            dict(schedule={"kind": "polynomial", "final": 0.5, "begin": 5, "end": 2}),
            "begin",
        ),
        (dict(schedule={"kind": "constant", "target": 0.5, "begin": 5, "end": 2}), "begin"),
        (
            dict(pattern=NM(n=2, m=4), schedule=PolynomialSchedule(final=0.8, end=10)),
            "target is 0.8",
        ),
        (dict(pattern=NM(n=2, m=4), sparsity=0.6), "2:4"),
        (dict(pattern=NM(n=2, m=4), ranking="global"), "N:M"),
        (dict(pattern=NM(n=2, m=4), sparsity=0.5, schedule=ConstantSchedule(target=0.5)), "one"),
        (dict(), "exactly one"),
        (dict(sparsity=0.5, schedule=ConstantSchedule(target=0.5)), "exactly one"),
        (dict(sparsity=0.5, sparsty=0.3), "sparsty"),
    ],
)
def test_invalid_configs_raise_config_error(config, needle):
    with pytest.raises(ConfigError, match=needle):
        MagnitudePruningConfig(**config)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Block(shape=(0, 4)),
        lambda: NM(n=4, m=4),
        lambda: PolynomialSchedule(final=0.5, begin=5, end=2),
        lambda: ConstantSchedule(target=1.0),
    ],
)
def test_invalid_pattern_and_schedule_objects_raise_config_error(build):
    with pytest.raises(ConfigError) as info:
        build()
    assert isinstance(info.value, ValueError)


# --- finalize / strip ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["finalize", "strip_pruning"])
def test_finalize_returns_plain_modules_with_the_zeros_baked_in(how):
    model = small_cnn()
    compressor, technique = prune(model, sparsity=0.6)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for i in range(3):
        train_step(model, optimizer, compressor, i)
    x, _ = cnn_batch(99)
    expected = model(x)
    masks = {n: mask_of(model.get_submodule(n)).clone() for n in ("conv", "fc")}
    assert all(
        float(original_of(model.get_submodule(n)).detach()[m == 0].abs().sum()) > 0
        for n, m in masks.items()
    )

    plain = compressor.finalize() if how == "finalize" else strip_pruning(model)

    assert plain is model
    assert type(plain.conv) is nn.Conv2d and type(plain.fc) is nn.Linear
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    assert set(plain.state_dict()) == set(small_cnn().state_dict())
    assert not any(
        "parametrizations" in k or "mask" in k or "importance" in k for k in plain.state_dict()
    )
    for name, mask in masks.items():
        weight = plain.get_submodule(name).weight
        assert type(weight) is nn.Parameter
        assert bool((weight[mask == 0] == 0).all())
        assert zeros(weight.detach()) == zeros(mask)
    assert torch.equal(plain(x), expected)
    if how == "finalize":
        assert technique.scalars() == {}
        assert [row[0] for row in technique.summary().rows] == ["conv", "fc"]
        assert technique.summary().totals["sparsity"] == pytest.approx(0.6, abs=0.01)


STRIPPED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch import nn
    from collections import OrderedDict

    torch.set_num_threads(1)  # same as the test process (tests/conftest.py)
    model = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 6, 3), act=nn.ReLU(), flat=nn.Flatten(), fc=nn.Linear(6 * 4 * 4, 5)
    ))
    model.load_state_dict(torch.load(sys.argv[1], weights_only=True))
    data = torch.load(sys.argv[2], weights_only=True)
    with torch.no_grad():
        out = model(data["x"])
    print(json.dumps({
        "slimkit_loaded": sorted(m for m in sys.modules if m.startswith("slimkit")),
        "equal": bool(torch.equal(out, data["expected"])),
        "max_diff": float((out - data["expected"]).abs().max()),
        "zeros": {n: int((model.get_submodule(n).weight == 0).sum()) for n in ("conv", "fc")},
    }))
    """
)


def test_stripped_model_loads_into_plain_torch_without_slimkit(tmp_path):
    model = small_cnn()
    compressor, _ = prune(model, sparsity=0.7)
    masks = {n: zeros(mask_of(model.get_submodule(n))) for n in ("conv", "fc")}
    plain = compressor.finalize()
    x, _ = cnn_batch(5)
    with torch.no_grad():
        expected = plain(x)
    torch.save(plain.state_dict(), tmp_path / "weights.pt")
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    result = run_python(STRIPPED_SCRIPT, "weights.pt", "io.pt", cwd=tmp_path)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["slimkit_loaded"] == []
    assert report["zeros"] == masks
    assert report["equal"], report["max_diff"]


# --- state survives -----------------------------------------------------------------------------


def test_state_dict_holds_the_masks_and_restores_them():
    model = small_cnn()
    prune(model, sparsity=0.5)
    state = model.state_dict()
    for name in ("conv", "fc"):
        assert torch.equal(
            state[f"{name}.parametrizations.weight.0.mask"], mask_of(model.get_submodule(name))
        )
        assert f"{name}.parametrizations.weight.original" in state
        assert f"{name}.bias" in state
    other = small_cnn(seed=7)
    prune(other, sparsity=0.5)  # different weights, so different masks until loaded
    assert not torch.equal(mask_of(other.fc), mask_of(model.fc))
    other.load_state_dict(state)
    assert torch.equal(mask_of(other.fc), mask_of(model.fc))
    x, _ = cnn_batch(0)
    assert torch.equal(other(x), model(x))


def test_to_float64_keeps_masks_applied_and_pruning_continues():
    model = small_cnn()
    schedule = PolynomialSchedule(final=0.8, begin=0, end=4, frequency=2, initial=0.4)
    compressor, _ = prune(model, schedule=schedule)
    before = mask_of(model.fc).clone()
    model.to(torch.float64)
    mask = mask_of(model.fc)
    assert mask.dtype == torch.float64 and original_of(model.fc).dtype == torch.float64
    assert torch.equal(mask, before.double())
    assert bool((model.fc.weight[mask == 0] == 0).all())
    x, _ = cnn_batch(0)
    x = x.double()
    hidden = F.relu(functional(model.conv, x, model.conv.weight, model.conv.bias)).flatten(1)
    ref = F.linear(hidden, original_of(model.fc) * mask, model.fc.bias)
    assert torch.equal(model(x), ref)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for i in range(4):
        x, y = cnn_batch(i)
        F.mse_loss(model(x.double()), y.double()).backward()
        optimizer.step()
        optimizer.zero_grad()
        compressor.step()
    mask = mask_of(model.fc)
    assert mask.dtype == torch.float64
    assert bool(((before == 0) <= (mask == 0)).all())
    assert zeros(mask) == prune_count(mask.numel(), 0.8)


def test_deepcopy_keeps_independent_masks():
    model = small_cnn()
    prune(model, sparsity=0.5)
    clone = copy.deepcopy(model)
    assert parametrize.is_parametrized(clone.fc, "weight")
    assert torch.equal(mask_of(clone.fc), mask_of(model.fc))
    assert mask_of(clone.fc).data_ptr() != mask_of(model.fc).data_ptr()
    x, _ = cnn_batch(0)
    assert torch.equal(clone(x), model(x))
    mask_of(clone.fc).fill_(1.0)
    assert zeros(mask_of(model.fc)) == prune_count(model.fc.weight.numel(), 0.5)


def test_torch_compile_matches_eager_and_keeps_pruned_weights_zero():
    torch._dynamo.reset()
    model = small_cnn()
    schedule = PolynomialSchedule(final=0.7, begin=1, end=5, frequency=2)
    compressor, technique = prune(model, schedule=schedule)
    compiled = torch.compile(model, backend="aot_eager")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for i in range(7):
        x, y = cnn_batch(i)
        out = compiled(x)
        with torch.no_grad():
            eager = model(x)
        assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6), i
        F.mse_loss(out, y).backward()
        for layer in (model.conv, model.fc):
            mask = mask_of(layer)
            assert bool((original_of(layer).grad[mask == 0] == 0).all())
        optimizer.step()
        optimizer.zero_grad()
        compressor.step()
        for layer in (model.conv, model.fc):
            assert bool((layer.weight[mask_of(layer) == 0] == 0).all())
    assert technique.overall_sparsity() == pytest.approx(0.7, abs=0.01)
    # the compiled model sees the latest masks (buffers are graph inputs, not constants)
    x, _ = cnn_batch(50)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


# --- DistributedDataParallel (gloo, 2 processes) ------------------------------------------------


def _ddp_worker(rank: int, world_size: int, rendezvous: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # a file rendezvous: no TCP port to pick, so no race with other processes for one
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        model = small_cnn(seed=0)
        schedule = PolynomialSchedule(final=0.75, begin=1, end=6, frequency=1)
        compressor, technique = prune(model, schedule=schedule)  # masks before wrapping
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        for i in range(8):
            x, y = cnn_batch(1000 * rank + i)  # each rank sees different data
            F.mse_loss(ddp(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            compressor.step()
        tensors = {}
        for name in ("conv", "fc"):
            layer = model.get_submodule(name)
            tensors[f"{name}.mask"] = mask_of(layer).detach().clone()
            tensors[f"{name}.original"] = original_of(layer).detach().clone()
            tensors[f"{name}.bias"] = layer.bias.detach().clone()
            assert bool((layer.weight[mask_of(layer) == 0] == 0).all())
        for key, tensor in tensors.items():
            gathered = [torch.empty_like(tensor) for _ in range(world_size)]
            dist.all_gather(gathered, tensor)
            assert all(torch.equal(gathered[0], g) for g in gathered[1:]), key
        if rank == 0:
            torch.save(
                {
                    "tensors": tensors,
                    "overall": technique.overall_sparsity(),
                    "steps": compressor.step_count,
                },
                Path(out_dir) / "ddp.pt",
            )
        del ddp  # release DDP's hold on the process group before teardown
        dist.barrier()  # tearing gloo down while the other rank still uses it aborts a process
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_keep_masks_and_weights_identical(tmp_path):
    rendezvous = str(tmp_path / "rendezvous")
    mp.spawn(_ddp_worker, args=(2, rendezvous, str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert result["steps"] == 8
    tensors = result["tensors"]
    for name in ("conv", "fc"):
        mask = tensors[f"{name}.mask"]
        assert zeros(mask) == prune_count(mask.numel(), 0.75)
    assert result["overall"] == pytest.approx(0.75, abs=0.01)


# --- resume in a new process --------------------------------------------------------------------

RESUME_COMMON = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    from slimkit import Compressor, MagnitudePruningConfig, PolynomialSchedule

    TOTAL_STEPS = 16


    def build(seed=0):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
        schedule = PolynomialSchedule(final=0.75, begin=2, end=12, frequency=2)
        compressor = Compressor([MagnitudePruningConfig(schedule=schedule)]).apply(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
        return model, compressor, optimizer


    def batch(i):
        gen = torch.Generator().manual_seed(i)
        return torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)


    def train(model, compressor, optimizer, start, stop):
        for i in range(start, stop):
            x, y = batch(i)
            F.mse_loss(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            compressor.step()


    def masks(model):
        return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".mask")}
    """
)

RESUME_SCRIPT = RESUME_COMMON + textwrap.dedent(
    """
    import sys

    torch.set_num_threads(1)  # same as the test process (tests/conftest.py)
    checkpoint = torch.load(sys.argv[1], weights_only=True)
    model, compressor, optimizer = build(seed=1)  # fresh weights, replaced by the checkpoint
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    compressor.load_state_dict(checkpoint["compressor"])
    train(model, compressor, optimizer, compressor.step_count, TOTAL_STEPS)
    torch.save(
        {"masks": masks(model), "model": model.state_dict(), "step": compressor.step_count},
        sys.argv[2],
    )
    """
)


def test_resume_in_a_new_process_gives_the_same_masks(tmp_path):
    ns: dict = {}
    exec(compile(RESUME_COMMON, "resume_common", "exec"), ns)
    k, total = 7, ns["TOTAL_STEPS"]

    model, compressor, optimizer = ns["build"]()
    ns["train"](model, compressor, optimizer, 0, total)
    reference = ns["masks"](model)
    reference_state = {k: v.clone() for k, v in model.state_dict().items()}

    model, compressor, optimizer = ns["build"]()
    ns["train"](model, compressor, optimizer, 0, k)
    partial = ns["masks"](model)
    torch.save(
        {
            "model": model.state_dict(),
            "compressor": compressor.state_dict(),
            "optimizer": optimizer.state_dict(),
        },
        tmp_path / "checkpoint.pt",
    )
    run_python(RESUME_SCRIPT, "checkpoint.pt", "final.pt", cwd=tmp_path)
    resumed = torch.load(tmp_path / "final.pt", weights_only=True)

    assert resumed["step"] == total
    assert (
        set(resumed["masks"])
        == set(reference)
        == {
            "0.parametrizations.weight.0.mask",
            "2.parametrizations.weight.0.mask",
        }
    )
    for key, mask in reference.items():
        assert zeros(partial[key]) < zeros(mask)  # the checkpoint was mid-schedule
        assert zeros(mask) == prune_count(mask.numel(), 0.75)
        assert torch.equal(resumed["masks"][key], mask), key
    assert set(resumed["model"]) == set(reference_state)
    for key, value in reference_state.items():
        assert torch.allclose(resumed["model"][key], value, rtol=1e-6, atol=1e-7), key


def test_lamp_global_ranking_spares_layers_with_small_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    with torch.no_grad():
        model[0].weight.mul_(0.01)  # raw magnitude would put almost all pruning here
    plain = MagnitudePruningConfig(sparsity=0.5, ranking="global", max_layer_sparsity=0.99)
    lamp = MagnitudePruningConfig(
        sparsity=0.5, ranking="global", importance="lamp", max_layer_sparsity=0.99
    )
    by_magnitude = Compressor([plain]).apply(copy.deepcopy(model)).techniques[0].layer_sparsity()
    by_lamp = Compressor([lamp]).apply(copy.deepcopy(model)).techniques[0].layer_sparsity()
    assert by_magnitude["0"] > 0.95
    assert abs(by_lamp["0"] - 0.5) < 0.1 and abs(by_lamp["1"] - 0.5) < 0.1

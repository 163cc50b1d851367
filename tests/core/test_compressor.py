"""The Compressor life cycle contract, with magnitude pruning as the real technique."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from slimkit.core.compressor import Compressor
from slimkit.core.schedules import ConstantSchedule
from slimkit.errors import ConfigError, StateError
from slimkit.prune import MagnitudePruning, MagnitudePruningConfig

GRADUAL = MagnitudePruningConfig(
    schedule={"kind": "polynomial", "final": 0.75, "begin": 0, "end": 6, "frequency": 2}
)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def train_steps(model: nn.Module, compressor: Compressor, steps: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=generator)
        loss = model(x).pow(2).mean() + compressor.loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        compressor.step()


def masks(model: nn.Module) -> list[torch.Tensor]:
    return [
        m.parametrizations.weight[0].mask.clone()
        for m in model.modules()
        if parametrize.is_parametrized(m, "weight")
    ]


def test_apply_twice_raises() -> None:
    compressor = Compressor([MagnitudePruningConfig(sparsity=0.5)])
    model = make_model()
    compressor.apply(model)
    with pytest.raises(StateError, match="already applied"):
        compressor.apply(model)
    with pytest.raises(StateError, match="already applied"):
        compressor.apply(make_model())


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.step(),
        lambda c: c.finalize(),
        lambda c: c.load_state_dict(c.state_dict()),
    ],
    ids=["step", "finalize", "load_state_dict"],
)
def test_calls_before_apply_raise(call) -> None:
    compressor = Compressor([MagnitudePruningConfig(sparsity=0.5)])
    with pytest.raises(StateError, match=r"apply\(model\)"):
        call(compressor)
    assert compressor.step_count == 0


@pytest.mark.parametrize(
    "call", [lambda c: c.step(), lambda c: c.finalize()], ids=["step", "finalize"]
)
def test_calls_after_finalize_raise(call) -> None:
    compressor = Compressor([GRADUAL]).apply(make_model())
    compressor.finalize()
    with pytest.raises(StateError, match="finalized"):
        call(compressor)


def test_load_state_dict_with_mismatched_techniques_raises() -> None:
    compressor = Compressor([MagnitudePruningConfig(sparsity=0.5)]).apply(make_model())
    state = compressor.state_dict()
    with pytest.raises(StateError, match=r"holds techniques \[\], this compressor has"):
        compressor.load_state_dict({**state, "techniques": []})
    other = [{**state["techniques"][0], "kind": "quantize"}]
    with pytest.raises(StateError, match="'quantize'"):
        compressor.load_state_dict({**state, "techniques": other})
    with pytest.raises(StateError, match="version 99"):
        compressor.load_state_dict({**state, "version": 99})


def test_state_dict_round_trip_resumes_exactly() -> None:
    model = make_model()
    compressor = Compressor([GRADUAL]).apply(model)
    train_steps(model, compressor, 3)
    state, model_state = compressor.state_dict(), model.state_dict()
    assert state["step_count"] == 3

    resumed_model = make_model(seed=5)
    resumed = Compressor([GRADUAL]).apply(resumed_model)
    resumed_model.load_state_dict(model_state)
    resumed.load_state_dict(state)
    assert resumed.step_count == 3
    assert resumed.state_dict() == state
    for a, b in zip(masks(resumed_model), masks(model), strict=True):
        assert torch.equal(a, b)

    train_steps(model, compressor, 4)
    train_steps(resumed_model, resumed, 4)
    assert resumed.step_count == compressor.step_count == 7
    for a, b in zip(masks(resumed_model), masks(model), strict=True):
        assert torch.equal(a, b)
    technique = compressor.techniques[0]
    assert isinstance(technique, MagnitudePruning)
    assert technique.overall_sparsity() == pytest.approx(0.75)


def test_loss_is_zero_with_only_pruning() -> None:
    compressor = Compressor([MagnitudePruningConfig(sparsity=0.5)])
    assert compressor.loss() == 0.0
    compressor.apply(make_model())
    loss = compressor.loss(torch.ones(2, 4), (torch.ones(2, 16), torch.zeros(2)))
    assert isinstance(loss, float) and loss == 0.0


def test_one_shot_pruning_acts_at_apply_and_finalize_returns_a_plain_model() -> None:
    model = make_model()
    compressor = Compressor([MagnitudePruningConfig(sparsity=0.5)]).apply(model)
    assert compressor.updated == compressor.techniques
    assert [type(t) for t in compressor.techniques] == [MagnitudePruning]
    plain = compressor.finalize()
    assert plain is model and compressor.finalized
    linears = [m for m in plain.modules() if isinstance(m, nn.Linear)]
    assert not any(parametrize.is_parametrized(m) for m in linears)
    for layer in linears:
        assert float((layer.weight == 0).float().mean()) == pytest.approx(0.5)
        assert bool((layer.bias != 0).all()), "biases are never pruned"
    summary = compressor.summaries()[0].to_dict()
    assert summary["totals"]["sparsity"] == pytest.approx(0.5)
    assert [row["module"] for row in summary["layers"]] == ["0", "2"]


def test_unknown_technique_config_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"unknown technique kind 'constant'.*magnitude_prune"):
        Compressor([ConstantSchedule(target=0.5)])


def test_data_hooks_reach_the_techniques_that_need_data() -> None:
    from slimkit.quant import QATConfig, StaticQuantizationConfig

    batches = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    static = Compressor([MagnitudePruningConfig(sparsity=0.5)])
    model = make_model()
    static.apply(model)
    assert static.before_training(batches) == [] and static.after_training(batches) == []

    calibrated = Compressor([StaticQuantizationConfig()]).apply(make_model())
    assert calibrated.before_training(batches) == []
    assert not calibrated.techniques[0].calibrated
    assert calibrated.after_training(batches) == ["static_quant"]
    assert calibrated.techniques[0].calibrated
    # the input range comes from exactly these batches
    [quantizer] = [q for k, q in calibrated.model.activation_quantizers.items() if "input" in k]
    low = min(float(b.min()) for b in batches)
    assert float(-quantizer.zero_point * quantizer.scale) == pytest.approx(low, rel=1e-2)

    qat = Compressor([QATConfig()]).apply(make_model())
    assert qat.before_training(batches) == ["qat"]
    assert qat.techniques[0].initialized
    assert qat.after_training(batches) == []


def test_data_hooks_need_an_applied_compressor() -> None:
    with pytest.raises(StateError, match=r"apply\(model\)"):
        Compressor([MagnitudePruningConfig(sparsity=0.5)]).after_training([])

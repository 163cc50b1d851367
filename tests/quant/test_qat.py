"""QAT: config, placement, accuracy on digits, pruning masks, BatchNorm freezing, state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from slimkit.core.compressor import Compressor
from slimkit.core.technique import make_technique
from slimkit.errors import ConfigError, StateError
from slimkit.models.cnn import DigitsResNet
from slimkit.prune.magnitude import (
    MagnitudePruning,
    MagnitudePruningConfig,
    WeightMask,
    weight_mask_of,
)
from slimkit.quant.lsq import LSQQuantizer
from slimkit.quant.qat import (
    QATConfig,
    QuantizationAwareTraining,
    input_quantizer_of,
    lsq_weight_quantizer_of,
)
from slimkit.tasks.data import evaluate_accuracy, load_digits_split, predict_logits, train_epoch

LR = 1e-4


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(seed=0).loaders(batch_size=64, seed=0)


def fresh_train_loader():
    """The training loader with a freshly seeded shuffle, so results do not depend on test order."""
    return load_digits_split(seed=0).loaders(batch_size=64, seed=0).train


@pytest.fixture(scope="module")
def fp32(digits) -> tuple[nn.Module, float]:
    """DigitsResNet trained 3 epochs (seed 0) and its test accuracy."""
    torch.manual_seed(0)
    model = DigitsResNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = fresh_train_loader()
    for _ in range(3):
        train_epoch(model, loader, optimizer)
    return model.eval(), evaluate_accuracy(model, digits.test)


def prepared(model: nn.Module, digits, **options) -> tuple[nn.Module, QuantizationAwareTraining]:
    """A copy of ``model`` with QAT applied and initialized on 4 training batches."""
    model = copy.deepcopy(model)
    technique = QuantizationAwareTraining(QATConfig(**options))
    technique.apply(model)
    technique.initialize(model, fresh_train_loader(), num_batches=4)
    return model, technique


def train(model: nn.Module, technique: QuantizationAwareTraining, epochs: int = 1) -> None:
    torch.manual_seed(0)
    loader = fresh_train_loader()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    for _ in range(epochs):
        train_epoch(
            model,
            loader,
            optimizer,
            on_step=lambda: technique.step(technique.current_step + 1),
        )


# --- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["wbits", "abits"])
@pytest.mark.parametrize("bits", [1, 9])
def test_bits_outside_2_to_8_are_rejected(field: str, bits: int) -> None:
    with pytest.raises(ConfigError, match=field):
        QATConfig(**{field: bits})


def test_config_round_trip_and_registry() -> None:
    config = QATConfig(wbits=4, abits=6, method="lsq_plus", init="lsq", freeze_bn_after=10)
    assert QATConfig.from_dict(config.to_dict()) == config
    assert isinstance(make_technique(config), QuantizationAwareTraining)
    with pytest.raises(ConfigError, match="method"):
        QATConfig(method="dorefa")
    with pytest.raises(ConfigError, match="unknown field"):
        QATConfig(bits=4)


# --- placement and life cycle ---------------------------------------------------------------
def test_apply_places_weight_and_input_quantizers() -> None:
    model = DigitsResNet(width=4)
    technique = QuantizationAwareTraining(QATConfig(wbits=4, method="lsq_plus"))
    technique.apply(model)
    technique.apply(model)  # idempotent
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(technique.quantizers()) == len(layers)
    for module in layers:
        wq, aq = lsq_weight_quantizer_of(module), input_quantizer_of(module)
        assert wq.spec.signed and wq.spec.symmetric and wq.axis == 0
        assert wq.scale.shape == (module.weight.shape[0],) and bool(wq.initialized)
        assert not aq.spec.signed and isinstance(aq.zero_point, nn.Parameter)
    with pytest.raises(StateError, match="another model"):
        technique.apply(DigitsResNet(width=4))
    technique.initialize(model, [torch.rand(8, 1, 8, 8)])
    summary = technique.summary().to_dict()
    assert len(summary["layers"]) == len(layers) and summary["totals"]["method"] == "lsq_plus"
    scale, zero_point = technique.activation_qparams()["conv1"]
    assert scale.shape == () and zero_point.dtype == torch.int32


def test_uninitialized_inputs_init_lazily_and_initialize_validates() -> None:
    model = DigitsResNet(width=4)
    technique = QuantizationAwareTraining(QATConfig(init="lsq"))
    technique.apply(model)
    model(torch.rand(8, 1, 8, 8))
    assert all(bool(a.initialized) for _, a in technique.quantizers().values())
    with pytest.raises(ConfigError, match="num_batches"):
        technique.initialize(model, [torch.rand(2, 1, 8, 8)], num_batches=0)
    with pytest.raises(ConfigError, match="no batches"):
        technique.initialize(model, [])
    with pytest.raises(StateError, match="applied to"):
        technique.initialize(DigitsResNet(width=4), [torch.rand(2, 1, 8, 8)])


def test_scales_receive_gradients_and_change(digits) -> None:
    torch.manual_seed(0)
    model, technique = prepared(DigitsResNet(width=4), digits, method="lsq_plus")
    before = {
        n: (w.scale.detach().clone(), a.scale.detach().clone())
        for n, (w, a) in technique.quantizers().items()
    }
    inputs, targets = next(iter(digits.train))
    nn.functional.cross_entropy(model(inputs), targets).backward()
    for name, (wq, aq) in technique.quantizers().items():
        assert wq.scale.grad is not None and wq.scale.grad.abs().sum() > 0, name
        assert aq.scale.grad is not None and aq.scale.grad.abs().sum() > 0, name
        assert aq.zero_point.grad is not None, name
    train(model, technique)
    for name, (wq, aq) in technique.quantizers().items():
        assert not torch.equal(wq.scale.detach(), before[name][0]), name
        assert not torch.equal(aq.scale.detach(), before[name][1]), name


def test_ste_method_keeps_scales_fixed(digits) -> None:
    torch.manual_seed(0)
    model, technique = prepared(DigitsResNet(width=4), digits, method="ste")
    before = [w.scale.detach().clone() for w, _ in technique.quantizers().values()]
    train(model, technique)
    after = [w.scale.detach() for w, _ in technique.quantizers().values()]
    assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert all(not w.scale.requires_grad for w, _ in technique.quantizers().values())


def test_freeze_bn_after_stops_running_statistics(digits) -> None:
    torch.manual_seed(0)
    model, technique = prepared(DigitsResNet(width=4), digits, freeze_bn_after=3)
    assert technique.step(2) is False and not technique.batchnorm_frozen
    assert technique.step(3) is True and technique.batchnorm_frozen
    assert technique.step(4) is False
    frozen = model.bn1.running_mean.clone()
    train(model, technique)
    assert torch.equal(model.bn1.running_mean, frozen)
    technique.finalize(model)
    assert model.bn1.momentum == 0.1


def test_state_dict_round_trip(digits) -> None:
    torch.manual_seed(0)
    model, technique = prepared(DigitsResNet(width=4), digits, method="lsq_plus", wbits=4)
    train(model, technique)
    torch.manual_seed(1)
    fresh = DigitsResNet(width=4)
    other = QuantizationAwareTraining(technique.config)
    other.apply(fresh)
    fresh.load_state_dict(model.state_dict())
    other.load_state_dict(technique.state_dict())
    keys = [k for k in model.state_dict() if "quantizer" in k or "parametrizations" in k]
    assert any(k.endswith("input_quantizer.zero_point") for k in keys)
    assert any(k.endswith("weight.0.scale") for k in keys)
    inputs = torch.rand(16, 1, 8, 8)
    assert torch.equal(model.eval()(inputs), fresh.eval()(inputs))
    assert other.initialized and other.current_step == technique.current_step


def test_finalize_returns_plain_modules_with_quantized_weights(digits) -> None:
    torch.manual_seed(0)
    model, technique = prepared(DigitsResNet(width=4), digits, wbits=4)
    scales = {n: w.scale.detach().abs().clone() for n, (w, _) in technique.quantizers().items()}
    expected = model.conv1.weight.detach().clone()
    plain = technique.finalize(model)
    assert torch.equal(plain.conv1.weight, expected)
    for name, module in plain.named_modules():
        assert not parametrize.is_parametrized(module), name
        assert input_quantizer_of(module) is None, name
        assert not module._forward_pre_hooks, name
        if name in scales:
            codes = module.weight / scales[name].reshape(-1, *[1] * (module.weight.dim() - 1))
            assert torch.allclose(codes, codes.round(), atol=1e-4), name
            assert codes.abs().max() <= 7 + 1e-4, name
    assert type(plain.conv1) is nn.Conv2d


# --- accuracy on digits ---------------------------------------------------------------------
def test_w8a8_lsq_stays_within_one_point_of_fp32(fp32, digits) -> None:
    model, fp_accuracy = fp32
    qat, technique = prepared(model, digits, wbits=8, abits=8)
    train(qat, technique)
    accuracy = evaluate_accuracy(qat, digits.test)
    print(f"fp32 {fp_accuracy:.4f}  W8A8 LSQ 1 epoch {accuracy:.4f}")
    assert accuracy >= fp_accuracy - 0.01


def _test_loss(model: nn.Module, digits) -> float:
    labels = torch.cat([y for _, y in digits.test])
    return float(nn.functional.cross_entropy(predict_logits(model, digits.test), labels))


@pytest.mark.parametrize("wbits", [4, 2])
def test_low_bit_lsq_recovers_above_ptq(fp32, digits, wbits: int) -> None:
    model, fp_accuracy = fp32
    qat, technique = prepared(model, digits, wbits=wbits, abits=8)
    ptq = evaluate_accuracy(qat, digits.test), _test_loss(qat, digits)  # min/max, no training
    train(qat, technique)
    lsq = evaluate_accuracy(qat, digits.test), _test_loss(qat, digits)
    print(
        f"fp32 {fp_accuracy:.4f}  W{wbits}A8 PTQ {ptq[0]:.4f} (loss {ptq[1]:.3f})  "
        f"W{wbits}A8 LSQ 1 epoch {lsq[0]:.4f} (loss {lsq[1]:.3f})"
    )
    assert lsq[0] > ptq[0] and lsq[1] < ptq[1]
    if wbits == 4:
        assert lsq[0] >= fp_accuracy - 0.01


# --- composition with pruning ---------------------------------------------------------------
def test_pruned_weights_stay_exactly_zero_through_qat_and_finalize(fp32, digits) -> None:
    model = copy.deepcopy(fp32[0])
    compressor = Compressor(
        [MagnitudePruningConfig(sparsity=0.5), QATConfig(wbits=4, abits=8)]
    ).apply(model)
    pruning, technique = compressor.techniques
    assert isinstance(pruning, MagnitudePruning)
    technique.initialize(model, fresh_train_loader(), num_batches=2)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    masks = {}
    for name, module in layers:
        chain = list(module.parametrizations.weight)
        assert isinstance(chain[0], WeightMask) and isinstance(chain[1], LSQQuantizer), name
        masks[name] = weight_mask_of(module).mask.clone()
        assert 0.45 < float((masks[name] == 0).float().mean()) < 0.55, name
        assert torch.equal(
            module.weight[masks[name] == 0], torch.zeros(int((masks[name] == 0).sum()))
        )

    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    train_epoch(model, fresh_train_loader(), optimizer, on_step=compressor.step)
    for name, module in layers:
        assert torch.equal(weight_mask_of(module).mask, masks[name]), name
        assert bool((module.weight[masks[name] == 0] == 0).all()), name

    technique.finalize(model)  # the pruning mask stays until its own technique finalizes
    for name, module in layers:
        assert lsq_weight_quantizer_of(module) is None and weight_mask_of(module) is not None
        assert bool((module.weight[masks[name] == 0] == 0).all()), name
    pruning.finalize(model)
    accuracy = evaluate_accuracy(model, digits.test)
    print(f"50% pruned + W4 QAT (float activations after finalize): {accuracy:.4f}")
    for name, module in layers:
        assert not parametrize.is_parametrized(module), name
        assert bool((module.weight[masks[name] == 0] == 0).all()), name


class _Half(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / 2


def test_finalize_leaves_other_parametrizations_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    parametrize.register_parametrization(model[0], "bias", _Half())
    technique = QuantizationAwareTraining(QATConfig(wbits=3))
    technique.apply(model)
    expected = model[0].weight.detach().clone()
    technique.finalize(model)
    assert torch.equal(model[0].weight, expected)
    assert not parametrize.is_parametrized(model[0], "weight")
    assert parametrize.is_parametrized(model[0], "bias")


def test_loading_a_state_after_a_lazy_first_forward_keeps_the_loaded_qparams() -> None:
    """The input quantizers cache their ``initialized`` flag: a model that already ran (and so
    lazily initialized itself) must, after ``load_state_dict``, compute with the loaded qparams
    and not initialize again; loading an uninitialized state makes them initialize again."""
    torch.manual_seed(0)
    source = DigitsResNet(width=4)
    source_qat = QuantizationAwareTraining(QATConfig(init="lsq"))
    source_qat.apply(source)
    source(torch.rand(8, 1, 8, 8) * 3)  # lazy init from this batch
    untouched = copy.deepcopy(source.state_dict())  # before any input quantizer runs again

    target = DigitsResNet(width=4)
    target_qat = QuantizationAwareTraining(QATConfig(init="lsq"))
    target_qat.apply(target)
    blank = copy.deepcopy(target.state_dict())  # input quantizers not initialized
    target(torch.rand(8, 1, 8, 8) * 0.1)  # its own lazy init, from other data
    target.load_state_dict(untouched)
    inputs = torch.rand(16, 1, 8, 8)
    assert torch.equal(source.eval()(inputs), target.eval()(inputs))
    for name, (_, quantizer) in target_qat.quantizers().items():
        assert torch.equal(quantizer.scale, source_qat.quantizers()[name][1].scale), name

    target.load_state_dict(blank)
    assert not any(q.is_initialized() for _, q in target_qat.quantizers().values())
    target.train()(inputs)
    assert all(q.is_initialized() for _, q in target_qat.quantizers().values())

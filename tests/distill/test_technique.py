"""The ``distill`` technique on tiny ResNets: wiring by name, adapters, frozen teacher."""

from __future__ import annotations

import copy
import io
import json
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from slimkit.core.compressor import Compressor
from slimkit.core.technique import TECHNIQUES, make_technique
from slimkit.distill import (
    Distillation,
    DistillationConfig,
    FeaturePairConfig,
    FSPPairConfig,
    SoftLabelConfig,
    frozen_copy,
    load_teacher,
)
from slimkit.errors import CheckpointError, ConfigError, ScopeError, StateError
from slimkit.models.cnn import DigitsResNet


def forward(model: nn.Module, batch) -> torch.Tensor:
    return model(batch[0])


def make_batch(seed: int = 0, n: int = 8):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=generator), torch.randint(0, 10, (n,))


@pytest.fixture
def teacher() -> nn.Module:
    torch.manual_seed(0)
    return DigitsResNet(width=16)


@pytest.fixture
def student() -> nn.Module:
    torch.manual_seed(1)
    return DigitsResNet(width=8)


HINT = DistillationConfig(
    soft_label=SoftLabelConfig(temperature=2.0),
    pairs=[FeaturePairConfig(student="layer2", teacher="layer2", loss="hint")],
)


def applied(config, teacher, student, *, example=True) -> Distillation:
    kd = Distillation(config).bind(teacher, forward)
    if example:
        kd.example_inputs = (torch.zeros(1, 1, 8, 8),)
    kd.apply(student)
    return kd


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# --- adapters and wiring --------------------------------------------------------------------------


def test_hint_between_different_widths_builds_a_1x1_conv_adapter_at_apply(teacher, student):
    student.train()
    stats = copy.deepcopy(student.state_dict())
    kd = applied(HINT, teacher, student)
    assert student.training  # the dry run ran in eval mode and restored the mode...
    for key, value in student.state_dict().items():  # ...so BatchNorm statistics did not move
        assert torch.equal(value, stats[key]), key
    assert kd.last_losses() == {}  # dry-run values are not reported
    adapter = kd.adapters["pair0"]
    assert isinstance(adapter.proj, nn.Conv2d)  # student layer2: 16 channels, teacher: 32
    assert adapter.proj.weight.shape == (32, 16, 1, 1)
    assert [p.shape for p in kd.parameters()] == [(32, 16, 1, 1)]
    assert isinstance(kd.adapters, nn.ModuleDict)
    assert kd.plan(student).names == ["layer2"]


def test_every_loss_kind_and_fsp_on_different_widths(teacher, student):
    config = DistillationConfig(
        soft_label=SoftLabelConfig(loss="cross_entropy", temperature=3.0, weight=0.5),
        pairs=[
            FeaturePairConfig(student="layer3", teacher="layer2", loss="attention"),
            FeaturePairConfig(student="avgpool", teacher="avgpool", loss="cosine", weight=2.0),
        ],
        fsp=[FSPPairConfig(student=("conv1", "layer1"), teacher=("conv1", "layer1"))],
    )
    kd = applied(config, teacher, student)
    assert sorted(kd.adapters) == ["fsp0_0", "fsp0_1", "pair1"]
    assert kd.adapters["fsp0_0"].proj.weight.shape == (16, 8, 1, 1)
    x, y = make_batch()
    value = kd.loss(forward(student, (x, y)), (x, y))
    assert value.dim() == 0 and torch.isfinite(value)
    last = kd.last_losses()
    assert set(last) == {term.key for term in kd.terms} | {"total"}
    expected = sum(t.weight * last[t.key] for t in kd.terms)
    assert last["total"] == pytest.approx(expected, rel=1e-5)
    assert kd.scalars() == pytest.approx(last)
    rows = kd.summary().to_dict()["layers"]
    assert [r["term"] for r in rows] == [t.key for t in kd.terms]
    assert rows[1]["student"] == "layer3" and rows[1]["teacher"] == "layer2"


def test_without_example_inputs_adapters_appear_at_the_first_batch(teacher, student):
    kd = applied(HINT, teacher, student, example=False)
    assert len(kd.adapters) == 0
    assert list(kd.parameters()) == []
    x, y = make_batch()
    with pytest.warns(RuntimeWarning, match="not in the optimizer"):
        kd.loss(forward(student, (x, y)), (x, y))
    assert kd.adapters["pair0"].proj.weight.shape == (32, 16, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kd.loss(forward(student, (x, y)), (x, y))  # no second warning


def test_loss_decreases_when_training_on_the_kd_loss_alone(teacher, student):
    kd = applied(HINT, teacher, student)
    optimizer = torch.optim.Adam([*student.parameters(), *kd.parameters()], lr=1e-2)
    adapter_before = kd.adapters["pair0"].proj.weight.detach().clone()
    batch = make_batch(0, 16)
    student.train()
    losses = []
    for _ in range(15):
        loss = kd.loss(forward(student, batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.equal(kd.adapters["pair0"].proj.weight, adapter_before)  # adapters train


def test_teacher_is_frozen_in_eval_mode_and_never_changes(teacher, student):
    snapshot = copy.deepcopy(teacher.state_dict())
    kd = applied(HINT, teacher, student)
    optimizer = torch.optim.SGD([*student.parameters(), *kd.parameters()], lr=0.1)
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()  # someone flips it: loss() puts it back in eval mode (BN stats untouched)
    for seed in range(3):
        batch = make_batch(seed)
        loss = kd.loss(forward(student, batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not teacher.training
    assert all(p.grad is None for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, snapshot[key]), key


def test_self_distillation_starts_at_zero(student):
    config = DistillationConfig(
        soft_label=SoftLabelConfig(temperature=4.0),
        pairs=[FeaturePairConfig(student="layer2", teacher="layer2")],
    )
    kd = applied(config, frozen_copy(student), student)
    assert not kd.adapters["pair0"].trainable  # equal widths: identity
    student.eval()  # same BatchNorm mode as the teacher: identical outputs
    batch = make_batch()
    kd.loss(forward(student, batch), batch)
    last = kd.last_losses()
    assert last["soft_label/kl"] == pytest.approx(0.0, abs=1e-6)
    assert last["hint/layer2:layer2"] == pytest.approx(0.0, abs=1e-10)


def test_finalize_leaves_no_hooks_and_no_adapters(teacher, student):
    x, _ = make_batch()
    student.eval()
    with torch.no_grad():
        before = student(x)
    kd = applied(HINT, teacher, student)
    assert hook_count(student) == 1 and hook_count(teacher) == 1
    out = kd.finalize(student)
    assert out is student
    assert hook_count(student) == 0 and hook_count(teacher) == 0
    assert len(kd.adapters) == 0 and list(kd.parameters()) == [] and kd.teacher is None
    with torch.no_grad():
        torch.testing.assert_close(student(x), before, rtol=0, atol=0)
    assert kd.scalars() == {}
    assert kd.summary().totals["adapter_params"] == 32 * 16
    assert kd.finalize(student) is student  # idempotent
    with pytest.raises(StateError, match="finalized"):
        kd.loss(student(x), (x,))


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_unknown_layer_name_is_a_one_line_scope_error(teacher, student, side):
    names = {"student": "layer2", "teacher": "layer2"}
    names[side] = "layer_2"
    config = DistillationConfig(pairs=[FeaturePairConfig(**names)])
    kd = Distillation(config).bind(teacher, forward)
    with pytest.raises(ScopeError) as info:
        kd.apply(student)
    message = str(info.value)
    assert "\n" not in message
    assert f"the {side} has no module 'layer_2'" in message and "closest names: layer2" in message
    assert hook_count(student) == 0 and hook_count(teacher) == 0


def test_shape_errors_surface_at_apply_naming_the_term(teacher, student):
    config = DistillationConfig(
        pairs=[FeaturePairConfig(student="layer2", teacher="fc", loss="hint")]
    )
    kd = Distillation(config, teacher=teacher, forward=forward)
    with pytest.raises(ConfigError, match=r"distill: adapter pair0: .*different ranks") as info:
        kd.apply(student, example_inputs=(torch.zeros(1, 1, 8, 8),))
    assert "\n" not in str(info.value)
    assert hook_count(student) == 0 and hook_count(teacher) == 0 and kd.selection is None


def test_a_module_the_forward_never_runs_is_reported_at_apply(teacher, student):
    student.unused = nn.Linear(2, 2)
    config = DistillationConfig(pairs=[FeaturePairConfig(student="unused", teacher="fc")])
    kd = Distillation(config).bind(teacher, forward)
    with pytest.raises(StateError, match=r"student module\(s\) unused; not run by the model"):
        kd.apply(student, example_inputs=torch.zeros(1, 1, 8, 8))
    assert hook_count(student) == 0


def test_misuse_is_reported(teacher, student):
    with pytest.raises(StateError, match="bind"):
        Distillation(HINT).apply(student)
    with pytest.raises(ConfigError, match="frozen copy"):
        Distillation(HINT).bind(student, forward).apply(student)
    kd = applied(HINT, teacher, student)
    with pytest.raises(StateError, match="before apply"):
        kd.bind(teacher, forward)
    x, _ = make_batch()
    with pytest.raises(StateError, match="no output captured from student module"):
        kd.loss(None, (x,))


# --- config ---------------------------------------------------------------------------------------


def test_config_round_trip_and_registration():
    config = DistillationConfig(
        teacher="runs/teacher.safetensors",
        soft_label=SoftLabelConfig(loss="cross_entropy", temperature=2.5, weight=0.3),
        pairs=[FeaturePairConfig(student="a.b", teacher="c", loss="cosine", weight=2.0)],
        fsp=[FSPPairConfig(student=("a", "b"), teacher=("c", "d"), weight=0.1)],
        task_weight=0.7,
    )
    assert DistillationConfig.from_dict(config.model_dump()) == config
    assert DistillationConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert DistillationConfig().soft_label == SoftLabelConfig()
    assert TECHNIQUES["distill"] is Distillation
    assert isinstance(make_technique(config), Distillation)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"soft_label": None}, "nothing to distill"),
        ({"pairs": [{"student": "a", "teacher": "b", "loss": "l1"}]}, "pairs.0.loss"),
        ({"pairs": [{"student": "a", "teacher": "b"}] * 2}, "terms given twice: hint/a:b"),
        ({"fsp": [{"student": ["a"], "teacher": ["c", "d"]}]}, "fsp.0.student"),
        ({"soft_label": {"temperature": 0}}, "soft_label.temperature"),
        ({"teacher": " "}, "teacher must be"),
        ({"tau": 3}, "tau: unknown field"),
    ],
)
def test_bad_configs_are_one_line_errors(data, match):
    with pytest.raises(ConfigError, match=match) as info:
        DistillationConfig.from_dict(data)
    assert "\n" not in str(info.value)


# --- state and the Compressor ---------------------------------------------------------------------


def test_state_dict_round_trip_rebuilds_lazy_adapters(teacher, student):
    kd = applied(HINT, teacher, student)
    with torch.no_grad():
        kd.adapters["pair0"].proj.weight.mul_(3.0)
    buffer = io.BytesIO()
    torch.save(kd.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    fresh_student = copy.deepcopy(student)
    other = applied(HINT, copy.deepcopy(teacher), fresh_student, example=False)
    assert len(other.adapters) == 0
    other.load_state_dict(state)
    torch.testing.assert_close(
        other.adapters["pair0"].proj.weight, kd.adapters["pair0"].proj.weight
    )
    bad = dict(state, adapter_shapes={"pair0": {"student": [1, 16, 4, 4], "teacher": [1, 8, 4, 4]}})
    with pytest.raises(StateError, match="saved adapter pair0"):
        other.load_state_dict(bad)


def test_compressor_end_to_end(teacher, student):
    config = DistillationConfig(
        soft_label=SoftLabelConfig(temperature=4.0, weight=0.9),
        pairs=[FeaturePairConfig(student="layer3", teacher="layer3", loss="attention")],
        task_weight=0.1,
    )
    compressor = Compressor([config])
    kd = compressor.techniques[0]
    assert isinstance(kd, Distillation)
    kd.bind(teacher, forward)
    kd.example_inputs = (torch.zeros(1, 1, 8, 8),)
    compressor.apply(student)
    optimizer = torch.optim.Adam([*student.parameters(), *kd.parameters()], lr=1e-3)
    student.train()
    for seed in range(3):
        batch = make_batch(seed)
        outputs = forward(student, batch)
        task = F.cross_entropy(outputs, batch[1])
        loss = kd.config.task_weight * task + compressor.loss(outputs, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        compressor.step()
    state = compressor.state_dict()
    assert state["techniques"][0]["kind"] == "distill"
    summary = compressor.summaries()[0].to_dict()
    assert summary["totals"]["task_weight"] == 0.1
    assert {r["term"] for r in summary["layers"]} == {
        "soft_label/kl",
        "attention/layer3:layer3",
    }
    plain = compressor.finalize()
    assert plain is student and hook_count(plain) == 0


def test_load_teacher_from_a_checkpoint(tmp_path, teacher):
    path = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), path)
    torch.manual_seed(5)
    loaded = load_teacher(DigitsResNet(width=16), path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    with pytest.raises(CheckpointError, match="does not fit DigitsResNet"):
        load_teacher(DigitsResNet(width=8), path)
    with pytest.raises(CheckpointError, match="not found"):
        load_teacher(DigitsResNet(width=16), tmp_path / "missing.pt")


class _Output:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class _Encoder(nn.Module):
    """Returns ``(hidden, extra)`` from its ``block`` and an object with ``.logits``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.block = nn.LSTM(width, width, batch_first=True)  # returns a tuple
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> _Output:
        hidden, _ = self.block(self.embed(x))
        return _Output(self.head(hidden[:, -1]))


def test_tuple_outputs_logits_objects_and_tensor_batches():
    torch.manual_seed(0)
    teacher, student = _Encoder(12), _Encoder(6)
    config = DistillationConfig(
        pairs=[FeaturePairConfig(student="block", teacher="block", loss="cosine")]
    )
    kd = Distillation(config, teacher=teacher)  # default forward: model(batch) for a tensor
    kd.apply(student, example_inputs=torch.zeros(1, 5, 4))
    assert isinstance(kd.adapters["pair0"].proj, nn.Linear)
    x = torch.randn(2, 5, 4)
    value = kd.loss(student(x), x)
    assert value.requires_grad and set(kd.last_losses()) == {
        "soft_label/kl",
        "cosine/block:block",
        "total",
    }


def test_logits_are_found_in_tensors_tuples_mappings_and_model_outputs():
    from types import SimpleNamespace

    from slimkit.distill.technique import _logits

    logits = torch.randn(2, 3)
    for outputs in (
        logits,
        (logits, None),
        {"loss": 0.0, "logits": logits},
        SimpleNamespace(logits=logits),
    ):
        assert _logits(outputs, "student") is logits
    with pytest.raises(ConfigError, match="soft labels need the teacher's logits"):
        _logits({"loss": 0.0}, "teacher")


def test_an_adapter_follows_its_student_layer_through_iterative_structured_pruning(teacher):
    """Iterative structured pruning narrows the hinted student layer mid-training: the adapter
    (identity while the widths matched) is rebuilt as a projection for the new width, with a
    warning, and ``parameters_replaced`` asks the loop to rebuild its optimizer."""
    from slimkit.prune.structured import StructuredPruningConfig

    student = copy.deepcopy(teacher)
    schedule = {"kind": "polynomial", "initial": 0.0, "final": 0.5, "begin": 0, "end": 1}
    prune = StructuredPruningConfig(schedule={**schedule, "frequency": 1}, round_to=1)
    kd = Distillation(HINT).bind(frozen_copy(teacher), forward)
    compressor = Compressor([prune, kd], example_inputs=(torch.zeros(1, 1, 8, 8),))
    compressor.apply(student)
    assert list(kd.parameters()) == []  # equal widths: an identity adapter
    optimizer = torch.optim.SGD([*student.parameters(), *compressor.parameters()], lr=0.01)

    def train_step(seed: int) -> None:
        batch = make_batch(seed)
        loss = F.cross_entropy(forward(student, batch), batch[1])
        loss = loss + compressor.loss(forward(student, batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        compressor.step()

    train_step(0)  # the schedule reaches 0.5: layer2 loses channels at this step
    assert compressor.parameters_replaced  # (structured pruning sliced layers)
    narrowed = student.layer2[-1].conv2.out_channels
    assert narrowed < teacher.layer2[-1].conv2.out_channels
    optimizer = torch.optim.SGD([*student.parameters(), *compressor.parameters()], lr=0.01)

    with pytest.warns(UserWarning, match=r"hint/layer2:layer2: the student feature changed"):
        train_step(1)
    adapter = kd.adapters["pair0"]
    weights = [p for p in kd.parameters()]
    assert [tuple(w.shape[:2]) for w in weights] == [(32, narrowed)]  # 1x1 conv to 32 channels
    assert kd.parameters_replaced and compressor.parameters_replaced
    optimizer = torch.optim.SGD([*student.parameters(), *compressor.parameters()], lr=0.01)
    before = weights[0].detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no further rebuild, no warning
        train_step(2)
    assert not kd.parameters_replaced
    assert kd.adapters["pair0"] is adapter
    assert not torch.equal(weights[0].detach(), before)  # the new adapter trains

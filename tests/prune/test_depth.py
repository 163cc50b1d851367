"""drop_layers: a kept-layer student equals a natively built shallower model, HF bookkeeping,
plan, idempotence, resume (rebuild + state), recipes, and one-line errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimkit.core.technique import make_technique
from slimkit.errors import ConfigError, ScopeError, StateError
from slimkit.models.sentence import sentence_encoder_tiny
from slimkit.prune.depth import DropLayers, DropLayersConfig, drop_layers_
from slimkit.recipe.schema import Recipe

LAYERS = "transformer.encoder.layer"


class Stack(nn.Module):
    """A tiny CNN whose blocks sit in an nn.ModuleList."""

    def __init__(self, blocks: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()) for _ in range(blocks)
        )
        self.head = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, 200, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return ids * mask, mask


@torch.no_grad()
def test_cnn_keeps_the_chosen_blocks_in_order():
    torch.manual_seed(0)
    model = Stack().eval()
    blocks = list(model.blocks)
    x = torch.randn(2, 1, 8, 8)
    want = model.head(blocks[3](blocks[1](model.stem(x))).mean(dim=(2, 3)))
    technique = DropLayers(DropLayersConfig(layers="blocks", keep=[1, 3]))
    technique.apply(model)
    assert isinstance(model.blocks, nn.ModuleList) and list(model.blocks) == [blocks[1], blocks[3]]
    torch.testing.assert_close(model(x), want, atol=0, rtol=0)
    assert technique.finalize(model) is model
    summary = technique.summary()
    assert [row[1] for row in summary.rows] == ["drop", "keep", "drop", "keep"]
    assert summary.totals["layers_before"] == 4 and summary.totals["layers_after"] == 2
    assert summary.totals["params_removed"] == 2 * sum(p.numel() for p in blocks[0].parameters())


@torch.no_grad()
def test_encoder_student_equals_a_native_shallower_encoder():
    torch.manual_seed(0)
    teacher = sentence_encoder_tiny(num_layers=4)
    student = sentence_encoder_tiny(num_layers=4)
    student.load_state_dict(teacher.state_dict())
    DropLayers(DropLayersConfig(layers=LAYERS, keep=[0, 2])).apply(student)
    assert student.transformer.config.num_hidden_layers == 2
    assert teacher.transformer.config.num_hidden_layers == 4  # its own config is untouched
    indices = [m.layer_idx for m in student.modules() if hasattr(m, "layer_idx")]
    assert indices and sorted(set(indices)) == [0, 1]  # renumbered to the new positions
    native = sentence_encoder_tiny(num_layers=2)
    state = {k: v for k, v in teacher.state_dict().items() if ".layer." not in k}
    for new, old in enumerate([0, 2]):
        prefix = f"{LAYERS}.{old}."
        for key, value in teacher.state_dict().items():
            if key.startswith(prefix):
                state[f"{LAYERS}.{new}.{key[len(prefix) :]}"] = value
    native.load_state_dict(state)
    assert student.state_dict().keys() == native.state_dict().keys()
    ids, mask = _tokens()
    torch.testing.assert_close(student(ids, mask), native(ids, mask), atol=1e-6, rtol=0)


def test_plan_lists_dropped_and_kept_layers_without_changing_the_model():
    model = sentence_encoder_tiny(num_layers=4)
    selection = DropLayers(DropLayersConfig(layers=LAYERS, keep=[1, 3])).plan(model)
    assert selection.names == [f"{LAYERS}.0", f"{LAYERS}.2"]
    assert selection.skipped == [
        (f"{LAYERS}.1", "kept as layer 0"),
        (f"{LAYERS}.3", "kept as layer 1"),
    ]
    assert len(model.transformer.encoder.layer) == 4


def test_apply_is_idempotent_and_bound_to_one_model():
    model = Stack()
    technique = DropLayers(DropLayersConfig(layers="blocks", keep=[0, 2]))
    technique.apply(model)
    technique.apply(model)
    assert len(model.blocks) == 2
    with pytest.raises(StateError, match="already applied to another model"):
        technique.apply(Stack())


def test_rebuild_and_state_resume_a_finished_stage():
    torch.manual_seed(0)
    config = DropLayersConfig(layers=LAYERS, keep=[0, 3])
    trained = sentence_encoder_tiny(num_layers=4)
    technique = make_technique(config)
    technique.apply(trained)
    model = technique.finalize(trained)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # "fine-tuned"
    state = technique.state_dict()
    assert state["keep"] == [0, 3] and state["layers"] == LAYERS
    fresh = make_technique(config)
    fresh.load_state_dict(state)
    rebuilt = fresh.rebuild(sentence_encoder_tiny(num_layers=4))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    ids, mask = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids, mask), model(ids, mask), atol=0, rtol=0)
    other = make_technique(DropLayersConfig(layers=LAYERS, keep=[0, 1]))
    with pytest.raises(StateError, match=r"keeps \[0, 3\]"):
        other.load_state_dict(state)


def test_recipe_accepts_drop_layers_and_config_round_trips():
    config = DropLayersConfig(layers=LAYERS, keep=[0, 2, 4])
    assert DropLayersConfig.from_dict(config.to_dict()) == config
    recipe = Recipe.from_dict(
        {"stages": [{"name": "s", "techniques": [{"kind": "drop_layers", **config.to_dict()}]}]}
    )
    assert recipe.stages[0].techniques[0] == config


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        ([], "keep"),
        ([0, 0, 2], "layer 0 is listed twice"),
        ([2, 0], "increasing order"),
        ([-1, 2], ">= 0"),
    ],
)
def test_bad_keep_is_a_one_line_config_error(keep, message):
    with pytest.raises(ConfigError, match=message) as exc:
        DropLayersConfig(layers="blocks", keep=keep)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("layers", "keep", "message"),
    [
        (
            "transformer.encoder.layers",
            [0],
            "no module 'transformer.encoder.layers'.*encoder.layer",
        ),
        ("transformer.encoder", [0], "is a BertEncoder, expected an nn.ModuleList"),
        (LAYERS, [1, 4], r"keep index 4 is out of range: .* has 4 layers \(0..3\)"),
    ],
)
def test_model_mismatch_is_a_one_line_scope_error(layers, keep, message):
    model = sentence_encoder_tiny(num_layers=4)
    technique = DropLayers(DropLayersConfig(layers=layers, keep=keep))
    for call in (technique.plan, technique.apply, lambda m: drop_layers_(m, layers, keep)):
        with pytest.raises(ScopeError, match=message) as exc:
            call(model)
        assert "\n" not in str(exc.value)
    assert len(model.transformer.encoder.layer) == 4  # nothing changed

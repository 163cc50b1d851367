"""Structured pruning: reference models shrink for real, criteria pick the right channels,
attention loses whole heads, and what cannot be pruned is skipped with a reason."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from slimkit import Compressor, ConfigError, StateError
from slimkit.core.technique import make_technique
from slimkit.export.onnx import export_onnx
from slimkit.measure.flops import count_macs, count_params
from slimkit.models import (
    DigitsResNet,
    bert_tiny_encoder,
    efficientnet_tiny,
    mobilenetv2_tiny,
    resnet_tiny,
    vit_tiny,
)
from slimkit.prune.channel_importance import (
    ChannelGroup,
    RandomImportance,
    accumulate_gradients,
    global_prune_counts,
    heads_to_remove,
    kept_count,
)
from slimkit.prune.manifest import load_pruned, save_pruned
from slimkit.prune.structured import StructuredPruning, StructuredPruningConfig

IMAGE = (2, 1, 8, 8)
FACTORIES = {
    "digits_resnet": DigitsResNet,
    "resnet_bottleneck": lambda: resnet_tiny("bottleneck"),
    "mobilenetv2": mobilenetv2_tiny,
    "efficientnet": efficientnet_tiny,
    "vit": vit_tiny,
    "bert": bert_tiny_encoder,
}


def build(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    if name == "bert":
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = FACTORIES[name]().eval()
    generator = torch.Generator().manual_seed(1)
    if name == "bert":
        return model, (torch.randint(0, 1000, (2, 8), generator=generator),)
    return model, (torch.randn(IMAGE, generator=generator),)


def prune(model: nn.Module, inputs: tuple, **config) -> StructuredPruning:
    technique = StructuredPruning(StructuredPruningConfig(**config), example_inputs=inputs)
    technique.apply(model)
    return technique


def forward(model: nn.Module, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(*inputs)


# --- reference models ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", FACTORIES)
def test_zero_sparsity_changes_nothing(name):
    model, inputs = build(name)
    before, params = forward(model, inputs), count_params(model)
    technique = prune(model, inputs, sparsity=0.0)
    assert torch.equal(forward(model, inputs), before)
    assert count_params(model) == params
    assert technique.manifest.layers == {}


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
@pytest.mark.parametrize("name", FACTORIES)
def test_pruned_reference_model(name, sparsity, tmp_path):
    model, inputs = build(name)
    before, params, macs = forward(model, inputs), count_params(model), count_macs(model, inputs)
    technique = prune(model, inputs, sparsity=sparsity)
    after = forward(model, inputs)
    assert after.shape == before.shape and torch.isfinite(after).all()

    # parameters: fewer, and exactly what the manifest's shapes imply
    layers = technique.manifest.to_dict()["layers"]
    removed = sum(
        math.prod(t["original_shape"]) - math.prod(t["shape"])
        for layer in layers
        for t in layer["tensors"].values()
        if t["kind"] == "parameter"
    )
    assert 0 < removed and count_params(model) == params - removed
    # kept channel counts are multiples of round_to where the layer is wide enough
    for layer in layers:
        if layer["type"] in ("Conv2d", "Linear") and "kept_out" in layer:
            original = layer["tensors"]["weight"]["original_shape"][0]
            assert len(layer["kept_out"]) % 8 == 0 or original < 8, layer["module"]
    # MACs fall between linear and quadratic in the kept share
    ratio = count_macs(model, inputs).total_macs / macs.total_macs
    assert (1 - sparsity) ** 2 - 0.1 <= ratio <= (1 - sparsity) + 0.1

    # ONNX Runtime runs the smaller graph and agrees with torch
    path = export_onnx(model, inputs, tmp_path / "pruned.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)}
    np.testing.assert_allclose(session.run(None, feeds)[0], after.numpy(), atol=1e-4, rtol=0)

    # records, not pickles: a fresh original model sliced per the manifest gives the same outputs
    save_pruned(model, technique.manifest, tmp_path / "ckpt")
    fresh, _ = build(name)
    torch.manual_seed(123)  # the weights must come from the file, not from the seed
    assert torch.equal(forward(load_pruned(fresh, tmp_path / "ckpt"), inputs), after)


@pytest.mark.parametrize(("name", "sparsity", "heads"), [("vit", 0.5, 2), ("bert", 0.3, 3)])
def test_attention_loses_whole_heads(name, sparsity, heads):
    model, inputs = build(name)
    prune(model, inputs, sparsity=sparsity)
    for module in model.modules():
        if hasattr(module, "q_proj"):  # slimkit ViT attention
            assert (module.num_heads, module.head_dim) == (heads, 16)
            assert module.q_proj.out_features == module.out_proj.in_features == heads * 16
        if hasattr(module, "num_attention_heads"):  # transformers BertSelfAttention
            assert (module.num_attention_heads, module.attention_head_size) == (heads, 16)
            assert module.query.out_features == module.all_head_size == heads * 16


def test_removing_heads_equals_silencing_them():
    model, inputs = build("vit")
    reference, _ = build("vit")
    technique = prune(model, inputs, sparsity=0.5, scope={"exclude": ["patch_embed", "*.mlp.*"]})
    for index in range(2):
        kept = technique.manifest.layers[f"blocks.{index}.attn"].kept_heads
        weight = reference.blocks[index].attn.out_proj.weight
        with torch.no_grad():
            for head in set(range(4)) - set(kept):
                weight[:, head * 16 : (head + 1) * 16] = 0
    torch.testing.assert_close(
        forward(model, inputs), forward(reference, inputs), atol=1e-6, rtol=0
    )


def test_heads_are_skipped_with_a_reason_when_prune_heads_is_off():
    model, inputs = build("vit")
    technique = prune(model, inputs, sparsity=0.5, prune_heads=False)
    reasons = dict(technique.summary().skipped)
    assert "prune_heads" in reasons["blocks.0.attn.v_proj"]
    assert model.blocks[0].attn.num_heads == 4 and model.blocks[0].mlp.fc1.out_features == 64


# --- importance criteria on hand-built layers -----------------------------------------------------


class TwoConv(nn.Module):
    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4) if norm else nn.Identity()
        self.conv2 = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


X = (torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(0)),)


def kept_filters(model: nn.Module, **config) -> list[int]:
    technique = prune(model, X, sparsity=0.5, round_to=1, **config)
    return technique.manifest.layers["conv1"].kept_out


def test_l1_keeps_the_largest_filters_and_slicing_equals_zeroing():
    model = TwoConv()
    with torch.no_grad():
        model.conv1.weight.copy_(
            torch.tensor([3.0, 1.0, 4.0, 2.0]).view(4, 1, 1, 1).expand(4, 2, 1, 1) / 2
        )
    reference = TwoConv()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference.conv1.weight[[1, 3]] = 0
    assert kept_filters(model, importance="l1") == [0, 2]
    assert model.conv1.out_channels == model.conv2.in_channels == 2
    torch.testing.assert_close(forward(model, X), forward(reference, X), atol=1e-6, rtol=0)


def test_l1_and_l2_disagree_where_they_should():
    rows = torch.tensor([[1.0, 1.0], [1.9, 0.0], [5.0, 5.0], [5.0, 5.0]]).view(4, 2, 1, 1)
    kept = {}
    for name in ("l1", "l2"):
        model = TwoConv()
        with torch.no_grad():
            model.conv1.weight.copy_(rows)
        kept[name] = prune(model, X, sparsity=0.25, round_to=1, importance=name).manifest
    assert kept["l1"].layers["conv1"].kept_out == [0, 2, 3]  # |[1, 1]|_1 = 2 > 1.9
    assert kept["l2"].layers["conv1"].kept_out == [1, 2, 3]  # |[1.9, 0]|_2 = 1.9 > 1.41


def test_group_l1_sums_filters_consumer_inputs_and_batchnorm_scales():
    model = TwoConv(norm=True)
    with torch.no_grad():
        model.conv1.weight.fill_(1.0)  # every filter alike: l1 cannot tell them apart
        model.bn.weight.copy_(torch.tensor([1.0, 1.0, 1.0, 1.0]))
        model.conv2.weight.zero_()
        model.conv2.weight[:, 1] = 2.0  # channel 1 feeds conv2 strongly
        model.conv2.weight[:, 3] = 1.0
    # per channel: conv1 filter (2 weights of 1) + bn |gamma| + conv2 inputs (3 outputs)
    group = {0: 2 + 1 + 0, 1: 2 + 1 + 6, 2: 2 + 1 + 0, 3: 2 + 1 + 3}
    assert sorted(group, key=group.get, reverse=True)[:2] == [1, 3]
    assert kept_filters(model, importance="group_l1") == [1, 3]
    model = TwoConv(norm=True)
    with torch.no_grad():
        model.conv1.weight.fill_(1.0)
        model.conv2.weight.zero_()
        model.conv2.weight[:, 0] = 1.0
        model.conv2.weight[:, 2] = 1.0
    assert kept_filters(model, importance="group_l2") == [0, 2]


def test_bn_scale_ranks_by_gamma_and_falls_back_to_l1_with_a_reason():
    model = TwoConv(norm=True)
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([0.1, -5.0, 0.2, 3.0]))
    assert kept_filters(model, importance="bn_scale") == [1, 3]
    technique = StructuredPruning(
        StructuredPruningConfig(sparsity=0.5, importance="bn_scale", round_to=1), example_inputs=X
    )
    plan = technique.plan_groups(TwoConv())
    notes = {g.root: g.note for g in plan.groups}
    assert "no BatchNorm" in notes["conv1"]


def test_taylor_needs_gradients_and_uses_them():
    model = TwoConv()
    with pytest.raises(StateError, match=r"conv1\.weight has no gradient"):
        prune(model, X, sparsity=0.5, importance="taylor")
    assert model.conv1.out_channels == 4  # nothing changed

    batches = [
        torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)
    ]
    assert accumulate_gradients(model, batches, lambda m, b: m(b).square().mean()) == 3
    with torch.no_grad():
        model.conv1.weight.grad = (
            torch.tensor([1.0, 0.0, 3.0, 0.5]).view(4, 1, 1, 1).expand(4, 2, 1, 1).clone()
        )
        model.conv1.weight.copy_(torch.ones(4, 2, 1, 1))
    assert kept_filters(model, importance="taylor") == [0, 2]


def test_random_importance_is_seeded():
    group = ChannelGroup(root="layer", channels=16, members=())
    first = RandomImportance(seed=3).score(group)
    assert torch.equal(first, RandomImportance(seed=3).score(group))
    assert not torch.equal(first, RandomImportance(seed=4).score(group))
    assert not torch.equal(first, RandomImportance(seed=3).score(ChannelGroup("other", 16, ())))
    model_a, inputs = build("digits_resnet")
    model_b, _ = build("digits_resnet")
    a = prune(model_a, inputs, sparsity=0.5, importance="random", seed=7).manifest
    b = prune(model_b, inputs, sparsity=0.5, importance="random", seed=7).manifest
    assert a.to_dict()["layers"] == b.to_dict()["layers"]


# --- allocation ---------------------------------------------------------------------------------


def test_kept_counts_and_rounding():
    assert kept_count(16, 0.0, 8) == 16
    assert kept_count(16, 0.5, 8) == 8
    assert kept_count(16, 0.3, 8) == 16  # 11 rounds up to 16: never prunes more than asked
    assert kept_count(32, 0.3, 8) == 24
    assert kept_count(6, 0.5, 8) == 3  # narrower than round_to: plain count
    assert kept_count(10, 0.99, 1) == 1
    assert [heads_to_remove(4, s) for s in (0.0, 0.3, 0.5, 0.99)] == [0, 1, 2, 3]


def test_global_ranking_respects_the_per_layer_cap():
    small, large = torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 20, 30, 40])
    assert global_prune_counts([small, large], 0.5, 0.9) == [2, 2]  # scale-free
    lopsided = torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 100])
    assert global_prune_counts([lopsided, large], 0.5, 0.5) == [4, 2]

    model, inputs = build("digits_resnet")
    technique = prune(
        model, inputs, sparsity=0.5, allocation="global", max_layer_sparsity=0.6, round_to=1
    )
    groups = [g for g in technique.last_plan.groups if g.skip is None]
    assert all(len(g.prune) <= math.floor(0.6 * g.channels) for g in groups)
    total = sum(g.channels for g in groups)
    assert sum(len(g.prune) for g in groups) == round(0.5 * total)


# --- what cannot be pruned is skipped, never a crash ----------------------------------------------


class WithMHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.relu(self.fc1(x)))
        h, _ = self.mha(h, h, h)
        return self.head(h.mean(1))


class Reshaped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 32), nn.Linear(32, 16), nn.Linear(8, 3)
        self.register_buffer("scale", torch.ones(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.relu(self.fc1(x))) * self.scale  # a buffer the graph cannot see
        return self.fc3(h.view(x.shape[0], 2, 8).mean(1))


def test_unsupported_groups_are_skipped_with_reasons():
    torch.manual_seed(0)
    model, x = WithMHA(), (torch.randn(2, 5, 8),)
    technique = prune(model, x, sparsity=0.5, round_to=1)
    reasons = dict(technique.summary().skipped)
    assert "MultiheadAttention" in reasons["fc2"] and "output layer" in reasons["head"]
    assert model.fc1.out_features == 16 and model.fc2.out_features == 16

    torch.manual_seed(0)
    model, x = Reshaped(), (torch.randn(2, 8),)
    before = forward(model, x)
    technique = prune(model, x, sparsity=0.5, round_to=1)
    reasons = dict(technique.summary().skipped)
    assert "ambiguously" in reasons["fc2"]
    assert model.fc1.out_features == 16  # the group that could be pruned was
    assert forward(model, x).shape == before.shape


def test_a_group_that_breaks_the_forward_pass_is_rolled_back():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 3)
            self.register_buffer("scale", torch.ones(32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.fc1(x) * self.scale)

    torch.manual_seed(0)
    model, x = Scaled(), (torch.randn(2, 8),)
    before = forward(model, x)
    technique = prune(model, x, sparsity=0.5)
    assert "rolled back" in dict(technique.summary().skipped)["fc1"]
    assert torch.equal(forward(model, x), before) and technique.manifest.layers == {}


# --- config and life cycle ----------------------------------------------------------------------


def test_config_is_data():
    config = StructuredPruningConfig(sparsity=0.4, importance="bn_scale", allocation="global")
    assert StructuredPruningConfig.from_dict(config.to_dict()) == config
    for bad, field in (
        ({"sparsity": 0.5, "importance": "l3"}, "importance"),
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": 0.5, "round_to": 0}, "round_to"),
        ({"amount": 0.5}, "amount"),
    ):
        with pytest.raises(ConfigError, match=field):
            StructuredPruningConfig(**bad)


def test_life_cycle_through_the_compressor():
    model, inputs = build("digits_resnet")
    config = StructuredPruningConfig(sparsity=0.5, input_shape=(1, 1, 8, 8))
    technique = make_technique(config)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    selection = technique.plan(model)  # no side effects: same shapes, flags and statistics
    assert "conv1" in selection.names and "fc" in dict(selection.skipped)
    assert model.training and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    compressor = Compressor([technique]).apply(model)
    technique.apply(model)  # idempotent
    assert model.conv1.out_channels == 8
    plain = compressor.finalize()
    assert plain is model and forward(plain, inputs).shape == (2, 10)
    summary = technique.summary().to_dict()
    assert summary["totals"]["channels_removed"] == summary["totals"]["channels"] // 2
    assert any(row["module"] == "conv1" and row["out_kept"] == 8 for row in summary["layers"])
    state = technique.state_dict()
    clone = StructuredPruning(config)
    clone.load_state_dict(state)
    assert clone.manifest.to_dict() == technique.manifest.to_dict()
    with pytest.raises(StateError, match="another model"):
        technique.apply(build("digits_resnet")[0])


def test_example_inputs_are_required():
    with pytest.raises(StateError, match="example inputs"):
        StructuredPruning(StructuredPruningConfig(sparsity=0.5)).apply(TwoConv())

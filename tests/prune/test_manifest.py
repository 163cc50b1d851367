"""Pruning records: measured slicing, JSON round trip, save/load of pruned models, clear errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch_pruning as tp
from torch import nn

from slimkit import CheckpointError, UnsupportedModuleError
from slimkit.models import DigitsResNet
from slimkit.prune.manifest import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    LayerRecord,
    PruningManifest,
    apply_manifest,
    load_pruned,
    read_manifest,
    record_slicing,
    save_pruned,
)
from slimkit.prune.structured import StructuredPruning, StructuredPruningConfig

X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def pruned_resnet(width: int = 8, sparsity: float = 0.5) -> tuple[nn.Module, PruningManifest]:
    torch.manual_seed(0)
    model = DigitsResNet(width=width).eval()
    technique = StructuredPruning(
        StructuredPruningConfig(sparsity=sparsity, round_to=1), example_inputs=(X,)
    )
    technique.apply(model)
    return model, technique.manifest


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


# --- recording ---------------------------------------------------------------------------------


def test_record_slicing_measures_what_a_pruning_function_kept():
    linear = nn.Linear(5, 6)
    record = record_slicing(linear, "fc", lambda m: tp.prune_linear_out_channels(m, [1, 4]))
    assert record.tensors["weight"].kept == {0: [0, 2, 3, 5]}
    assert record.tensors["weight"].shape == (4, 5) and record.tensors["bias"].kept == {
        0: [0, 2, 3, 5]
    }
    assert record.attributes == {"out_features": 4}
    assert record.original_attributes == {"out_features": 6}
    assert linear.out_features == 6 and linear.weight.shape == (6, 5)  # the original is untouched

    dw = nn.Conv2d(4, 4, 3, groups=4)
    record = record_slicing(dw, "dw", lambda m: tp.prune_depthwise_conv_out_channels(m, [0]))
    assert record.tensors["weight"].kept == {0: [1, 2, 3]}
    assert record.attributes == {"out_channels": 3, "in_channels": 3, "groups": 3}

    bn = nn.BatchNorm2d(4)
    record = record_slicing(bn, "bn", lambda m: tp.prune_batchnorm_out_channels(m, [2]))
    assert set(record.tensors) == {"weight", "bias", "running_mean", "running_var"}
    assert record.tensors["running_var"].kind == "buffer"


def test_record_slicing_refuses_what_is_not_a_channel_selection():
    def shuffle(module: nn.Linear) -> None:
        module.weight = nn.Parameter(module.weight.detach().flip(0)[:3])

    with pytest.raises(UnsupportedModuleError, match="fc: pruning weight"):
        record_slicing(nn.Linear(4, 4), "fc", shuffle)


# --- the manifest as data ------------------------------------------------------------------------


def test_manifest_json_round_trip_and_parameter_count():
    model, manifest = pruned_resnet()
    data = json.loads(json.dumps(manifest.to_dict()))
    assert data["format"] == "slimkit.pruned" and data["slimkit_version"]
    again = PruningManifest.from_dict(data)
    assert again.to_dict() == manifest.to_dict()
    conv1 = again.layers["conv1"]
    assert conv1.kept_out == manifest.layers["conv1"].kept_out and len(conv1.kept_out) == 4
    assert conv1.tensors["weight"].original_shape == (8, 1, 3, 3)
    torch.manual_seed(0)
    original = sum(p.numel() for p in DigitsResNet(width=8).parameters())
    assert sum(p.numel() for p in model.parameters()) == original - manifest.removed_parameters()


def test_merge_refuses_slicing_one_dimension_twice():
    record = record_slicing(nn.Linear(4, 4), "fc", lambda m: tp.prune_linear_out_channels(m, [0]))
    manifest = PruningManifest()
    manifest.add(record)
    with pytest.raises(CheckpointError, match="sliced twice"):
        manifest.add(LayerRecord.from_dict(record.to_dict()))


# --- files ---------------------------------------------------------------------------------------


def test_save_and_load_round_trip_without_pickles(tmp_path):
    model, manifest = pruned_resnet()
    folder = save_pruned(model, manifest, tmp_path / "ckpt")
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS_FILE, MANIFEST_FILE])
    assert read_manifest(folder).to_dict() == manifest.to_dict()
    save_pruned(model, manifest, folder)  # overwriting is fine and leaves no temp files
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS_FILE, MANIFEST_FILE])

    torch.manual_seed(99)
    fresh = load_pruned(DigitsResNet(width=8), folder)
    assert torch.equal(run(fresh), run(model))
    assert fresh.conv1.out_channels == model.conv1.out_channels == 4
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_missing_files_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no pruning manifest"):
        load_pruned(DigitsResNet(width=8), tmp_path)
    model, manifest = pruned_resnet()
    folder = save_pruned(model, manifest, tmp_path / "ckpt")
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_pruned(DigitsResNet(width=8), folder)


def test_corrupt_or_mismatched_files_are_checkpoint_errors(tmp_path):
    model, manifest = pruned_resnet()
    folder = save_pruned(model, manifest, tmp_path / "ckpt")
    weights = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(weights[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="weights_sha256"):
        load_pruned(DigitsResNet(width=8), folder)
    (folder / WEIGHTS_FILE).write_bytes(weights)

    (folder / MANIFEST_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        load_pruned(DigitsResNet(width=8), folder)
    (folder / MANIFEST_FILE).write_text(json.dumps({"format": "other"}), encoding="utf-8")
    with pytest.raises(CheckpointError, match="not a slimkit pruning manifest"):
        load_pruned(DigitsResNet(width=8), folder)


def test_a_manifest_for_another_model_names_the_layer(tmp_path):
    model, manifest = pruned_resnet(width=8)
    folder = save_pruned(model, manifest, tmp_path / "ckpt")
    wider = DigitsResNet(width=16)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    first = next(iter(manifest.layers))  # records are replayed in pruning order
    with pytest.raises(CheckpointError, match=rf"layer '{re.escape(first)}': weight has shape"):
        load_pruned(wider, folder)
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())  # rolled back

    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Linear(3, 3)

    with pytest.raises(CheckpointError, match="layer 'conv1': is Linear, manifest says Conv2d"):
        apply_manifest(Other(), PruningManifest(layers={"conv1": manifest.layers["conv1"]}))
    with pytest.raises(CheckpointError, match="layer 'bn1': no such module"):
        apply_manifest(nn.Sequential(), PruningManifest(layers={"bn1": manifest.layers["bn1"]}))


def test_weights_that_do_not_fit_the_sliced_model_are_checkpoint_errors(tmp_path):
    model, manifest = pruned_resnet()
    folder = save_pruned(model, manifest, tmp_path / "ckpt")
    data = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    data["layers"] = [layer for layer in data["layers"] if layer["module"] != "fc"]
    (folder / MANIFEST_FILE).write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"do not fit the sliced model.*fc\.weight"):
        load_pruned(DigitsResNet(width=8), folder)
    first = next(iter(manifest.layers))
    with pytest.raises(CheckpointError, match=rf"layer '{re.escape(first)}': weight is \["):
        save_pruned(DigitsResNet(width=8), manifest, tmp_path / "other")  # unpruned model

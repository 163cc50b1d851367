"""Tests for slimkit.measure.size."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from slimkit.errors import CheckpointError
from slimkit.measure.size import (
    count_nonzero_parameters,
    count_parameters,
    dense_checkpoint_bytes,
    file_size,
    state_dict_nbytes,
)


def test_file_size(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x" * 123)
    assert file_size(tmp_path / "f.bin") == 123
    assert file_size(str(tmp_path / "f.bin")) == 123
    with pytest.raises(CheckpointError, match="file not found"):
        file_size(tmp_path / "missing.bin")


def test_state_dict_nbytes_counts_each_dtype():
    state = {
        "a": torch.zeros(10),
        "b": torch.zeros(3, dtype=torch.int64),
        "c": torch.zeros(2, 2, dtype=torch.float16),
        "d": torch.zeros(0),
    }
    assert state_dict_nbytes(state) == 40 + 24 + 8


def test_dense_checkpoint_bytes_is_the_fp32_safetensors_size():
    torch.manual_seed(0)
    linear = nn.Linear(10, 5)
    size = dense_checkpoint_bytes(linear)
    assert size == len(safetensors.torch.save(dict(linear.state_dict())))
    assert 55 * 4 < size < 55 * 4 + 200  # payload plus a small JSON header

    half = {k: v.half() for k, v in linear.state_dict().items()}
    assert dense_checkpoint_bytes(half) == size  # floats are counted as float32

    buffers = {"n": torch.tensor(3), "m": torch.ones(4, dtype=torch.bool)}
    assert dense_checkpoint_bytes(buffers) == len(safetensors.torch.save(buffers))


def test_dense_checkpoint_bytes_accepts_tied_and_strided_tensors():
    embed = nn.Embedding(7, 4)
    out = nn.Linear(4, 7, bias=False)
    out.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "out": out})
    assert dense_checkpoint_bytes(model) > 2 * 28 * 4
    assert dense_checkpoint_bytes({"t": torch.ones(3, 5).t()}) == len(
        safetensors.torch.save({"t": torch.ones(5, 3)})
    )


def test_count_parameters_and_nonzero():
    linear = nn.Linear(10, 5)
    with torch.no_grad():
        linear.weight[:2] = 0.0
        linear.bias.fill_(1.0)
    assert count_parameters(linear) == 55
    assert count_nonzero_parameters(linear) == 55 - 20


def test_tied_parameters_count_once():
    embed = nn.Embedding(7, 4)
    out = nn.Linear(4, 7, bias=False)
    out.weight = embed.weight
    assert count_parameters(nn.ModuleList([embed, out])) == 28


def test_counts_see_torch_prune_masks():
    torch.manual_seed(0)
    linear = nn.Linear(10, 5)
    with torch.no_grad():
        linear.bias.fill_(1.0)
    prune.l1_unstructured(linear, "weight", amount=20)
    assert count_parameters(linear) == 55
    assert count_nonzero_parameters(linear) == 55 - 20
    prune.remove(linear, "weight")
    assert count_nonzero_parameters(linear) == 55 - 20


class _ZeroFirstRow(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(w)
        mask[0] = 0.0
        return w * mask


def test_counts_see_parametrizations():
    torch.manual_seed(0)
    linear = nn.Linear(10, 5, bias=False)
    parametrize.register_parametrization(linear, "weight", _ZeroFirstRow())
    assert count_parameters(linear) == 50
    assert count_nonzero_parameters(linear) == 40

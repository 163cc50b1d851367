"""MACs and parameters against hand-computed values."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from slimkit.errors import ConfigError
from slimkit.measure.flops import count_macs, count_params


class TinyAttention(nn.Module):
    """Single-block self-attention with explicit matmuls, or SDPA, between two projections."""

    def __init__(self, dim: int = 16, heads: int = 2, sdpa: bool = False) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.heads, self.sdpa = heads, sdpa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = (q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


def test_conv_macs_per_sample():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    report = count_macs(conv, torch.randn(4, 3, 8, 8))
    assert report.batch_size == 4
    assert report.layer_macs == {"": 8 * 3 * 9 * 64}
    assert report.total_macs == 8 * 3 * 9 * 64
    assert report.params == 8 * 3 * 9 + 8 == count_params(conv)


def test_depthwise_conv_counts_one_input_channel_per_output():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8))
    report = count_macs(model, torch.randn(2, 8, 8, 8))
    assert report.layer_macs["0"] == 8 * 9 * 64  # Cin/groups = 1
    assert report.layer_macs["1"] == 0
    assert report.norm_ops == 8 * 64
    assert report.total_macs == 8 * 9 * 64


def test_linear_counts_every_token_row():
    report = count_macs(nn.Linear(16, 32), torch.randn(3, 10, 16))
    assert report.layer_macs[""] == 10 * 16 * 32
    assert report.total_macs == 10 * 16 * 32


@pytest.mark.parametrize("sdpa", [False, True])
def test_attention_matmuls_are_in_total_not_in_layers(sdpa):
    t, d = 10, 16
    model = TinyAttention(d, sdpa=sdpa)
    report = count_macs(model, torch.randn(2, t, d))
    projections = t * d * 3 * d + t * d * d
    attention = 2 * t * t * d  # Q @ K^T and attn @ V, all heads together
    assert report.hooked_macs == projections
    assert report.total_macs == projections + attention
    assert report.other_macs == attention
    assert report.layer_macs == {"qkv": t * d * 3 * d, "proj": t * d * d, "norm": 0}
    assert report.norm_ops == t * d


def test_multihead_attention_module_is_counted():
    t, e = 12, 16
    mha = nn.MultiheadAttention(e, 4, batch_first=True)
    x = torch.randn(2, t, e)
    report = count_macs(mha, (x, x, x))
    expected = 4 * t * e * e + 2 * t * t * e
    assert report.layer_macs[""] == expected and report.total_macs == expected
    assert report.params == count_params(mha)


def test_params_report_table_and_training_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    model.train()
    report = count_macs(model, torch.randn(1, 3, 8, 8))
    assert model.training and model[0].training
    assert report.params == sum(p.numel() for p in model.parameters())
    assert report.total_macs == 4 * 3 * 9 * 36 + 144 * 5
    assert [row.name for row in report.layers] == ["0", "3"]
    data = json.loads(json.dumps(report.to_dict()))
    assert data["total_macs"] == report.total_macs and len(data["layers"]) == 2
    table = str(report)
    assert "Conv2d" in table and f"{report.total_macs:,}" in table


def test_parametrized_weight_is_counted_once():
    class Mask(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * (w.abs() > 0.1)

    linear = nn.Linear(8, 4)
    parametrize.register_parametrization(linear, "weight", Mask())
    report = count_macs(nn.Sequential(linear), torch.randn(2, 8))
    assert report.layer_macs == {"0": 32}
    assert report.layers[0].params == 36


def test_trainable_only_and_bad_batch():
    model = nn.Linear(4, 4)
    model.bias.requires_grad_(False)
    assert count_params(model, trainable_only=True) == 16
    with pytest.raises(ConfigError, match="batch_size"):
        count_macs(model, torch.randn(2, 4), batch_size=0)

"""Adapters: shapes, kinds (1x1 conv, Linear, pooling, identity), deterministic init, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimkit.distill import FeatureAdapter, make_adapter
from slimkit.errors import ConfigError


def test_conv_adapter_for_feature_maps_of_different_channels():
    adapter = make_adapter((2, 8, 4, 4), (2, 16, 4, 4))
    assert isinstance(adapter, FeatureAdapter) and adapter.trainable
    assert isinstance(adapter.proj, nn.Conv2d)
    assert adapter.proj.weight.shape == (16, 8, 1, 1) and adapter.proj.bias is None
    assert isinstance(adapter.student_pool, nn.Identity)
    s, t = adapter(torch.randn(5, 8, 4, 4), torch.randn(5, 16, 4, 4))  # any batch size
    assert s.shape == t.shape == (5, 16, 4, 4)


@pytest.mark.parametrize(
    ("student", "teacher", "pooled"),
    [((1, 8, 8, 8), (1, 16, 4, 4), "student"), ((1, 8, 2, 2), (1, 8, 4, 4), "teacher")],
)
def test_the_larger_spatial_side_is_average_pooled(student, teacher, pooled):
    adapter = make_adapter(student, teacher)
    pool = adapter.student_pool if pooled == "student" else adapter.teacher_pool
    other = adapter.teacher_pool if pooled == "student" else adapter.student_pool
    assert isinstance(pool, nn.AdaptiveAvgPool2d) and isinstance(other, nn.Identity)
    s, t = adapter(torch.randn(student), torch.randn(teacher))
    size = (min(student[2], teacher[2]), min(student[3], teacher[3]))
    assert s.shape == t.shape == (1, teacher[1], *size)
    if pooled == "teacher":
        assert isinstance(adapter.proj, nn.Identity) and not adapter.trainable


@pytest.mark.parametrize(("student", "teacher"), [((4, 8), (4, 12)), ((2, 5, 8), (2, 5, 12))])
def test_linear_adapter_for_embeddings(student, teacher):
    adapter = make_adapter(student, teacher)
    assert isinstance(adapter.proj, nn.Linear)
    assert adapter.proj.weight.shape == (12, 8) and adapter.proj.bias is None
    s, _ = adapter(torch.randn(student), torch.randn(teacher))
    assert s.shape == teacher


@pytest.mark.parametrize("shape", [(2, 8), (2, 3, 8), (2, 4, 3, 3), (2, 1, 2, 3, 4)])
def test_identity_when_shapes_are_equal(shape):
    adapter = make_adapter(shape, (7, *shape[1:]))  # the batch size is ignored
    assert isinstance(adapter.proj, nn.Identity) and not adapter.trainable
    x = torch.randn(shape)
    s, t = adapter(x, x)
    assert s is x and t is x


def test_initialisation_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = make_adapter((1, 8, 4, 4), (1, 16, 4, 4))
    assert torch.equal(torch.get_rng_state(), state)
    b = make_adapter((1, 8, 4, 4), (1, 16, 4, 4))
    c = make_adapter((1, 8, 4, 4), (1, 16, 4, 4), seed=1)
    assert torch.equal(a.proj.weight, b.proj.weight)
    assert not torch.equal(a.proj.weight, c.proj.weight)
    assert a.proj.weight.abs().max() <= 1 / 8**0.5


@pytest.mark.parametrize(
    ("student", "teacher", "why"),
    [
        ((2, 8), (2, 8, 4, 4), "different ranks"),
        ((2, 5, 8), (2, 6, 8), "token counts differ"),
        ((2, 1, 2, 3, 4), (2, 1, 2, 3, 5), "adapters handle"),
    ],
)
def test_shapes_no_rule_bridges_are_one_line_errors(student, teacher, why):
    with pytest.raises(ConfigError, match=why) as info:
        make_adapter(student, teacher)
    assert "\n" not in str(info.value)
    assert str(student) in str(info.value) and str(teacher) in str(info.value)

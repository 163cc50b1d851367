"""Importance scores: magnitude, EMA, Taylor, LAMP (pure functions)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimkit.prune.importance import ema_update, lamp_score, magnitude_score, taylor_score


def test_lamp_hand_computed():
    w = torch.tensor([1.0, -2.0, 3.0])
    # squares sorted: 1, 4, 9; suffix sums: 14, 13, 9
    expected = torch.tensor([1 / 14, 4 / 13, 9 / 9])
    assert torch.allclose(lamp_score(w), expected)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=64))
def test_lamp_preserves_order_within_a_layer_and_tops_at_one(values):
    w = torch.tensor(values, dtype=torch.float64)
    score = lamp_score(w)
    order_w = torch.argsort(w.abs(), stable=True)
    assert torch.all(score[order_w][1:] >= score[order_w][:-1] - 1e-12)
    if w.abs().max() > 0:
        assert score.max().item() == 1.0
    assert torch.all((score >= 0) & (score <= 1))


def test_lamp_makes_layers_comparable():
    small, large = torch.tensor([0.01, 0.02, 0.03]), torch.tensor([10.0, 20.0, 30.0])
    # raw magnitude would prune all of the small layer first; LAMP scores are scale-free
    assert torch.allclose(lamp_score(small), lamp_score(large))


def test_other_importances():
    w, g = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25])
    assert torch.equal(magnitude_score(w), torch.tensor([1.0, 2.0]))
    assert torch.equal(taylor_score(w, g), torch.tensor([0.5, 0.5]))
    assert torch.allclose(ema_update(torch.tensor([2.0, 2.0]), w, 0.9), torch.tensor([1.9, 2.0]))

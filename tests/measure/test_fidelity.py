"""Agreement metrics between reference and compressed outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slimkit.errors import ConfigError
from slimkit.measure.fidelity import (
    cosine_similarity_stats,
    max_abs_error,
    mean_kl_divergence,
    relative_l2_error,
    top1_agreement,
)


def test_identical_outputs_agree_perfectly():
    logits = torch.randn(32, 10)
    assert top1_agreement(logits, logits.clone()) == 1.0
    assert mean_kl_divergence(logits, logits.clone()) == 0.0
    stats = cosine_similarity_stats(logits, logits.numpy())
    assert stats == pytest.approx({"mean": 1.0, "min": 1.0, "p5": 1.0})
    assert max_abs_error(logits, logits) == 0.0 and relative_l2_error(logits, logits) == 0.0


def test_kl_matches_hand_computation():
    ref = np.log(np.array([[0.5, 0.25, 0.25], [0.8, 0.1, 0.1]]))
    test = np.log(np.array([[0.25, 0.5, 0.25], [0.8, 0.1, 0.1]]))
    # row 0: 0.5 ln 2 + 0.25 ln 0.5 = 0.25 ln 2; row 1: 0
    assert mean_kl_divergence(ref, test) == pytest.approx(0.125 * math.log(2), abs=1e-12)
    assert mean_kl_divergence(torch.tensor(ref), torch.tensor(test)) == pytest.approx(
        0.125 * math.log(2), abs=1e-12
    )
    # temperature 2 on [ln 4, 0] vs [0, 0]: softmax([ln 2, 0]) = [2/3, 1/3] vs uniform
    kl = mean_kl_divergence([[math.log(4), 0.0]], [[0.0, 0.0]], temperature=2.0)
    expected = 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)
    assert kl == pytest.approx(expected, abs=1e-12)


def test_top1_agreement_and_cosine_on_known_rows():
    ref = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 2.0], [3.0, 1.0]])
    test = np.array([[2.0, 0.0], [1.0, 0.0], [1.0, 3.0], [-3.0, -1.0]])
    assert top1_agreement(ref, test) == 0.5
    stats = cosine_similarity_stats(ref, test)
    assert stats["min"] == pytest.approx(-1.0)
    cos_row2 = 7 / (math.sqrt(5) * math.sqrt(10))
    assert stats["mean"] == pytest.approx((1.0 + 0.0 + cos_row2 - 1.0) / 4)
    assert cosine_similarity_stats(np.zeros((1, 3)), np.zeros((1, 3)))["mean"] == 1.0


def test_errors_and_token_rows():
    ref = torch.zeros(2, 3, 4)
    test = ref.clone()
    test[1, 2, 3] = 0.5
    assert max_abs_error(ref, test) == 0.5
    assert top1_agreement(ref, test) == pytest.approx(5 / 6)  # every (batch, token) is a row
    assert relative_l2_error(np.array([3.0, 4.0]), np.array([3.0, 4.0 + 0.5])) == 0.1
    assert relative_l2_error(np.zeros(2), np.ones(2)) == math.inf


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ConfigError, match=r"\(4, 10\).*\(4, 9\)"):
        top1_agreement(np.zeros((4, 10)), np.zeros((4, 9)))
    with pytest.raises(ConfigError, match="temperature"):
        mean_kl_divergence(np.zeros((1, 2)), np.zeros((1, 2)), temperature=0)

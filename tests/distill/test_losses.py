"""Distillation losses: hand-computed values, zeros at student == teacher, gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from slimkit.distill import (
    attention_map,
    attention_transfer,
    cosine_embedding_loss,
    fsp_loss,
    fsp_matrix,
    hint_mse,
    soft_cross_entropy,
    soft_kl,
)
from slimkit.errors import ConfigError


def _close(value: torch.Tensor, expected: float, tol: float = 1e-6) -> None:
    assert value.dim() == 0
    assert float(value) == pytest.approx(expected, abs=tol)


# --- soft labels ----------------------------------------------------------------------------------

# p_T = softmax([ln 3, 0]) = [3/4, 1/4]; p_S = softmax([0, 0]) = [1/2, 1/2]
STUDENT = torch.tensor([[0.0, 0.0]])
TEACHER = torch.tensor([[math.log(3.0), 0.0]])
KL_BY_HAND = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)


def test_soft_kl_known_value_and_zero_at_equal_logits():
    _close(soft_kl(STUDENT, TEACHER, 1.0), KL_BY_HAND)
    logits = torch.randn(4, 10)
    _close(soft_kl(logits, logits.clone(), 3.0), 0.0)


def test_soft_kl_is_a_batch_mean_over_rows_and_tokens():
    s, t = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    rows = [soft_kl(s[i, j : j + 1], t[i, j : j + 1], 2.0) for i in range(3) for j in range(5)]
    _close(soft_kl(s, t, 2.0), float(torch.stack(rows).mean()), 1e-5)


def test_soft_kl_scales_by_t_squared():
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    for temperature in (0.5, 2.0, 4.0):
        unscaled = soft_kl(s / temperature, t / temperature, 1.0)
        _close(soft_kl(s, t, temperature), temperature**2 * float(unscaled), 1e-5)


def test_soft_kl_gradient_size_does_not_depend_on_temperature():
    """Hinton et al.: for large T, T^2 * dKL/dz_i -> (z_i - v_i) / C for zero-mean logits."""
    z = torch.tensor([[1.0, -0.5, -0.5]], requires_grad=True)
    v = torch.tensor([[-1.0, 0.5, 0.5]])
    soft_kl(z, v, 200.0).backward()
    expected = (z.detach() - v) / 3
    torch.testing.assert_close(z.grad, expected, atol=1e-3, rtol=0)


def test_soft_cross_entropy_is_kl_over_t_squared_plus_teacher_entropy():
    _close(soft_cross_entropy(STUDENT, TEACHER, 1.0), math.log(2.0))  # -(3/4 + 1/4) * ln(1/2)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    temperature = 3.0
    p_t = F.softmax(t / temperature, dim=-1)
    entropy = float(-(p_t * p_t.log()).sum(-1).mean())
    expected = float(soft_kl(s, t, temperature)) / temperature**2 + entropy
    _close(soft_cross_entropy(s, t, temperature), expected, 1e-5)


def test_soft_cross_entropy_gradient_vanishes_at_the_teacher():
    t = torch.randn(3, 5)
    s = t.clone().requires_grad_(True)
    soft_cross_entropy(s, t, 2.0).backward()
    torch.testing.assert_close(s.grad, torch.zeros_like(s), atol=1e-7, rtol=0)


@pytest.mark.parametrize("fn", [soft_kl, soft_cross_entropy])
def test_soft_losses_reject_a_non_positive_temperature(fn):
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        fn(STUDENT, TEACHER, 0.0)


# --- hint / cosine --------------------------------------------------------------------------------


def test_hint_mse_known_value_and_zero():
    _close(hint_mse(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)), 2.5)
    x = torch.randn(2, 3, 4, 4)
    _close(hint_mse(x, x.clone()), 0.0)


def test_cosine_embedding_loss_known_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 3.0], [-1.0, -1.0], [5.0, 0.0]])  # orthogonal, opposite, same
    _close(cosine_embedding_loss(a, b), (1.0 + 2.0 + 0.0) / 3)
    x = torch.randn(2, 5, 8)
    _close(cosine_embedding_loss(x, 3 * x), 0.0, 1e-6)


def test_cosine_embedding_loss_flattens_feature_maps_per_sample():
    s, t = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    expected = cosine_embedding_loss(s.flatten(1), t.flatten(1))
    _close(cosine_embedding_loss(s, t), float(expected))


# --- FSP ------------------------------------------------------------------------------------------


def test_fsp_matrix_by_hand():
    a = torch.ones(1, 1, 2, 2)
    b = torch.arange(4.0).view(1, 1, 2, 2)
    b2 = torch.cat([b, -2 * b], dim=1)  # (1, 2, 2, 2)
    g = fsp_matrix(a, b2)
    assert g.shape == (1, 1, 2)
    torch.testing.assert_close(g, torch.tensor([[[1.5, -3.0]]]))  # (0+1+2+3)/4, then * -2


def test_fsp_loss_zero_and_known_value():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    _close(fsp_loss((a, b), (a.clone(), b.clone())), 0.0)
    ones = torch.ones(1, 1, 2, 2)
    # G_S = 1, G_T = (2 * 2 * 4) / 4 = 4: (1 - 4)^2
    _close(fsp_loss((ones, ones), (2 * ones, 2 * ones)), 9.0)


def test_fsp_matrix_rejects_different_spatial_sizes():
    with pytest.raises(ConfigError, match=r"\(1, 2, 4, 4\) and \(1, 3, 2, 2\)"):
        fsp_matrix(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 2, 2))


# --- attention transfer ---------------------------------------------------------------------------


def test_attention_map_by_hand():
    feat = torch.tensor([[[[1.0, 0.0]], [[1.0, 2.0]]]])  # (1, 2, 1, 2): F = [1+1, 0+4]
    expected = torch.tensor([[2.0, 4.0]]) / math.sqrt(20.0)
    torch.testing.assert_close(attention_map(feat), expected)


def test_attention_transfer_known_value_and_channel_independence():
    s = torch.tensor([[[[1.0, 0.0]]]])
    t = torch.tensor([[[[0.0, 1.0]]]])
    _close(attention_transfer(s, t), 1.0)  # q_S = [1, 0], q_T = [0, 1]: mean([1, 1])
    x = torch.randn(2, 3, 4, 4)
    wide = torch.cat([x, x], dim=1)  # sum_c of squares doubles; the normalised map is the same
    _close(attention_transfer(x, wide), 0.0)


def test_attention_transfer_pools_the_larger_map():
    s = torch.ones(2, 3, 4, 4)
    t = 3 * torch.ones(2, 5, 2, 2)
    _close(attention_transfer(s, t), 0.0)
    s = torch.randn(1, 2, 4, 4)
    t = torch.randn(1, 2, 2, 2)
    pooled = F.adaptive_avg_pool2d(s.pow(2).sum(1, keepdim=True), 2).flatten(1)
    expected = (F.normalize(pooled, dim=1) - attention_map(t)).pow(2).mean()
    _close(attention_transfer(s, t), float(expected))


# --- gradients and errors -------------------------------------------------------------------------

PAIRS = {
    "soft_kl": (lambda s, t: soft_kl(s, t, 2.0), (4, 6)),
    "soft_cross_entropy": (lambda s, t: soft_cross_entropy(s, t, 2.0), (4, 6)),
    "hint_mse": (hint_mse, (2, 3, 4, 4)),
    "attention_transfer": (attention_transfer, (2, 3, 4, 4)),
    "cosine_embedding_loss": (cosine_embedding_loss, (2, 5, 8)),
    "fsp_loss": (lambda s, t: fsp_loss((s, s * 2), (t, t.flip(1))), (2, 3, 4, 4)),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_gradient_reaches_only_the_student(name):
    fn, shape = PAIRS[name]
    student = torch.randn(shape, requires_grad=True)
    teacher = torch.randn(shape, requires_grad=True)
    value = fn(student, teacher)
    assert value.dim() == 0
    value.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize("name", ["soft_kl", "soft_cross_entropy", "hint_mse", "cosine"])
def test_shape_mismatch_is_a_one_line_config_error_naming_both_shapes(name):
    fn = {
        "soft_kl": lambda s, t: soft_kl(s, t, 1.0),
        "soft_cross_entropy": lambda s, t: soft_cross_entropy(s, t, 1.0),
        "hint_mse": hint_mse,
        "cosine": cosine_embedding_loss,
    }[name]
    with pytest.raises(ConfigError) as info:
        fn(torch.zeros(2, 3), torch.zeros(2, 4))
    message = str(info.value)
    assert "\n" not in message
    assert "(2, 3)" in message and "(2, 4)" in message


def test_fsp_loss_channel_mismatch_names_the_fsp_shapes():
    a = torch.zeros(1, 2, 4, 4)
    b = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ConfigError, match=r"\(1, 2, 3\).*\(1, 3, 3\)"):
        fsp_loss((a, b), (b, b))


def test_attention_transfer_rejects_non_maps():
    with pytest.raises(ConfigError, match=r"4-D .* got \(2, 8\)"):
        attention_transfer(torch.zeros(2, 8), torch.zeros(2, 8))

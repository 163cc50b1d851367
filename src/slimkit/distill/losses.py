"""Distillation losses: small pure functions, tensors in, a scalar tensor out.

Every function is differentiable in its student argument(s); the teacher argument is a target and
is detached, so no gradient ever reaches the teacher. Shapes that
cannot be compared raise a one-line :class:`~slimkit.errors.ConfigError` naming both shapes; a width
mismatch between feature maps is bridged by an adapter (:func:`slimkit.distill.make_adapter`), not
here.

References:

* Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network" (soft labels, T^2).
* Romero et al. 2015, "FitNets: Hints for Thin Deep Nets" (hint / L2 between feature maps).
* Yim, Joo, Bae & Kim 2017, "A Gift from Knowledge Distillation" (FSP matrices).
* Zagoruyko & Komodakis 2017, "Paying More Attention to Attention" (attention transfer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from slimkit.errors import ConfigError

__all__ = [
    "attention_map",
    "attention_transfer",
    "cosine_embedding_loss",
    "fsp_loss",
    "fsp_matrix",
    "hint_mse",
    "soft_cross_entropy",
    "soft_kl",
]


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _same_shape(name: str, student: torch.Tensor, teacher: torch.Tensor, hint: str = "") -> None:
    if student.shape != teacher.shape:
        raise ConfigError(
            f"{name}: student shape {_shape(student)} does not match teacher shape "
            f"{_shape(teacher)}{hint}"
        )


def _check_temperature(name: str, temperature: float) -> None:
    if not temperature > 0:
        raise ConfigError(f"{name}: temperature must be > 0, got {temperature!r}")


def _rows(name: str, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Logits as ``(rows, classes)``: the class dimension is the last, leading dims are rows."""
    _same_shape(name, student, teacher)
    if student.dim() == 0:
        raise ConfigError(f"{name}: logits need a class dimension, got a scalar")
    classes = student.shape[-1]
    return student.reshape(-1, classes), teacher.reshape(-1, classes)


def soft_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Hinton's soft-label loss ``T^2 * KL(p_T || p_S)``, averaged over rows ("batchmean").

    ``p_T = softmax(teacher / T)``, ``p_S = softmax(student / T)`` over the last dimension;
    ``KL(p_T || p_S) = sum_c p_T,c * (log p_T,c - log p_S,c)``. Leading dimensions are rows (a
    ``(batch, tokens, classes)`` tensor averages over batch and tokens). The ``T^2`` factor keeps
    the gradient's size independent of ``T`` (Hinton et al. 2015, section 2). Zero when
    ``student_logits == teacher_logits``.
    """
    _check_temperature("soft_kl", temperature)
    student, teacher = _rows("soft_kl", student_logits, teacher_logits.detach())
    log_p_s = F.log_softmax(student / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


def soft_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Soft-label cross-entropy ``H(p_T, p_S) = -sum_c p_T,c * log p_S,c``, averaged over rows.

    PaddleSlim's ``soft_label_loss`` (softmax with soft-label cross-entropy): both sides are
    softened by ``T`` and there is no ``T^2`` factor. It equals ``soft_kl / T^2 + H(p_T)``, so
    its minimum is the teacher's entropy (not zero) and its gradient is ``soft_kl``'s over ``T^2``.
    """
    _check_temperature("soft_cross_entropy", temperature)
    student, teacher = _rows("soft_cross_entropy", student_logits, teacher_logits.detach())
    p_t = F.softmax(teacher / temperature, dim=-1)
    log_p_s = F.log_softmax(student / temperature, dim=-1)
    return -(p_t * log_p_s).sum(dim=-1).mean()


def hint_mse(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss: mean squared error ``mean((S - T)^2)`` over every element.

    The shapes must be equal; put an adapter (:func:`~slimkit.distill.make_adapter`) on the student
    side when the widths differ (Romero et al. 2015 call it the regressor).
    """
    _same_shape("hint_mse", student_feat, teacher_feat, "; bridge them with make_adapter")
    return F.mse_loss(student_feat, teacher_feat.detach(), reduction="mean")


def fsp_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The FSP ("flow of solution procedure") matrix of two feature maps of one network.

    ``a``: ``(N, C1, H, W)``, ``b``: ``(N, C2, H, W)`` (same spatial size);
    ``G[n, i, j] = sum_{h,w} a[n, i, h, w] * b[n, j, h, w] / (H * W)``, shape ``(N, C1, C2)``
    (Yim et al. 2017, eq. 1).
    """
    if a.dim() != 4 or b.dim() != 4:
        raise ConfigError(
            f"fsp_matrix: expects two 4-D (N, C, H, W) feature maps, got shapes {_shape(a)} "
            f"and {_shape(b)}"
        )
    if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ConfigError(
            f"fsp_matrix: feature maps {_shape(a)} and {_shape(b)} differ in batch or spatial "
            "size; pick two layers with the same H x W"
        )
    h, w = a.shape[2:]
    return torch.bmm(a.flatten(2), b.flatten(2).transpose(1, 2)) / (h * w)


def fsp_loss(s_pair: Sequence[torch.Tensor], t_pair: Sequence[torch.Tensor]) -> torch.Tensor:
    """FSP loss: ``mean((G_S - G_T)^2)`` between the student's and the teacher's FSP matrices.

    ``s_pair = (a_S, b_S)``, ``t_pair = (a_T, b_T)``; ``G = fsp_matrix(a, b)``. Yim et al. 2017
    (eq. 2) use the squared L2 norm per pair; the mean (as PaddleSlim's ``fsp_loss``) keeps the
    value independent of the channel counts. The student's channels must equal the teacher's
    (adapt the student maps first when they differ).
    """
    if len(s_pair) != 2 or len(t_pair) != 2:
        raise ConfigError(
            f"fsp_loss: expects two feature maps per side, got {len(s_pair)} and {len(t_pair)}"
        )
    g_s = fsp_matrix(*s_pair)
    g_t = fsp_matrix(*(t.detach() for t in t_pair))
    _same_shape("fsp_loss", g_s, g_t, " (FSP matrices, N x C1 x C2)")
    return F.mse_loss(g_s, g_t, reduction="mean")


def _spatial_map(feat: torch.Tensor, p: float, name: str) -> torch.Tensor:
    """``F(A) = sum_c |A_c|^p`` as ``(N, 1, H, W)`` (not normalised)."""
    if feat.dim() != 4:
        raise ConfigError(f"{name}: expects a 4-D (N, C, H, W) feature map, got {_shape(feat)}")
    if not p > 0:
        raise ConfigError(f"{name}: p must be > 0, got {p!r}")
    return feat.abs().pow(p).sum(dim=1, keepdim=True)


def attention_map(feat: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Spatial attention map of a ``(N, C, H, W)`` feature map, shape ``(N, H * W)``.

    ``Q = vec(F(A)) / ||vec(F(A))||_2`` with ``F(A) = sum_c |A_c|^p`` (Zagoruyko & Komodakis
    2017, section 3.1; ``p = 2`` as in the paper's experiments). Independent of the channel count.
    """
    spatial = _spatial_map(feat, p, "attention_map")
    return F.normalize(spatial.flatten(1), p=2, dim=1)


def attention_transfer(s: torch.Tensor, t: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Attention transfer: ``mean((Q_S - Q_T)^2)`` between normalised attention maps.

    As the authors' reference code (``at_loss``). Channel counts may differ. When the spatial
    sizes differ, the un-normalised map ``F(A)`` of the larger side is adaptive-average-pooled to
    the smaller size before normalising; the batch sizes must be equal.
    """
    map_s = _spatial_map(s, p, "attention_transfer")
    map_t = _spatial_map(t.detach(), p, "attention_transfer")
    if s.shape[0] != t.shape[0]:
        raise ConfigError(
            f"attention_transfer: student shape {_shape(s)} and teacher shape {_shape(t)} "
            "differ in batch size"
        )
    size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
    if tuple(map_s.shape[2:]) != size:
        map_s = F.adaptive_avg_pool2d(map_s, size)
    if tuple(map_t.shape[2:]) != size:
        map_t = F.adaptive_avg_pool2d(map_t, size)
    q_s = F.normalize(map_s.flatten(1), p=2, dim=1)
    q_t = F.normalize(map_t.flatten(1), p=2, dim=1)
    return (q_s - q_t).pow(2).mean()


def cosine_embedding_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``mean(1 - cos(s, t))``: cosine distance between embeddings, averaged over rows.

    The cosine is taken over the last dimension of ``(N, D)`` or ``(N, L, D)`` embeddings; a
    4-D ``(N, C, H, W)`` feature map is compared per sample as one flattened vector. The shapes
    must be equal (adapt the student first when the widths differ). Zero when ``s == t``
    (up to ``eps = 1e-8`` for all-zero rows, which count as cosine 0).
    """
    _same_shape("cosine_embedding_loss", s, t, "; bridge them with make_adapter")
    if s.dim() == 0:
        raise ConfigError("cosine_embedding_loss: expects embeddings, got a scalar")
    if s.dim() >= 4:
        s, t = s.flatten(1), t.flatten(1)
    return (1.0 - F.cosine_similarity(s, t.detach(), dim=-1, eps=1e-8)).mean()

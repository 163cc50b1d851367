"""Output agreement between a reference model and its compressed version.

Pure functions on two arrays of the same shape (torch tensors or numpy arrays), computed in
float64. Logits and embeddings are read along the last axis; all leading axes (batch, tokens) are
rows. A shape mismatch raises :class:`~slimkit.errors.ConfigError` naming both shapes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from slimkit.errors import ConfigError


def _pair(ref: Any, test: Any, what: str, *, rows: bool = False) -> tuple[np.ndarray, np.ndarray]:
    a, b = (
        x.detach().to("cpu", torch.float64).numpy()
        if isinstance(x, torch.Tensor)
        else np.asarray(x, dtype=np.float64)
        for x in (ref, test)
    )
    if a.shape != b.shape:
        raise ConfigError(
            f"{what}: reference shape {tuple(a.shape)} != test shape {tuple(b.shape)}"
        )
    if a.size == 0:
        raise ConfigError(f"{what}: inputs are empty (shape {tuple(a.shape)})")
    if rows:
        if a.ndim == 0:
            raise ConfigError(f"{what}: expected at least 1 dim (..., classes), got a scalar")
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return a, b


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def top1_agreement(ref_logits: Any, test_logits: Any) -> float:
    """Fraction of rows whose argmax over the last axis is the same in both."""
    a, b = _pair(ref_logits, test_logits, "top1_agreement", rows=True)
    return float(np.mean(a.argmax(axis=-1) == b.argmax(axis=-1)))


def mean_kl_divergence(ref_logits: Any, test_logits: Any, temperature: float = 1.0) -> float:
    """Mean over rows of KL(softmax(ref / T) || softmax(test / T)), in nats."""
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    a, b = _pair(ref_logits, test_logits, "mean_kl_divergence", rows=True)
    log_p, log_q = _log_softmax(a / temperature), _log_softmax(b / temperature)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    return max(float(kl.mean()), 0.0)


def cosine_similarity_stats(ref_emb: Any, test_emb: Any) -> dict[str, float]:
    """Row-wise cosine similarity: ``mean``, ``min`` and 5th percentile ``p5``.

    Two all-zero rows count as 1.0; one all-zero row against a non-zero one as 0.0.
    """
    a, b = _pair(ref_emb, test_emb, "cosine_similarity_stats", rows=True)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    denom = na * nb
    cos = np.where(denom > 0, (a * b).sum(axis=-1) / np.where(denom > 0, denom, 1.0), 0.0)
    cos = np.where((na == 0) & (nb == 0), 1.0, np.clip(cos, -1.0, 1.0))
    return {
        "mean": float(cos.mean()),
        "min": float(cos.min()),
        "p5": float(np.percentile(cos, 5)),
    }


def max_abs_error(ref: Any, test: Any) -> float:
    """Largest absolute elementwise difference."""
    a, b = _pair(ref, test, "max_abs_error")
    return float(np.abs(a - b).max())


def relative_l2_error(ref: Any, test: Any) -> float:
    """``||test - ref|| / ||ref||`` over all elements (0.0 if both are zero, inf if only ref is)."""
    a, b = _pair(ref, test, "relative_l2_error")
    diff, norm = float(np.linalg.norm(a - b)), float(np.linalg.norm(a))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / norm


__all__ = [
    "cosine_similarity_stats",
    "max_abs_error",
    "mean_kl_divergence",
    "relative_l2_error",
    "top1_agreement",
]

"""Importance of individual weights for magnitude pruning (pure functions over tensors).

* ``magnitude``: ``|w|``.
* ``ema``: exponential moving average of ``|w|``, updated every optimizer step:
  ``ema <- alpha * ema + (1 - alpha) * |w|`` (EasyCompression's ``ema_alpha``; larger alpha =
  longer memory). It smooths out weights that oscillate around zero during fine-tuning.
* ``taylor``: first-order Taylor estimate of the loss change when a weight is removed,
  ``|w * dL/dw|``, averaged over the optimizer steps since the last mask update.
* ``lamp``: magnitude rescaled per layer (:func:`lamp_score`), for ``ranking="global"``.

Under ``DistributedDataParallel`` the weights and (reduced) gradients these read are the same on
every rank; :class:`~slimkit.prune.magnitude.MagnitudePruning` still averages the ``ema`` and
``taylor`` accumulators over the ranks before each ranking and broadcasts rank 0's masks.
"""

from __future__ import annotations

from typing import Literal

import torch

ImportanceName = Literal["magnitude", "ema", "taylor", "lamp"]
IMPORTANCES: tuple[str, ...] = ("magnitude", "ema", "taylor", "lamp")


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs()


def ema_update(ema: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """One EMA step of ``|w|`` (returns a new tensor)."""
    return alpha * ema + (1.0 - alpha) * weight.detach().abs()


def taylor_score(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``|w * g|`` for one step."""
    return (weight.detach() * grad.detach()).abs()


def lamp_score(score: torch.Tensor) -> torch.Tensor:
    """LAMP (Lee et al., ICLR 2021): layer-adaptive magnitude for global ranking.

    ``s_u = w_u^2 / sum_{v : w_v^2 >= w_u^2} w_v^2`` within one layer: the share of the layer's
    remaining squared norm that a weight carries. Comparable across layers, so one global
    threshold no longer starves layers whose weights are small in absolute terms.
    """
    magnitude = score.detach().double().reshape(-1).abs()
    peak = magnitude.max() if magnitude.numel() else torch.tensor(0.0, dtype=torch.float64)
    squared = (magnitude / peak if peak > 0 else magnitude) ** 2  # scale-free: avoids underflow
    order = torch.argsort(squared, stable=True)
    sorted_sq = squared[order]
    suffix = torch.flip(torch.cumsum(torch.flip(sorted_sq, [0]), 0), [0])
    out = torch.empty_like(squared)
    out[order] = sorted_sq / suffix.clamp_min(torch.finfo(torch.float64).tiny)
    return out.reshape(score.shape).to(score.dtype)

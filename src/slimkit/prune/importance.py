"""Importance of individual weights for magnitude pruning (pure functions over tensors).

* ``magnitude``: ``|w|``.
* ``ema``: exponential moving average of ``|w|``, updated every optimizer step:
  ``ema <- alpha * ema + (1 - alpha) * |w|`` (EasyCompression's ``ema_alpha``; larger alpha =
  longer memory). It smooths out weights that oscillate around zero during fine-tuning.
* ``taylor``: first-order Taylor estimate of the loss change when a weight is removed,
  ``|w * dL/dw|``, averaged over the optimizer steps since the last mask update.
"""

from __future__ import annotations

from typing import Literal

import torch

ImportanceName = Literal["magnitude", "ema", "taylor"]
IMPORTANCES: tuple[str, ...] = ("magnitude", "ema", "taylor")


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs()


def ema_update(ema: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """One EMA step of ``|w|`` (returns a new tensor)."""
    return alpha * ema + (1.0 - alpha) * weight.detach().abs()


def taylor_score(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``|w * g|`` for one step."""
    return (weight.detach() * grad.detach()).abs()

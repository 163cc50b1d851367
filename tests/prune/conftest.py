"""Fixtures for structured pruning: a small residual CNN, its inputs, a cheap metric, and its
sensitivity curves (measured once per module)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from slimkit.models import DigitsResNet
from slimkit.prune.groups import ChannelSelection
from slimkit.prune.sensitivity import SensitivityReport, measure_sensitivity

INPUTS = (torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)),)
PROBE = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))
SELECTION = ChannelSelection(round_to=1)


def small_resnet(seed: int = 0) -> nn.Module:
    """DigitsResNet of width 8 (six prunable groups), in eval mode."""
    torch.manual_seed(seed)
    return DigitsResNet(width=8).eval()


@dataclass
class Agreement:
    """Share of probe inputs whose predicted class matches the unpruned model's; counts calls."""

    reference: torch.Tensor
    calls: int = 0

    def __call__(self, model: nn.Module) -> float:
        self.calls += 1
        with torch.no_grad():
            predicted = model.eval()(PROBE).argmax(1)
        return (predicted == self.reference).float().mean().item()


def agreement(model: nn.Module) -> Agreement:
    with torch.no_grad():
        return Agreement(model.eval()(PROBE).argmax(1))


@pytest.fixture(scope="session")
def curves_report() -> SensitivityReport:
    """Sensitivity of ``small_resnet()`` (round_to 1, default grid)."""
    model = small_resnet()
    return measure_sensitivity(model, INPUTS, agreement(model), config=SELECTION, progress=False)

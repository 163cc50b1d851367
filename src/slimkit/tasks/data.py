"""The bundled digits data (scikit-learn's 8x8 digits, no download) and small train/eval helpers.

>>> split = load_digits_split(seed=0)
>>> len(split.train) + len(split.val) + len(split.test)
1797
>>> images, labels = split.train.tensors
>>> tuple(images.shape[1:]), images.dtype, labels.dtype
((1, 8, 8), torch.float32, torch.int64)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from slimkit.errors import ConfigError

__all__ = [
    "DigitsLoaders",
    "DigitsSplit",
    "evaluate_accuracy",
    "load_digits_split",
    "predict_logits",
    "train_epoch",
]

Batch = tuple[torch.Tensor, torch.Tensor]


class DigitsLoaders(NamedTuple):
    """Train (shuffled, seeded), validation and test DataLoaders."""

    train: DataLoader[Batch]
    val: DataLoader[Batch]
    test: DataLoader[Batch]


@dataclass(frozen=True)
class DigitsSplit:
    """Stratified train/val/test digits: images ``N x 1 x 8 x 8`` in [0, 1], int64 labels."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int = 10
    input_shape: tuple[int, int, int] = (1, 8, 8)

    def loaders(self, batch_size: int = 64, seed: int = 0) -> DigitsLoaders:
        """DataLoaders (``num_workers=0``); the train order depends only on ``seed``."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        generator = torch.Generator().manual_seed(seed)
        return DigitsLoaders(
            train=DataLoader(self.train, batch_size, shuffle=True, generator=generator),
            val=DataLoader(self.val, batch_size, shuffle=False),
            test=DataLoader(self.test, batch_size, shuffle=False),
        )


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    labels = data.target.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.tensor(images), torch.tensor(labels))


def load_digits_split(
    seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15
) -> DigitsSplit:
    """Split the 1797 digits into stratified train/val/test sets, reproducibly for ``seed``."""
    from sklearn.model_selection import train_test_split

    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ConfigError(f"{name} must be in (0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            f"val_fraction + test_fraction must be below 1, got {val_fraction} + {test_fraction}"
        )
    images, labels = _raw_digits()
    rest_x, test_x, rest_y, test_y = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    train_x, val_x, train_y, val_y = train_test_split(
        rest_x,
        rest_y,
        test_size=val_fraction / (1.0 - test_fraction),
        stratify=rest_y,
        random_state=seed,
    )
    return DigitsSplit(
        train=_dataset(train_x, train_y),
        val=_dataset(val_x, val_y),
        test=_dataset(test_x, test_y),
    )


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Switch to eval mode and back, restoring every submodule's own ``training`` flag."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def train_epoch(
    model: nn.Module,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    on_step: Callable[[], None] | None = None,
) -> float:
    """One pass over ``(inputs, targets)`` batches in train mode; returns the mean loss per sample.

    ``on_step()`` is called after every ``optimizer.step()``. The model is left in train mode.
    """
    device = _device_of(model)
    model.train()
    total, count = 0.0, 0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step()
        total += loss.item() * len(targets)
        count += len(targets)
    if count == 0:
        raise ConfigError("train_epoch: the loader yielded no batches")
    return total / count


def predict_logits(model: nn.Module, loader: Iterable[Batch]) -> torch.Tensor:
    """Concatenated model outputs on CPU, computed in eval mode without gradients."""
    device = _device_of(model)
    outputs = []
    with _eval_mode(model), torch.no_grad():
        for inputs, _ in loader:
            outputs.append(model(inputs.to(device)).cpu())
    if not outputs:
        raise ConfigError("predict_logits: the loader yielded no batches")
    return torch.cat(outputs)


def evaluate_accuracy(model: nn.Module, loader: Iterable[Batch]) -> float:
    """Top-1 accuracy in [0, 1] in eval mode without gradients; restores the previous mode."""
    device = _device_of(model)
    correct, count = 0, 0
    with _eval_mode(model), torch.no_grad():
        for inputs, targets in loader:
            predictions = model(inputs.to(device)).argmax(dim=-1).cpu()
            correct += int((predictions == targets).sum())
            count += len(targets)
    if count == 0:
        raise ConfigError("evaluate_accuracy: the loader yielded no batches")
    return correct / count

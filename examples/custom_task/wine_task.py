"""A complete user task: your own model and data, compressed by a slimkit recipe.

A recipe names it as ``task: wine_task:make_task`` (``module:function``). slimkit imports the
module (from an installed package, ``PYTHONPATH``, or the current directory) and calls the
function with ``seed`` and ``batch_size``; it must return a :class:`slimkit.Task`. This runs
your code, by design.

Run from this folder::

    slimkit compress recipe.yaml

The data is scikit-learn's bundled wine dataset (178 samples, 13 features, 3 classes); the model
is a small MLP. Everything a run needs is in the Task below: how to build the model, the training
batches of one epoch (their order fixed by a seed), validation and test data, a metric where
higher is better, and example inputs (used for ONNX export, FLOPs and latency).
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_wine
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from slimkit import Task


class WineMLP(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(13, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )
        self.head = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def accuracy(model: nn.Module, loader) -> float:
    """Top-1 accuracy; ``model`` may also be slimkit's ONNX Runtime wrapper (OrtModule)."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(dim=-1) == y).sum())
            total += len(y)
    return correct / total


def make_task(*, seed: int = 0, batch_size: int = 32) -> Task:
    data = load_wine()
    x = (data.data - data.data.mean(axis=0)) / data.data.std(axis=0)  # standardise features
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, data.target, test_size=0.4, random_state=seed, stratify=data.target
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, random_state=seed, stratify=y_rest
    )

    def tensors(a, b) -> TensorDataset:
        return TensorDataset(torch.tensor(a, dtype=torch.float32), torch.tensor(b))

    train = tensors(x_train, y_train)

    def train_loader(epoch_seed: int) -> DataLoader:
        generator = torch.Generator().manual_seed(epoch_seed)
        return DataLoader(train, batch_size, shuffle=True, generator=generator)

    return Task(
        name="wine",
        make_model=WineMLP,
        train_loader=train_loader,
        val_loader=DataLoader(tensors(x_val, y_val), batch_size=256),
        test_loader=DataLoader(tensors(x_test, y_test), batch_size=256),
        metric=accuracy,
        example_inputs=(torch.zeros(1, 13),),
        metric_name="accuracy",
        # forward(model, batch) and loss(outputs, batch) default to model(batch[0]) and
        # cross-entropy against batch[1]; pass your own for other batch layouts.
    )

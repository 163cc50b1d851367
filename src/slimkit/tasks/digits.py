"""The built-in ``digits`` task: scikit-learn's bundled 8x8 digits and a small residual CNN."""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.data import DataLoader

from slimkit.models.cnn import DigitsResNet
from slimkit.tasks.base import Task
from slimkit.tasks.data import evaluate_accuracy, load_digits_split


def make_digits_task(*, seed: int = 0, batch_size: int = 64, width: int = 16) -> Task:
    """Digits classification (1797 images, fixed stratified 70/15/15 split from ``seed``)."""
    split = load_digits_split(seed=seed)
    loaders = split.loaders(batch_size=batch_size, seed=seed)

    def train_loader(epoch_seed: int) -> DataLoader:
        generator = torch.Generator().manual_seed(epoch_seed)
        return DataLoader(split.train, batch_size, shuffle=True, generator=generator)

    return Task(
        name="digits",
        make_model=partial(DigitsResNet, width=width, num_classes=split.num_classes),
        train_loader=train_loader,
        val_loader=loaders.val,
        test_loader=loaders.test,
        metric=evaluate_accuracy,
        example_inputs=(torch.zeros(1, *split.input_shape),),
        metric_name="accuracy",
        info={
            "dataset": "sklearn.datasets.load_digits",
            "train": len(split.train),
            "val": len(split.val),
            "test": len(split.test),
        },
    )

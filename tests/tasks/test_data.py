"""Tests for the bundled digits split, its loaders, and the train/evaluate helpers."""

from __future__ import annotations

import doctest
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from slimkit.errors import ConfigError
from slimkit.models import DigitsResNet
from slimkit.tasks import data
from slimkit.tasks.data import (
    DigitsSplit,
    evaluate_accuracy,
    load_digits_split,
    predict_logits,
    train_epoch,
)


@pytest.fixture(scope="module")
def split() -> DigitsSplit:
    return load_digits_split(seed=0)


def _labels(dataset: TensorDataset) -> torch.Tensor:
    return dataset.tensors[1]


def test_split_sizes_types_and_range(split: DigitsSplit) -> None:
    sizes = [len(split.train), len(split.val), len(split.test)]
    assert sum(sizes) == 1797
    assert sizes == [1257, 270, 270]
    for dataset in (split.train, split.val, split.test):
        images, labels = dataset.tensors
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert images.shape[1:] == (1, 8, 8)
        assert images.min() >= 0.0 and images.max() <= 1.0
    assert split.train.tensors[0].max() == 1.0  # scaled by 16, not by the observed max
    assert (split.num_classes, split.input_shape) == (10, (1, 8, 8))


def test_split_is_stratified(split: DigitsSplit) -> None:
    everything = torch.cat([_labels(d) for d in (split.train, split.val, split.test)])
    overall = torch.bincount(everything, minlength=10).double() / len(everything)
    for dataset in (split.train, split.val, split.test):
        counts = torch.bincount(_labels(dataset), minlength=10)
        assert (counts > 0).all()
        assert (counts.double() / len(dataset) - overall).abs().max() < 0.03


def test_splits_are_disjoint(split: DigitsSplit) -> None:
    rows = [d.tensors[0].flatten(1) for d in (split.train, split.val, split.test)]
    keys = [{tuple(row.tolist()) for row in part} for part in rows]
    overlap = (keys[0] & keys[1]) | (keys[0] & keys[2]) | (keys[1] & keys[2])
    assert len(overlap) <= 5  # digits holds a handful of duplicate images, nothing more


def test_split_is_deterministic_per_seed(split: DigitsSplit) -> None:
    again, other = load_digits_split(seed=0), load_digits_split(seed=1)
    for name in ("train", "val", "test"):
        first, second = getattr(split, name).tensors, getattr(again, name).tensors
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(split.test.tensors[0], other.test.tensors[0])


def test_split_fractions() -> None:
    custom = load_digits_split(seed=3, val_fraction=0.1, test_fraction=0.2)
    assert len(custom.test) == 360 and len(custom.val) == 180


@pytest.mark.parametrize(("val", "test"), [(0.0, 0.2), (0.2, 1.0), (0.5, 0.5), (-0.1, 0.1)])
def test_bad_fractions_raise_config_error(val: float, test: float) -> None:
    with pytest.raises(ConfigError, match="fraction"):
        load_digits_split(val_fraction=val, test_fraction=test)


def test_loaders_are_seeded_and_eval_is_ordered(split: DigitsSplit) -> None:
    def order(seed: int) -> torch.Tensor:
        return torch.cat([labels for _, labels in split.loaders(32, seed=seed).train])

    assert torch.equal(order(5), order(5))
    assert not torch.equal(order(5), order(6))
    loaders = split.loaders(batch_size=100)
    assert loaders.train.num_workers == 0
    assert torch.equal(torch.cat([y for _, y in loaders.test]), _labels(split.test))
    assert torch.equal(torch.cat([x for x, _ in loaders.val]), split.val.tensors[0])
    assert [len(y) for _, y in loaders.val] == [100, 100, 70]
    with pytest.raises(ConfigError, match="batch_size"):
        split.loaders(batch_size=0)


def _tiny_loader(count: int = 40, batch_size: int = 8) -> DataLoader:
    torch.manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(count, 4), torch.randint(0, 3, (count,))), batch_size
    )


def test_train_epoch_steps_and_reduces_loss() -> None:
    loader = _tiny_loader()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    steps: list[int] = []
    model.eval()
    losses = [train_epoch(model, loader, optimizer, on_step=lambda: steps.append(1))]
    assert model.training
    assert len(steps) == 5
    losses += [train_epoch(model, loader, optimizer) for _ in range(20)]
    assert all(isinstance(loss, float) for loss in losses)
    assert losses[-1] < 0.8 * losses[0]


def test_train_epoch_uses_loss_fn() -> None:
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss = train_epoch(model, _tiny_loader(), optimizer, loss_fn=lambda out, y: out.sum() * 0 + 2)
    assert loss == pytest.approx(2.0)


def test_predict_and_accuracy_agree_and_restore_modes() -> None:
    loader = _tiny_loader()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    model.train()
    model[0].eval()  # a mixed state must come back exactly as it was
    logits = predict_logits(model, loader)
    accuracy = evaluate_accuracy(model, loader)
    assert model.training and not model[0].training and model[1].training
    targets = torch.cat([y for _, y in loader])
    assert logits.shape == (40, 3) and not logits.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(logits, model[0](torch.cat([x for x, _ in loader])))
    assert accuracy == pytest.approx((logits.argmax(1) == targets).double().mean().item())
    model.eval()
    evaluate_accuracy(model, loader)
    assert not model.training


@pytest.mark.parametrize("helper", [evaluate_accuracy, predict_logits])
def test_empty_loader_raises(helper) -> None:
    with pytest.raises(ConfigError, match="no batches"):
        helper(nn.Linear(4, 3), [])


def test_digits_resnet_learns_digits_in_a_few_seconds(split: DigitsSplit) -> None:
    torch.manual_seed(0)
    model = DigitsResNet()
    loaders = split.loaders(batch_size=64, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for _ in range(4):
        train_epoch(model, loaders.train, optimizer)
    elapsed = time.perf_counter() - start
    accuracy = evaluate_accuracy(model, loaders.test)
    assert model.training
    assert accuracy >= 0.95, f"test accuracy {accuracy:.3f}"
    assert elapsed < 20.0, f"4 epochs took {elapsed:.1f} s"


def test_docstring_examples_run() -> None:
    result = doctest.testmod(data, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0

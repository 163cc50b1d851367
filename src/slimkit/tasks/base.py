"""Task: what a run needs from the user — model factory, data, loss, metric.

A user's own task is ``"package.module:function"`` in a recipe; slimkit imports that module (an
installed package, ``PYTHONPATH``, or the current directory) and calls the function with ``seed``
and ``batch_size`` (this runs the user's code, by design) and expects a :class:`Task` back. See
``examples/custom_task/`` for a complete one.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimkit.errors import ConfigError

Batch = Any


def _forward_first(model: nn.Module, batch: Batch) -> Any:
    return model(batch[0])


def _cross_entropy(outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, batch[1])


@dataclass
class Task:
    """Everything a compression run needs; the metric is "higher is better".

    ``train_loader(seed)`` returns an iterable of batches for one epoch (order fixed by ``seed``);
    ``forward(model, batch)`` runs the model; ``loss(outputs, batch)`` is the task loss;
    ``metric(model, loader)`` evaluates; ``example_inputs`` are used for export and latency.
    """

    name: str
    make_model: Callable[[], nn.Module]
    train_loader: Callable[[int], Iterable[Batch]]
    val_loader: Iterable[Batch]
    test_loader: Iterable[Batch]
    metric: Callable[[nn.Module, Iterable[Batch]], float]
    example_inputs: tuple[torch.Tensor, ...]
    metric_name: str = "accuracy"
    forward: Callable[[nn.Module, Batch], Any] = _forward_first
    loss: Callable[[Any, Batch], torch.Tensor] = _cross_entropy
    info: dict[str, Any] = field(default_factory=dict)


BUILTIN_TASKS: dict[str, str] = {
    "digits": "slimkit.tasks.digits:make_digits_task",
    "sentence-embedding": "slimkit.tasks.sentences:make_sentence_task",
}


def load_task(spec: str, **kwargs: Any) -> Task:
    """Build a task from a built-in name or ``"module:function"`` (runs that user code)."""
    target = BUILTIN_TASKS.get(spec, spec)
    if ":" not in target:
        raise ConfigError(
            f"unknown task {spec!r}; expected a built-in ({', '.join(sorted(BUILTIN_TASKS))}) "
            "or 'package.module:function'"
        )
    module_name, _, attr = target.partition(":")
    if spec not in BUILTIN_TASKS and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: a task module next to the recipe
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"task {spec!r}: cannot import module {module_name!r} ({exc})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"task {spec!r}: {module_name!r} has no function {attr!r}")
    task = factory(**kwargs)
    if not isinstance(task, Task):
        raise ConfigError(
            f"task {spec!r}: {attr}() returned {type(task).__name__}, expected slimkit.Task"
        )
    return task

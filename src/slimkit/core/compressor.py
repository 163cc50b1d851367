"""The Compressor drives techniques from any training loop.

::

    compressor = Compressor([MagnitudePruning(cfg)]).apply(model)
    compressor.before_training(calibration_batches)     # QAT range init (no-op for pruning)
    for batch in loader:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss = loss + compressor.loss(outputs, batch)   # only where a technique adds a loss
        loss.backward(); optimizer.step()
        compressor.step()                               # after optimizer.step(), before the
                                                        # next zero_grad (taylor reads .grad)
    compressor.after_training(calibration_batches)      # static PTQ calibration
    plain = compressor.finalize()

It never owns the optimizer or the data; it only sees the batches it is handed.
``state_dict``/``load_state_dict`` resume exactly.

With ``DistributedDataParallel``, apply the compressor to the plain model on every rank, then
wrap the model for training; call ``step`` on every rank. Techniques keep their decisions the
same on every rank (see :mod:`slimkit.distributed`). A DDP-wrapped or FSDP-sharded model is
refused with an :class:`~slimkit.errors.UnsupportedModuleError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from slimkit.core.config import Config
from slimkit.core.technique import Technique, TechniqueSummary, make_technique
from slimkit.distributed import check_unsharded
from slimkit.errors import StateError

STATE_VERSION = 1


class Compressor:
    """Holds techniques, counts optimizer steps, and calls each technique's life cycle."""

    def __init__(
        self, techniques: Sequence[Technique | Config], *, example_inputs: Any = None
    ) -> None:
        self.techniques: list[Technique] = [
            t if isinstance(t, Technique) else make_technique(t) for t in techniques
        ]
        if example_inputs is not None:  # for techniques that trace the model (structured, KD)
            for technique in self.techniques:
                if technique.example_inputs is None:
                    technique.example_inputs = example_inputs
        self.model: nn.Module | None = None
        self.step_count = 0
        self.finalized = False
        self.updated: list[Technique] = []

    def apply(self, model: nn.Module) -> Compressor:
        """Attach every technique to ``model`` and run step 0 (one-shot schedules act now)."""
        if self.model is not None:
            raise StateError("this Compressor is already applied to a model")
        check_unsharded(model, "Compressor.apply")
        for technique in self.techniques:
            technique.apply(model)
        self.model = model
        self.updated = [t for t in self.techniques if t.step(self.step_count)]
        return self

    def step(self) -> None:
        """Call once after each ``optimizer.step()``."""
        self._require_model()
        self.step_count += 1
        self.updated = [t for t in self.techniques if t.step(self.step_count)]

    def before_training(self, batches: Iterable[Any], *, progress: bool = False) -> list[str]:
        """Give ``batches`` to each technique that needs data before training; their kinds.

        ``batches`` is re-iterated per technique: pass a re-iterable (a list, a DataLoader).
        """
        model = self._require_model()
        return [
            t.kind for t in self.techniques if t.before_training(model, batches, progress=progress)
        ]

    def after_training(self, batches: Iterable[Any], *, progress: bool = False) -> list[str]:
        """Give ``batches`` to each technique that needs data after training (calibration)."""
        model = self._require_model()
        return [
            t.kind for t in self.techniques if t.after_training(model, batches, progress=progress)
        ]

    def parameters(self) -> Iterator[nn.Parameter]:
        """The techniques' own trainable parameters (add them to the optimizer)."""
        for technique in self.techniques:
            yield from technique.parameters()

    @property
    def parameters_replaced(self) -> bool:
        """True when the last ``apply``/``step`` replaced model parameters (rebuild optimizer)."""
        return any(t.parameters_replaced for t in self.techniques)

    @property
    def task_loss_weight(self) -> float:
        """Product of the techniques' task-loss weights: scale the task loss by it."""
        weight = 1.0
        for technique in self.techniques:
            weight *= technique.task_loss_weight
        return weight

    def loss(self, outputs: Any = None, batch: Any = None) -> torch.Tensor | float:
        """Sum of the techniques' extra loss terms (0.0 when none adds one)."""
        total: torch.Tensor | float = 0.0
        for technique in self.techniques:
            total = total + technique.loss(outputs, batch)
        return total

    def finalize(self) -> nn.Module:
        """Finalize techniques in reverse order of application and return the plain model."""
        model = self._require_model()
        for technique in reversed(self.techniques):
            model = technique.finalize(model)
        self.model = model
        self.finalized = True
        return model

    def summaries(self) -> list[TechniqueSummary]:
        return [t.summary() for t in self.techniques]

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "step_count": self.step_count,
            "techniques": [t.state_dict() for t in self.techniques],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore technique state; call after ``apply`` and after loading the model's state."""
        self._require_model()
        if state.get("version") != STATE_VERSION:
            raise StateError(
                f"compressor state version {state.get('version')!r} is not {STATE_VERSION}"
            )
        saved = state["techniques"]
        if [s.get("kind") for s in saved] != [t.kind for t in self.techniques]:
            raise StateError(
                "compressor state holds techniques "
                f"{[s.get('kind') for s in saved]}, this compressor has "
                f"{[t.kind for t in self.techniques]}"
            )
        for technique, technique_state in zip(self.techniques, saved, strict=True):
            technique.load_state_dict(technique_state)
        self.step_count = int(state["step_count"])

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise StateError("call Compressor.apply(model) before step/finalize/load_state_dict")
        if self.finalized:
            raise StateError("this Compressor is finalized; its techniques hold no state any more")
        return self.model

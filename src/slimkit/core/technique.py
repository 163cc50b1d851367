"""The Technique life cycle and the explicit technique registry.

``apply(model)`` attaches state to the modules a :class:`~slimkit.core.scope.Scope` selects;
``before_training``/``after_training`` get batches of data where a technique needs them (range
initialisation, calibration); ``step(step)`` is called once per optimizer step;
``loss(outputs, batch)`` adds a loss term (zero by default); ``finalize(model)`` returns a plain
model and ``export_onnx`` writes it in the technique's deployable form (int8 QDQ, ...);
``state_dict``/``load_state_dict`` hold what resuming needs beyond the model's own state dict
(buffers on the model travel with it).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from slimkit.core.config import Config
from slimkit.core.scope import Selection
from slimkit.errors import ConfigError, StateError


@dataclass
class TechniqueSummary:
    """Per-layer facts a technique reports after a run (rendered as a table by the report)."""

    technique: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "technique": self.technique,
            "layers": [dict(zip(self.columns, row, strict=True)) for row in self.rows],
            "totals": self.totals,
            "skipped": [{"module": n, "reason": r} for n, r in self.skipped],
        }


@dataclass
class RunContext:
    """What a recipe run offers techniques before they are applied to a stage's model.

    ``baseline``: the trained starting model (never trained further); ``stage_input``: the model
    as it enters the stage; ``make_model``: builds a fresh task model; ``forward(model, batch)``
    runs a model on a batch the way the task does; ``evaluate(model)``: the validation metric.
    """

    baseline: nn.Module
    stage_input: nn.Module
    make_model: Callable[[], nn.Module]
    forward: Callable[[nn.Module, Any], Any]
    evaluate: Callable[[nn.Module], float] | None = None  # validation metric, higher is better
    work_dir: Path | None = None  # where a technique may cache what it measured


class Technique(abc.ABC):
    """Base class of every compression technique (see the module docstring)."""

    kind: ClassVar[str]
    config_class: ClassVar[type[Config]]

    def __init__(self, config: Config) -> None:
        if not isinstance(config, self.config_class):
            raise ConfigError(
                f"{type(self).__name__} expects a {self.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        self.config = config
        # inputs for a dry run of the model, for techniques that trace it (a Compressor given
        # example_inputs fills it in where a technique has none)
        self.example_inputs: Any = None
        self.selection: Selection | None = None
        self.current_step = 0
        self._model: nn.Module | None = None

    # --- life cycle -----------------------------------------------------------------------
    @abc.abstractmethod
    def plan(self, model: nn.Module) -> Selection:
        """Which modules ``apply`` would touch and which it skips, with reasons; no side effects."""

    @abc.abstractmethod
    def apply(self, model: nn.Module) -> None:
        """Attach state to the selected modules of ``model`` (idempotent per model)."""

    def step(self, step: int) -> bool:
        """Advance to optimizer step ``step`` (count of optimizer steps taken); True if it acted."""
        self.current_step = step
        return False

    def bind_run(self, context: RunContext) -> None:
        """Take what the technique needs from the run (a teacher, ...) before ``apply``."""
        return None

    def parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters the technique owns besides the model's (KD adapters); the
        training loop adds them to its optimizer."""
        return iter(())

    @property
    def parameters_replaced(self) -> bool:
        """True right after a step that replaced model parameters (structured pruning slices
        layers): the training loop must rebuild its optimizer."""
        return False

    @property
    def task_loss_weight(self) -> float:
        """Factor for the task loss while this technique acts (1.0; distillation may lower it)."""
        return 1.0

    def before_training(
        self, model: nn.Module, batches: Iterable[Any], *, progress: bool = False
    ) -> bool:
        """Data-dependent setup before training (QAT's range init); True if it used the data."""
        return False

    def after_training(
        self, model: nn.Module, batches: Iterable[Any], *, progress: bool = False
    ) -> bool:
        """Data-dependent work after training (static PTQ calibration); True if it used the data."""
        return False

    def export_onnx(
        self, model: nn.Module, example_inputs: tuple[Any, ...], path: Path
    ) -> Path | None:
        """Write the finalized ``model`` in this technique's ONNX form (e.g. int8 QDQ) at ``path``.

        ``None``: the technique does not change how the model is exported (plain fp32 ONNX).
        """
        return None

    def rebuild(self, model: nn.Module) -> nn.Module:
        """Resume support: after ``load_state_dict``, give a fresh ``model`` (as it entered the
        technique's stage) the structure ``finalize`` left, so the saved weights load into it.
        Techniques whose finalized model is the plain architecture return it unchanged."""
        return model

    def scalars(self) -> dict[str, float]:
        """Scalars for TensorBoard (``tag -> value``); empty by default."""
        return {}

    def loss(self, outputs: Any = None, batch: Any = None) -> torch.Tensor | float:
        """Extra loss term; zero for techniques that add none."""
        return 0.0

    @abc.abstractmethod
    def finalize(self, model: nn.Module) -> nn.Module:
        """Remove slimkit state and return a plain model."""

    def summary(self) -> TechniqueSummary:
        """Per-layer report of what was done."""
        return TechniqueSummary(technique=self.kind, columns=["module"])

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "current_step": self.current_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise StateError(
                f"state for technique {state.get('kind')!r} cannot be loaded into {self.kind!r}"
            )
        self.current_step = int(state["current_step"])

    def _already_applied(self, model: nn.Module) -> bool:
        """Idempotence guard for ``apply``: True for the same model, StateError for another."""
        if self._model is model:
            return True
        if self._model is not None:
            raise StateError(f"{self.kind} is already applied to another model")
        return False

    def _require_applied(self) -> Selection:
        if self.selection is None:
            raise StateError(f"{self.kind}: call apply(model) first")
        return self.selection


TECHNIQUES: dict[str, type[Technique]] = {}


def register_technique(cls: type[Technique]) -> type[Technique]:
    """Class decorator: register a technique under its ``kind`` (explicit, never by name)."""
    if cls.kind in TECHNIQUES and TECHNIQUES[cls.kind] is not cls:
        raise ConfigError(f"technique kind {cls.kind!r} is already registered")
    TECHNIQUES[cls.kind] = cls
    return cls


def make_technique(config: Config) -> Technique:
    """Build the technique registered for ``config.kind``."""
    kind = getattr(config, "kind", None)
    if kind not in TECHNIQUES:
        raise ConfigError(
            f"unknown technique kind {kind!r}; expected one of: {', '.join(sorted(TECHNIQUES))}"
        )
    return TECHNIQUES[kind](config)


TechniqueFactory = Callable[[Config], Technique]

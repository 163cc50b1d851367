"""What the Lightning and Hugging Face callbacks share.

:class:`CompressorDriver` holds a :class:`~slimkit.core.compressor.Compressor` and the options of
a run (which submodule it compresses, calibration batches, finalize at the end) and does the parts
of the life cycle that do not depend on the framework: apply once and remember which parameters
``apply`` created, check that the optimizer holds them, combine the task loss with the
techniques' loss, flatten technique scalars for a logger, and the end of training.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Iterator, Sequence
from types import ModuleType
from typing import Any, TypeAlias

import torch
from torch import nn

from slimkit.core.compressor import Compressor
from slimkit.core.config import Config
from slimkit.core.technique import Technique
from slimkit.errors import ConfigError, StateError

Techniques: TypeAlias = (
    Compressor | Technique | Config | Sequence[Technique | Config] | str | os.PathLike
)
"""A ready :class:`Compressor`, one technique (or its config), a list of them, or a recipe: a
:class:`~slimkit.recipe.schema.Recipe` or the path of its YAML file (one stage's techniques)."""

STATE_VERSION = 1


def require(module: str, package: str, integration: str) -> ModuleType:
    """Import ``module`` or raise a one-line ConfigError naming the pip ``package``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"{integration} needs {package} ({exc.name or module} is not importable): "
            f"pip install {package}"
        ) from None


def _is_recipe(value: Any) -> bool:
    if isinstance(value, (str, os.PathLike)):
        return True
    schema = importlib.import_module("slimkit.recipe.schema")
    return isinstance(value, schema.Recipe)


def recipe_stage_techniques(recipe: Any, stage: str | int | None = None) -> list[Config]:
    """The technique configs of one stage of ``recipe`` (a Recipe or a YAML path).

    ``stage``: the stage's name or index; may be left out when the recipe has one stage.
    """
    schema = importlib.import_module("slimkit.recipe.schema")
    if isinstance(recipe, (str, os.PathLike)):
        recipe = schema.load_recipe(recipe)
    names = [s.name for s in recipe.stages]
    if stage is None:
        if len(names) > 1:
            raise ConfigError(
                f"recipe {recipe.name!r} has {len(names)} stages ({', '.join(names)}): "
                "pass stage='name' or stage=index"
            )
        index = 0
    elif isinstance(stage, bool) or not isinstance(stage, (str, int)):
        raise ConfigError(f"stage must be a stage name or index, got {stage!r}")
    elif isinstance(stage, int):
        if not -len(names) <= stage < len(names):
            raise ConfigError(
                f"stage index {stage} is out of range: recipe {recipe.name!r} has "
                f"{len(names)} stage(s) ({', '.join(names)})"
            )
        index = stage % len(names)
    elif stage in names:
        index = names.index(stage)
    else:
        raise ConfigError(
            f"recipe {recipe.name!r} has no stage {stage!r}; its stages: {', '.join(names)}"
        )
    techniques = list(recipe.stages[index].techniques)
    if not techniques:
        raise ConfigError(f"stage {names[index]!r} of recipe {recipe.name!r} has no techniques")
    return techniques


def make_compressor(
    techniques: Techniques, example_inputs: Any = None, stage: str | int | None = None
) -> Compressor:
    """A Compressor from ``techniques`` (returned as is when it is one already), or from the
    techniques of ``stage`` when ``techniques`` is a recipe (a Recipe or its YAML path)."""
    if _is_recipe(techniques):
        techniques = recipe_stage_techniques(techniques, stage)
    elif stage is not None:
        raise ConfigError("stage= selects a recipe stage: pass a recipe (or its YAML path) with it")
    if isinstance(techniques, Compressor):
        if example_inputs is not None:
            raise ConfigError(
                "example_inputs: give them to Compressor(..., example_inputs=...) when passing "
                "a ready Compressor"
            )
        return techniques
    if isinstance(techniques, (Technique, Config)):
        techniques = [techniques]
    if isinstance(techniques, (str, bytes)) or not isinstance(techniques, Sequence):
        raise ConfigError(
            "expected a Compressor, a technique, a technique config, a list of them or a recipe, "
            f"got {type(techniques).__name__}"
        )
    if not techniques:
        raise ConfigError("expected at least one technique, got an empty list")
    for item in techniques:
        if not isinstance(item, (Technique, Config)):
            raise ConfigError(
                f"expected techniques or technique configs, got a {type(item).__name__}"
            )
    return Compressor(list(techniques), example_inputs=example_inputs)


def shorten(names: Sequence[str], shown: int = 4) -> str:
    """``a, b, c, d and 3 more``."""
    rest = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {rest} more" if rest > 0 else "")


def held_parameters(optimizers: Iterable[torch.optim.Optimizer]) -> set[int]:
    """Ids of every parameter in the optimizers' param groups."""
    return {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}


class DriverAccess:
    """What a framework callback exposes of its :class:`CompressorDriver` (``self.driver``)."""

    driver: CompressorDriver

    @property
    def compressor(self) -> Compressor:
        """The :class:`~slimkit.core.compressor.Compressor` this callback drives."""
        return self.driver.compressor

    @property
    def model(self) -> nn.Module | None:
        """The compressed model (the finalized one once training ended with finalize on)."""
        finalized = self.driver.finalized_model
        return finalized if finalized is not None else self.compressor.model

    def parameters(self) -> Iterator[nn.Parameter]:
        """The techniques' own trainable parameters: the optimizer must hold them."""
        return self.driver.parameters()

    def training_loss(
        self, task_loss: torch.Tensor, outputs: Any = None, batch: Any = None
    ) -> torch.Tensor:
        """``task_loss_weight * task_loss + compressor.loss(outputs, batch)``: return it as the
        training loss, right after the student's forward on ``batch``."""
        return self.driver.training_loss(task_loss, outputs, batch)


class CompressorDriver:
    """Framework-independent half of the callbacks (see the module docstring)."""

    def __init__(
        self,
        techniques: Techniques,
        *,
        submodule: str | None = None,
        calibration_batches: Iterable[Any] | None = None,
        example_inputs: Any = None,
        finalize_at_end: bool = False,
        stage: str | int | None = None,
    ) -> None:
        if submodule is not None and (not isinstance(submodule, str) or not submodule):
            raise ConfigError(f"submodule must be a dotted attribute path, got {submodule!r}")
        self.compressor = make_compressor(techniques, example_inputs, stage)
        self.submodule = submodule
        self.calibration_batches = calibration_batches
        self.finalize_at_end = bool(finalize_at_end)
        # trainable model parameters that apply() created (QAT scales): the optimizer needs them
        self.added_parameters: list[tuple[str, nn.Parameter]] = []
        self.finalized_model: nn.Module | None = None
        self._prepared = False  # before_training ran

    # --- model ----------------------------------------------------------------------------------
    def target(self, root: nn.Module) -> nn.Module:
        """The module the compressor works on: ``root`` or its ``submodule``."""
        if self.submodule is None:
            return root
        try:
            return root.get_submodule(self.submodule)
        except AttributeError:
            raise ConfigError(
                f"submodule {self.submodule!r} not found in {type(root).__name__}; expected a "
                "dotted attribute path to the model to compress, such as 'model'"
            ) from None

    def attach(self, root: nn.Module) -> bool:
        """Apply the compressor to ``root``'s target unless it is applied already; True if now."""
        compressor = self.compressor
        if compressor.finalized:
            raise StateError(
                "this compressor is finalized; build a new compressor (and callback) for a new run"
            )
        target = self.target(root)
        if compressor.model is not None:
            if compressor.model is not target:
                raise StateError(
                    f"the compressor is applied to another model than this {type(target).__name__}"
                    " (a model_init or a copied model?); apply it to the model that is trained"
                )
            return False
        before = {id(p) for p in target.parameters()}
        compressor.apply(target)
        prefix = "" if self.submodule is None else self.submodule + "."
        self.added_parameters = [
            (prefix + name, p)
            for name, p in target.named_parameters()
            if id(p) not in before and p.requires_grad
        ]
        return True

    def require_applied(self) -> nn.Module:
        if self.compressor.model is None:
            raise StateError("the compressor is not applied yet: no training has started")
        return self.compressor.model

    # --- optimizer ------------------------------------------------------------------------------
    def parameters(self) -> Iterator[nn.Parameter]:
        """The techniques' own trainable parameters (distillation adapters)."""
        return self.compressor.parameters()

    def missing_parameters(self, optimizers: Iterable[torch.optim.Optimizer]) -> list[str]:
        """Names of trainable parameters slimkit added that no optimizer holds."""
        held = held_parameters(optimizers)
        missing = [name for name, p in self.added_parameters if id(p) not in held]
        for technique in self.compressor.techniques:
            missing += [
                f"{technique.kind} parameter {tuple(p.shape)}"
                for p in technique.parameters()
                if p.requires_grad and id(p) not in held
            ]
        return missing

    # --- loss and scalars -----------------------------------------------------------------------
    def training_loss(
        self, task_loss: torch.Tensor, outputs: Any = None, batch: Any = None
    ) -> torch.Tensor:
        """``task_loss_weight * task_loss + compressor.loss(outputs, batch)``."""
        weight = self.compressor.task_loss_weight
        loss = task_loss if weight == 1.0 else weight * task_loss
        return loss + self.compressor.loss(outputs, batch)

    def scalars(self, techniques: Iterable[Technique] | None = None) -> dict[str, float]:
        """Technique scalars as ``{kind}/{tag}`` (``{kind}.{index}/{tag}`` for repeated kinds)."""
        compressor = self.compressor
        if compressor.model is None or compressor.finalized:
            return {}
        only = None if techniques is None else {id(t) for t in techniques}
        kinds = [t.kind for t in compressor.techniques]
        out: dict[str, float] = {}
        for index, technique in enumerate(compressor.techniques):
            if only is not None and id(technique) not in only:
                continue
            prefix = technique.kind
            if kinds.count(technique.kind) > 1:
                prefix = f"{technique.kind}.{index}"
            for tag, value in technique.scalars().items():
                out[f"{prefix}/{tag}"] = float(value)
        return out

    # --- begin / end ----------------------------------------------------------------------------
    def before_training(self) -> list[str]:
        """Run the techniques' data-dependent setup on the calibration batches, if given (once)."""
        if self.calibration_batches is None or self._prepared:
            return []
        self._prepared = True
        return self.compressor.before_training(self.calibration_batches)

    def end(self) -> nn.Module | None:
        """``after_training`` on the calibration batches (if given), then ``finalize`` if asked.

        Returns the finalized model, or None when not finalizing.
        """
        compressor = self.compressor
        if compressor.model is None or compressor.finalized:
            return None
        if self.calibration_batches is not None:
            compressor.after_training(self.calibration_batches)
        if not self.finalize_at_end:
            return None
        self.finalized_model = compressor.finalize()
        return self.finalized_model

    # --- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        compressor = self.compressor
        state: dict[str, Any] = {"version": STATE_VERSION, "finalized": compressor.finalized}
        if compressor.model is not None and not compressor.finalized:
            state["compressor"] = compressor.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise StateError(
                f"slimkit callback state version {state.get('version')!r} is not {STATE_VERSION}"
            )
        if state.get("finalized"):
            raise StateError(
                "this checkpoint was saved after the compressor was finalized: load its weights "
                "into the plain model, without the slimkit callback"
            )
        if "compressor" not in state:
            return  # saved before the compressor was applied: nothing to restore
        self.require_applied()
        self.compressor.load_state_dict(state["compressor"])

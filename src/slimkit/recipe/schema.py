"""The recipe schema (version 1): typed, documented, unknown keys rejected.

A recipe names a task, how the baseline is obtained (trained or loaded), then a list of stages; each
stage fine-tunes with its own budget while its techniques act, and starts from the previous stage's
result. ``export`` says what the run writes. Every field has a default except the stage techniques.
YAML is read with ``yaml.safe_load``; no string is ever evaluated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, model_validator

from slimkit.core.config import Config
from slimkit.distill.config import DistillationConfig
from slimkit.errors import ConfigError
from slimkit.prune.depth import DropLayersConfig
from slimkit.prune.magnitude import MagnitudePruningConfig
from slimkit.prune.structured import StructuredPruningConfig
from slimkit.quant.dynamic import DynamicQuantConfig
from slimkit.quant.ptq import StaticQuantizationConfig
from slimkit.quant.qat import QATConfig
from slimkit.quant.weight_only import WeightOnlyConfig

# Technique configs the recipe accepts, told apart by ``kind``; each new technique adds its own.
TechniqueConfig = Annotated[
    MagnitudePruningConfig
    | StructuredPruningConfig
    | StaticQuantizationConfig
    | QATConfig
    | DynamicQuantConfig
    | WeightOnlyConfig
    | DistillationConfig
    | DropLayersConfig,
    Field(discriminator="kind"),
]

RECIPE_VERSION = 1


class TrainBudget(Config):
    """How a stage trains: epochs over the task's train data with one optimizer."""

    epochs: int = Field(5, ge=0, description="passes over the training data (0 = no training)")
    lr: float = Field(1e-3, gt=0, description="learning rate")
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="cosine: decay the learning rate to 0 over the stage's steps"
    )


class BaselineConfig(TrainBudget):
    """The starting model: trained from scratch for ``epochs``, or loaded from ``checkpoint``."""

    epochs: int = Field(15, ge=0)
    lr: float = Field(3e-3, gt=0)
    checkpoint: str | None = Field(
        None, description="state_dict file (.safetensors or .pt, loaded weights_only) to start from"
    )


class StageConfig(Config):
    """One stage: techniques applied, then fine-tuning under ``train`` while they act."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    train: TrainBudget = TrainBudget()
    techniques: list[TechniqueConfig] = Field(default_factory=list)
    max_metric_drop: float | None = Field(
        None, ge=0, description="this stage's bound for the gate (default: the recipe gate's)"
    )
    calibration_batches: int = Field(
        16,
        ge=1,
        description="training batches given to techniques that need data: static_quant "
        "calibrates on them after training, qat initialises its ranges on them before",
    )


class GateConfig(Config):
    """The measured gate after every stage (needs ``export.onnx`` for the latency bound).

    A stage fails when its validation metric falls more than ``max_metric_drop`` (absolute)
    below the baseline's, or when its ONNX Runtime latency at ``export.latency_batch``, measured
    interleaved with the previous stage's model, exceeds ``max_latency_ratio`` times the
    previous stage's. ``on_violation: warn`` flags it in the table and metrics.json and goes on;
    ``stop`` ends the run and exports the last stage that passed (or the baseline).
    """

    max_metric_drop: float | None = Field(
        None, ge=0, description="largest allowed validation-metric drop below the baseline"
    )
    max_latency_ratio: float | None = Field(
        1.05, gt=0, description="largest allowed latency vs the previous stage (5% timing noise)"
    )
    on_violation: Literal["warn", "stop"] = "warn"


class ExportConfig(Config):
    """What the run writes besides metrics: a packed sparse checkpoint and ONNX models.

    ``onnx`` writes ``baseline.onnx`` (fp32) and ``model.onnx`` in the form the last quantization
    technique gives it (int8 QDQ for ``static_quant``, ``MatMulInteger`` for ``dynamic_quant``),
    else fp32; ``latency`` then times both in ONNX Runtime (interleaved, ``latency_threads``
    intra-op threads) at batch 1 and ``latency_batch``, and ``onnx_metric`` evaluates the task
    metric on ``model.onnx`` as ONNX Runtime runs it (both only with ``onnx``).
    """

    packed: bool = True
    values_dtype: Literal["float16", "float32", "int8"] = Field(
        "float16",
        description="packed values: int8 = per-output-channel int8 codes for weights (biases "
        "and norms stay float16); lossless for weights already on an int8 grid (static_quant)",
    )
    onnx: bool = True
    latency: bool = True
    latency_batch: int = Field(64, ge=1)
    latency_threads: int = Field(1, ge=1)
    onnx_metric: bool = True


class Recipe(Config):
    """A whole compression run (see the module docstring)."""

    version: Literal[1] = RECIPE_VERSION
    name: str = Field("run", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    task: str = Field("digits", description="built-in task name or 'package.module:function'")
    seed: int = Field(0, ge=0)
    batch_size: int = Field(64, ge=1)
    baseline: BaselineConfig = BaselineConfig()
    stages: list[StageConfig] = Field(..., min_length=1)
    gate: GateConfig = GateConfig()
    export: ExportConfig = ExportConfig()

    @model_validator(mode="after")
    def _unique_stage_names(self) -> Recipe:
        names = [s.name for s in self.stages]
        if "baseline" in names:
            raise ValueError("'baseline' is reserved for the starting model; rename that stage")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(dupes)}")
        return self


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe; every problem is one :class:`ConfigError` line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "parse error"
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping, got {type(data).__name__}")
    return Recipe.from_dict(data, source=str(path))


def recipe_json_schema() -> dict[str, Any]:
    """The JSON Schema of :class:`Recipe` (``slimkit schema`` prints it)."""
    schema = Recipe.model_json_schema()
    schema["$id"] = f"https://slimkit.dev/recipe/v{RECIPE_VERSION}.json"
    return schema


def dump_recipe(recipe: Recipe) -> str:
    """YAML text that :func:`load_recipe` reads back into an equal recipe."""
    return yaml.safe_dump(json.loads(recipe.model_dump_json()), sort_keys=False)

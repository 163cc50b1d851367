"""slimkit: compress trained PyTorch models and measure the result in a real inference engine.

The public surface is re-exported here; everything else may change between versions.
"""

from slimkit.core.compressor import Compressor
from slimkit.core.config import Config
from slimkit.core.policy import POLICIES, Policy
from slimkit.core.schedules import ConstantSchedule, PolynomialSchedule, TrialsSchedule
from slimkit.core.scope import Scope
from slimkit.core.technique import TECHNIQUES, Technique, register_technique
from slimkit.distill import Distillation, DistillationConfig
from slimkit.errors import (
    CheckpointError,
    ConfigError,
    ScopeError,
    SlimkitError,
    StateError,
    UnsupportedModuleError,
)
from slimkit.export.packed import load_packed, load_packed_into, save_packed
from slimkit.prune import NM, Block, MagnitudePruning, MagnitudePruningConfig, strip_pruning
from slimkit.prune.manifest import load_pruned, save_pruned
from slimkit.prune.structured import StructuredPruning, StructuredPruningConfig
from slimkit.quant import (
    DynamicQuantConfig,
    QATConfig,
    StaticQuantizationConfig,
    WeightOnlyConfig,
    quantize_static,
)
from slimkit.recipe.schema import Recipe, load_recipe
from slimkit.tasks.base import Task

__version__ = "0.1.0"

__all__ = [
    "NM",
    "POLICIES",
    "TECHNIQUES",
    "Block",
    "CheckpointError",
    "Compressor",
    "Config",
    "ConfigError",
    "ConstantSchedule",
    "Distillation",
    "DistillationConfig",
    "DynamicQuantConfig",
    "MagnitudePruning",
    "MagnitudePruningConfig",
    "Policy",
    "PolynomialSchedule",
    "QATConfig",
    "Recipe",
    "Scope",
    "ScopeError",
    "SlimkitError",
    "StateError",
    "StaticQuantizationConfig",
    "StructuredPruning",
    "StructuredPruningConfig",
    "Task",
    "Technique",
    "TrialsSchedule",
    "UnsupportedModuleError",
    "WeightOnlyConfig",
    "__version__",
    "load_packed",
    "load_packed_into",
    "load_pruned",
    "load_recipe",
    "quantize_static",
    "register_technique",
    "save_packed",
    "save_pruned",
    "strip_pruning",
]

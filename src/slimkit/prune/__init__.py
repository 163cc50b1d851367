"""Pruning: magnitude pruning (unstructured, block, N:M) with schedules and rankings."""

from slimkit.prune.magnitude import (
    NM,
    Block,
    MagnitudePruning,
    MagnitudePruningConfig,
    Unstructured,
    WeightMask,
    strip_pruning,
)

__all__ = [
    "NM",
    "Block",
    "MagnitudePruning",
    "MagnitudePruningConfig",
    "Unstructured",
    "WeightMask",
    "strip_pruning",
]

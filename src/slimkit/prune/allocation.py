"""Per-group sparsities from sensitivity curves: pure functions on plain numbers.

A :class:`GroupCurve` is one group's predicted metric drop and cost (the share of the model's
MACs or parameters removed) at a grid of channel sparsities, sparsity 0 costing nothing.
:func:`allocate_sensitivity` picks per-group sparsities that reach a target reduction with the
least predicted drop. It is **greedy on marginal drop per unit of cost saved**
(:func:`greedy_path`): from every group's current grid point it considers a jump to *every* later
grid point (not only the next, so a non-convex curve is crossed along its lower hull) and takes
the jump with the lowest drop per cost, until the predicted reduction reaches the target; grid
points above ``max_layer_sparsity`` are never used. Drops and costs are taken as additive across
groups (PaddleSlim's assumption); :class:`~slimkit.prune.structured.StructuredPruning` corrects
the cost by measuring pruned copies along the same greedy path.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from slimkit.errors import ConfigError


@dataclass(frozen=True)
class GroupCurve:
    """A group's predicted metric ``drops`` and ``costs`` (share of the model's MACs or
    parameters removed) at increasing ``sparsities``; sparsity 0 costs and drops nothing.
    In between grid points both are interpolated linearly; past the last they stay constant."""

    sparsities: tuple[float, ...]
    drops: tuple[float, ...]
    costs: tuple[float, ...]

    def __post_init__(self) -> None:
        if not len(self.sparsities) == len(self.drops) == len(self.costs):
            raise ConfigError(
                f"a sensitivity curve needs one drop and one cost per sparsity, got "
                f"{len(self.sparsities)} sparsities, {len(self.drops)} drops, "
                f"{len(self.costs)} costs"
            )
        check_grid(self.sparsities)

    def points(self) -> list[tuple[float, float, float]]:
        """``(sparsity, drop, cost)`` from ``(0, 0, 0)`` on."""
        return [(0.0, 0.0, 0.0), *zip(self.sparsities, self.drops, self.costs, strict=True)]

    def drop_at(self, sparsity: float) -> float:
        return float(np.interp(sparsity, [0.0, *self.sparsities], [0.0, *self.drops]))

    def cost_at(self, sparsity: float) -> float:
        return float(np.interp(sparsity, [0.0, *self.sparsities], [0.0, *self.costs]))


@dataclass(frozen=True)
class AllocationStep:
    """One greedy step: ``group`` moves to ``sparsity``; ``reduction`` and ``drop`` are the
    predicted totals after it."""

    group: str
    sparsity: float
    reduction: float
    drop: float


def greedy_path(
    curves: Mapping[str, GroupCurve], *, max_layer_sparsity: float = 0.9
) -> list[AllocationStep]:
    """Every greedy step (see the module docstring) until no group can move further; grid
    points above ``max_layer_sparsity`` are never used. Ties go to the smaller cost, then to the
    group name, so the path is deterministic."""
    points = {
        root: [p for p in curve.points() if p[0] <= max_layer_sparsity + 1e-9]
        for root, curve in curves.items()
    }
    at = dict.fromkeys(curves, 0)
    path: list[AllocationStep] = []
    reduction = drop = 0.0
    while True:
        best: tuple[float, float, str, int] | None = None
        for root in sorted(points):
            _, d0, c0 = points[root][at[root]]
            for j in range(at[root] + 1, len(points[root])):
                _, d1, c1 = points[root][j]
                if c1 - c0 <= 0:
                    continue  # saves nothing (rounding): a later point may
                key = ((d1 - d0) / (c1 - c0), c1 - c0, root, j)
                if best is None or key < best:
                    best = key
        if best is None:
            return path
        _, _, root, j = best
        _, d0, c0 = points[root][at[root]]
        sparsity, d1, c1 = points[root][j]
        reduction, drop, at[root] = reduction + c1 - c0, drop + d1 - d0, j
        path.append(AllocationStep(root, sparsity, reduction, drop))


def path_sparsities(steps: Iterable[AllocationStep]) -> dict[str, float]:
    """Each group's sparsity after ``steps`` (groups that never moved are left out)."""
    return {step.group: step.sparsity for step in steps}


def allocate_sensitivity(
    curves: Mapping[str, GroupCurve],
    target: float,
    *,
    max_layer_sparsity: float = 0.9,
    metric: str = "flops",
) -> dict[str, float]:
    """Per-group sparsities whose predicted reduction reaches ``target`` (a share, like the
    curves' costs) with the least predicted drop found greedily; every group of ``curves`` is in
    the result (0.0 = untouched). An unreachable target is a :class:`ConfigError` naming the
    best reachable reduction."""
    if not 0.0 <= target < 1.0:
        raise ConfigError(f"target {metric} reduction must be in [0, 1), got {target!r}")
    path = greedy_path(curves, max_layer_sparsity=max_layer_sparsity)
    best = path[-1].reduction if path else 0.0
    if best < target - 1e-12:
        raise ConfigError(
            f"a {metric} reduction of {target:g} is out of reach: the best reachable is "
            f"{best:.4f} with max_layer_sparsity {max_layer_sparsity:g}"
        )
    taken = next((k + 1 for k, s in enumerate(path) if s.reduction >= target - 1e-12), 0)
    return {**dict.fromkeys(curves, 0.0), **path_sparsities(path[:taken])}


def trim_overshoot(
    curves: Mapping[str, GroupCurve],
    sparsities: Mapping[str, float],
    reaches: Callable[[dict[str, float]], bool],
) -> dict[str, float]:
    """Step groups back to lower grid points while ``reaches(candidate)`` (the target) holds.

    Each round tries every group's every lower grid point (0 included) and keeps the candidate
    that lowers the predicted drop most (never one predicted to drop more); it stops when no
    candidate still reaches the target.
    Greedy paths overshoot when their last jump is large; this takes the excess back.
    """
    current = dict(sparsities)
    while True:
        best: tuple[float, dict[str, float]] | None = None
        base_drop = predicted_drop(curves, current)
        for root, sparsity in current.items():
            for lower in (0.0, *(p for p in curves[root].sparsities if p < sparsity - 1e-12)):
                candidate = {**current, root: lower}
                saved = base_drop - predicted_drop(curves, candidate)
                if saved < 0.0 or (best is not None and saved <= best[0]):
                    continue  # predicted worse, or no better than the best candidate so far
                if reaches(candidate):
                    best = (saved, candidate)
        if best is None:
            return current
        current = {r: s for r, s in best[1].items() if s > 0.0}


def predicted_drop(curves: Mapping[str, GroupCurve], sparsities: Mapping[str, float]) -> float:
    """Sum of the groups' interpolated drops at ``sparsities`` (missing groups: 0)."""
    return sum(curve.drop_at(sparsities.get(root, 0.0)) for root, curve in curves.items())


def predicted_reduction(curves: Mapping[str, GroupCurve], sparsities: Mapping[str, float]) -> float:
    """Sum of the groups' interpolated costs at ``sparsities`` (missing groups: 0)."""
    return sum(curve.cost_at(sparsities.get(root, 0.0)) for root, curve in curves.items())


def check_grid(sparsities: Sequence[float]) -> tuple[float, ...]:
    grid = tuple(float(s) for s in sparsities)
    if not grid or any(not 0.0 < s < 1.0 for s in grid):
        raise ConfigError(f"sensitivity sparsities must be in (0, 1), got {list(sparsities)}")
    if any(b <= a for a, b in itertools.pairwise(grid)):
        raise ConfigError(f"sensitivity sparsities must increase, got {list(sparsities)}")
    return grid


__all__ = [
    "AllocationStep",
    "GroupCurve",
    "allocate_sensitivity",
    "check_grid",
    "greedy_path",
    "path_sparsities",
    "predicted_drop",
    "predicted_reduction",
]

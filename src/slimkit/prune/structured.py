"""Structured pruning: remove whole channels and attention heads, so the model physically shrinks.

Torch-Pruning's dependency graph finds the groups of tensor slices that must go together (a
conv's filters, the next layer's inputs, BatchNorm entries, residual partners, SE gates, a ViT's
``cls_token``...); :mod:`slimkit.prune.groups` holds that machinery. This module decides how much
each group loses:

* **goal**: a channel ``sparsity``, or a ``target`` reduction of the model's MACs (``flops``) or
  parameters (``params``), measured with :func:`~slimkit.measure.flops.count_macs` on pruned
  copies, so the result reaches at least the target.
* **allocation**: ``uniform`` (the same sparsity per group), ``global`` (one ranking of
  mean-normalised scores, at most ``max_layer_sparsity`` of any group) or ``sensitivity``
  (per-group sparsities from measured sensitivity curves, :mod:`slimkit.prune.sensitivity`).
  With a target, ``uniform``/``global`` bisect the sparsity that reaches it (so all three can be
  compared at equal FLOPs) and ``sensitivity`` takes the shortest prefix of its greedy path that
  does; every group then stays at or below ``max_layer_sparsity``.
* **when**: one shot in ``apply`` (then fine-tune), or iteratively: with a ``schedule`` each
  ``step`` where the schedule's value rises prunes a further slice of the (fine-tuned) model.
* **several processes** (``torch.distributed``): rank 0 allocates and picks the channels (and
  alone measures sensitivity curves, writing their cache); every rank receives the removal
  indices and slices its model identically.

Pruning **replaces parameters**: build the optimizer after ``apply``, and rebuild it (and its LR
scheduler) whenever ``step`` returns True, which :attr:`StructuredPruning.parameters_replaced`
also says until the next step. The recipe runner or your own loop must do this; an optimizer
holding the old parameters silently trains nothing.

The final classifier's outputs (any module whose output is a model output) are never pruned.
A group that cannot be handled is skipped with its reason, never dropped silently. The model is
traced with ``example_inputs`` (a tuple; a trailing dict holds keyword arguments), given to the
constructor or :meth:`StructuredPruning.apply`, or zeros of ``input_shape``. The manifest holds
original indices across every pass, so :func:`~slimkit.prune.manifest.load_pruned` rebuilds the
result from a freshly built model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from slimkit.core.config import Config
from slimkit.core.schedules import AnySchedule, ConstantSchedule, Schedule
from slimkit.core.scope import Selection
from slimkit.core.technique import RunContext, Technique, TechniqueSummary, register_technique
from slimkit.distributed import check_unsharded, is_main, on_main
from slimkit.errors import ConfigError, StateError
from slimkit.prune.allocation import (
    AllocationStep,
    GroupCurve,
    greedy_path,
    path_sparsities,
    predicted_drop,
    trim_overshoot,
)
from slimkit.prune.attention import ATTENTION_ADAPTERS, AttentionSpec
from slimkit.prune.channel_importance import global_prune_counts
from slimkit.prune.groups import (
    ChannelSelection,
    Cost,
    GroupPlan,
    GroupTrace,
    StructuredPlan,
    apply_records,
    forward_eval,
    leaves,
    measure_cost,
    removal_count,
    split_inputs,
    trace_groups,
)
from slimkit.prune.manifest import PruningManifest, apply_manifest
from slimkit.prune.sensitivity import SensitivityReport, measure_sensitivity, plot_sensitivity

BISECTION_STEPS = 14  # sparsity resolution of max_layer_sparsity / 2**14 for target searches


class PruningTarget(Config):
    """Remove ``reduction`` of the model's per-sample MACs (``metric: flops``; FLOPs are 2 MACs,
    so the share is the same) or of its parameters (``metric: params``)."""

    metric: Literal["flops", "params"]
    reduction: Annotated[float, Field(gt=0.0, lt=1.0)]


class StructuredPruningConfig(ChannelSelection):
    """Remove channels (and whole heads) of every prunable group; see the module docstring.

    Give a channel ``sparsity`` or a ``target`` (one shot), or a ``schedule`` (iterative). The
    schedule's values are channel sparsities, or with a ``target`` reductions of its metric,
    and must then end at ``target.reduction``. ``allocation: sensitivity`` needs a ``target``
    and curves: ``sensitivity_file`` (written by :func:`~slimkit.prune.sensitivity.
    run_sensitivity` or :meth:`SensitivityReport.save`), or ``sensitivity=``/``evaluate=``
    given to :class:`StructuredPruning`. ``round_to``, ``prune_heads``, ``scope``,
    ``importance`` and ``seed`` are described in :class:`~slimkit.prune.groups.ChannelSelection`.
    """

    kind: Literal["structured_prune"] = "structured_prune"
    sparsity: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None
    target: PruningTarget | None = None
    schedule: AnySchedule | None = None
    allocation: Literal["uniform", "global", "sensitivity"] = "uniform"
    max_layer_sparsity: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.9
    sensitivity_file: str | None = None
    input_shape: tuple[Annotated[int, Field(ge=1)], ...] | None = None

    @model_validator(mode="after")
    def _check(self) -> StructuredPruningConfig:
        if self.schedule is None and (self.sparsity is None) == (self.target is None):
            raise ValueError(
                "give exactly one of 'sparsity' (channel share) or 'target' (flops or params "
                "reduction), or a 'schedule'"
            )
        if self.schedule is not None and self.sparsity is not None:
            raise ValueError("give 'sparsity' or 'schedule', not both")
        if self.schedule is not None and self.target is not None:
            final, goal = self.schedule.final_value, self.target.reduction
            if not math.isclose(final, goal, abs_tol=1e-9):
                raise ValueError(
                    f"with a target the schedule's values are {self.target.metric} reductions: "
                    f"it ends at {final:g}, target.reduction is {goal:g}"
                )
        if self.allocation == "sensitivity" and self.target is None:
            raise ValueError(
                "allocation 'sensitivity' needs a target, e.g. {metric: flops, reduction: 0.5}"
            )
        if self.sensitivity_file is not None and self.allocation != "sensitivity":
            raise ValueError("sensitivity_file is only read by allocation 'sensitivity'")
        return self

    @property
    def effective_schedule(self) -> Schedule:
        """The schedule, or a one-shot constant one at the ``sparsity`` / target reduction."""
        if self.schedule is not None:
            return self.schedule
        goal = self.sparsity if self.target is None else self.target.reduction
        return ConstantSchedule(target=goal, begin=0, end=0)


@dataclass
class _Progress:
    """Where the pruning of one model stands: group widths (units) before the first pass, the
    unpruned cost, and how far each allocation has gone."""

    original: dict[str, int]
    baseline: Cost
    sparsity: float = 0.0  # uniform / global: the channel sparsity reached
    prefix: int = 0  # sensitivity: greedy steps taken
    predicted_drop: float | None = None


# --- the technique --------------------------------------------------------------------------------


@register_technique
class StructuredPruning(Technique):
    """See :class:`StructuredPruningConfig` and the module docstring.

    ``evaluate(model) -> float`` (higher is better) lets ``allocation: sensitivity`` measure its
    curves on the model given to ``apply``; ``sensitivity`` passes them ready-made.
    """

    kind = "structured_prune"
    config_class = StructuredPruningConfig
    config: StructuredPruningConfig

    def __init__(
        self,
        config: StructuredPruningConfig,
        *,
        example_inputs: Any = None,
        evaluate: Callable[[nn.Module], float] | None = None,
        sensitivity: SensitivityReport | None = None,
    ) -> None:
        super().__init__(config)
        self.example_inputs = example_inputs
        self.evaluate = evaluate
        self.sensitivity = sensitivity
        self.sensitivity_cache: Path | None = None  # JSON cache (+ PNG plot) of measured curves
        self.schedule = config.effective_schedule
        self.manifest: PruningManifest | None = None
        self.last_plan: StructuredPlan | None = None
        self.value = 0.0  # the schedule value pruned to so far
        self._state: _Progress | None = None
        self._path: list[AllocationStep] | None = None
        self._pruned: dict[str, None] = {}  # roots that lost units, in order
        self._replaced = False
        self._inputs_used: tuple[tuple, dict] = ((), {})
        self._totals: dict[str, Any] = {}

    def bind_run(self, context: RunContext) -> None:
        """Measure sensitivity curves with the run's validation metric, cached in its folder."""
        if self.evaluate is None:
            self.evaluate = context.evaluate
        if context.work_dir is not None and self.sensitivity_cache is None:
            self.sensitivity_cache = Path(context.work_dir) / "sensitivity.json"

    def rebuild(self, model: nn.Module) -> nn.Module:
        """Slice a fresh model as the recorded manifest says (what ``load_pruned`` does)."""
        if self.manifest is not None:
            apply_manifest(model, self.manifest)
        return model

    @property
    def parameters_replaced(self) -> bool:
        """True when the latest ``apply``/``step`` sliced the model: its parameters are new
        objects, so the optimizer (and its LR scheduler) must be rebuilt."""
        return self._replaced

    def _inputs(self, example_inputs: Any) -> tuple[tuple, dict]:
        example = example_inputs if example_inputs is not None else self.example_inputs
        if example is None and self.config.input_shape is not None:
            example = (torch.zeros(self.config.input_shape),)
        if example is None:
            raise StateError(
                f"{self.kind}: example inputs are needed to trace the model; pass "
                "example_inputs= to the constructor or apply(), or set input_shape"
            )
        return split_inputs(example)

    # --- planning ---------------------------------------------------------------------------
    def plan_groups(self, model: nn.Module, example_inputs: Any = None) -> StructuredPlan:
        """Every group with the channels it would lose at the schedule's final value, or its
        skip reason; the model is not changed (target searches prune copies)."""
        args, kwargs = self._inputs(example_inputs)
        trace = trace_groups(model, args, kwargs, self.config)
        state = _Progress({g.root: g.units for g in trace.plan.groups}, self._cost(trace))
        trace.set_removals(self._allocate(trace, state, self.schedule.final_value))
        self.last_plan = trace.plan
        return trace.plan

    def plan(self, model: nn.Module, example_inputs: Any = None) -> Selection:
        plan = self.plan_groups(model, example_inputs)
        modules = dict(model.named_modules())
        selection = Selection(skipped=list(plan.skipped_modules))
        for g in plan.groups:
            if g.skip:
                selection.skipped.append((g.root, g.skip))
            elif g.prune:
                selection.selected.append((g.root, modules[g.root]))
        return selection

    def _cost(self, trace: GroupTrace) -> Cost:
        return measure_cost(trace.model, trace.args, trace.kwargs)

    def _allocate(self, trace: GroupTrace, state: _Progress, value: float) -> dict[str, int]:
        """Units each prunable group loses now so that ``value`` of the goal is reached."""
        if value <= 0.0:
            return {}
        target = self.config.target
        if target is None:
            return self._at_sparsity(trace, state, value)
        if self.config.allocation == "sensitivity":
            return self._along_path(trace, state, value, target.metric)
        return self._bisect(trace, state, value, target.metric)

    def _at_sparsity(self, trace: GroupTrace, state: _Progress, sparsity: float) -> dict[str, int]:
        cfg = self.config
        groups = trace.prunable
        original = {root: state.original.get(root, g.plan.units) for root, g in groups.items()}
        channel = [root for root, g in groups.items() if g.spec is None]
        if cfg.allocation == "global":
            counts = global_prune_counts(
                [groups[r].scores for r in channel],
                sparsity,
                cfg.max_layer_sparsity,
                cfg.round_to,
                original=[original[r] for r in channel],
            )
        else:
            counts = [
                removal_count(groups[r].plan.units, original[r], sparsity, cfg.round_to)
                for r in channel
            ]
        removals = dict(zip(channel, counts, strict=True))
        for root, g in groups.items():
            if g.spec is not None:
                removals[root] = removal_count(g.plan.units, original[root], sparsity, heads=True)
        return removals

    def _search(
        self,
        trace: GroupTrace,
        state: _Progress,
        value: float,
        metric: str,
        removals_at: Callable[[int], dict[str, int]],
        points: int,
    ) -> int:
        """The first of ``points`` increasing allocations (bisection) whose measured reduction
        reaches ``value``; ``removals_at(i)`` gives allocation ``i``. Infeasible: ConfigError."""
        memo: dict[tuple, float] = {}

        def reaches(i: int) -> bool:
            removals = removals_at(i)
            key = tuple(sorted((r, n) for r, n in removals.items() if n))
            if key not in memo:
                memo[key] = trace.cost(removals).reduction(state.baseline, metric)
            return memo[key] >= value - 1e-12

        lo, hi = 0, points - 1
        if not reaches(hi):
            best = max(memo.values())
            raise ConfigError(
                f"{self.kind}: a {metric} reduction of {value:g} is out of reach with allocation "
                f"{self.config.allocation!r}: the best reachable is {best:.4f} "
                f"(max_layer_sparsity {self.config.max_layer_sparsity:g})"
            )
        if reaches(lo):
            return lo
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
        return hi

    def _bisect(
        self, trace: GroupTrace, state: _Progress, value: float, metric: str
    ) -> dict[str, int]:
        start, stop = state.sparsity, self.config.max_layer_sparsity

        def sparsity(i: int) -> float:
            return start + (stop - start) * i / 2**BISECTION_STEPS

        def removals_at(i: int) -> dict[str, int]:
            return self._at_sparsity(trace, state, sparsity(i))

        i = self._search(trace, state, value, metric, removals_at, 2**BISECTION_STEPS + 1)
        state.sparsity = sparsity(i)
        return removals_at(i)

    def _along_path(
        self, trace: GroupTrace, state: _Progress, value: float, metric: str
    ) -> dict[str, int]:
        curves = self._curves(trace, state, metric)
        if self._path is None:
            self._path = greedy_path(curves, max_layer_sparsity=self.config.max_layer_sparsity)
        path, groups, start = self._path, trace.prunable, state.prefix

        def removals(chosen: dict[str, float]) -> dict[str, int]:
            """Units each group loses at per-group sparsities ``chosen``."""
            return {
                root: removal_count(
                    g.plan.units,
                    state.original.get(root, g.plan.units),
                    chosen.get(root, 0.0),
                    self.config.round_to,
                    heads=g.spec is not None,
                )
                for root, g in groups.items()
            }

        def removals_at(i: int) -> dict[str, int]:
            return removals(path_sparsities(path[: start + i]))

        i = self._search(trace, state, value, metric, removals_at, len(path) - start + 1)
        state.prefix = start + i
        state.predicted_drop = path[state.prefix - 1].drop if state.prefix else 0.0
        if value < self.schedule.final_value - 1e-12:  # iterative: stay on the greedy path
            return removals_at(i)
        # The path's last jump can overshoot the target by a lot (coarse grids, rounding to
        # round_to): step groups back down the grid while the measured reduction still holds.
        sparsities = path_sparsities(path[: state.prefix])

        memo: dict[tuple, bool] = {}

        def reaches(chosen: dict[str, float]) -> bool:
            counts = removals(chosen)
            key = tuple(sorted((r, n) for r, n in counts.items() if n))
            if key not in memo:
                memo[key] = trace.cost(counts).reduction(state.baseline, metric) >= value - 1e-12
            return memo[key]

        sparsities = trim_overshoot(curves, sparsities, reaches)
        state.predicted_drop = predicted_drop(curves, sparsities)
        return removals(sparsities)

    def _curves(self, trace: GroupTrace, state: _Progress, metric: str) -> dict[str, GroupCurve]:
        report = self._sensitivity(trace)
        curves, failed = report.curves(metric), dict(report.skipped)
        for root, g in trace.prunable.items():
            measured = report.groups.get(root)
            if measured is None and root in failed:
                g.plan.skip = f"no sensitivity curve: {failed[root]}"
                continue
            if measured is None:
                raise ConfigError(
                    f"{self.kind}: the sensitivity report has no curve for group {root!r}; "
                    "measure it with the same scope and prune_heads"
                )
            if measured.units != state.original.get(root, g.plan.units):
                raise ConfigError(
                    f"{self.kind}: the sensitivity report measured group {root!r} with "
                    f"{measured.units} {g.plan.kind}, the model has "
                    f"{state.original.get(root, g.plan.units)}"
                )
        return {root: curves[root] for root in trace.prunable}

    def _sensitivity(self, trace: GroupTrace) -> SensitivityReport:
        if self.sensitivity is None and self.config.sensitivity_file is not None:
            self.sensitivity = SensitivityReport.load(self.config.sensitivity_file)
        if self.sensitivity is None and self.evaluate is not None:
            inputs = (*trace.args, trace.kwargs) if trace.kwargs else trace.args
            self.sensitivity = measure_sensitivity(
                trace.model,
                inputs,
                self.evaluate,
                config=self.config,
                progress=False,
                cache=self.sensitivity_cache,
            )
            if self.sensitivity_cache is not None:
                plot_sensitivity(self.sensitivity, self.sensitivity_cache.with_suffix(".png"))
        if self.sensitivity is None:
            raise ConfigError(
                f"{self.kind}: allocation 'sensitivity' needs curves: set sensitivity_file, or "
                "give StructuredPruning sensitivity= (a SensitivityReport) or evaluate= "
                "(model -> metric)"
            )
        return self.sensitivity

    # --- life cycle -------------------------------------------------------------------------
    def apply(self, model: nn.Module, example_inputs: Any = None) -> None:
        """Trace ``model``, and prune it in place to the schedule's value at step 0 (one shot:
        the whole goal; a schedule starting later: nothing yet)."""
        if self._already_applied(model):
            return
        check_unsharded(model, self.kind)
        args, kwargs = self._inputs(example_inputs)
        trace = trace_groups(model, args, kwargs, self.config)
        self._state = _Progress({g.root: g.units for g in trace.plan.groups}, self._cost(trace))
        self._inputs_used = (args, kwargs)
        self.manifest = PruningManifest(technique=self.config.to_dict())
        self._model = model
        self._prune_to(trace, self.schedule.value(0))

    def step(self, step: int) -> bool:
        """On the schedule's update steps, prune a further slice when its value has risen;
        True (and :attr:`parameters_replaced`) when parameters were replaced."""
        super().step(step)
        self._replaced = False
        if self._model is None or self._state is None:
            raise StateError(f"{self.kind}: call apply(model) before step")
        if not self.schedule.is_update_step(step):
            return False
        value = self.schedule.value(step)
        if value <= self.value + 1e-12:
            return False
        check_unsharded(self._model, self.kind)  # sharded since apply: nothing to slice
        args, kwargs = self._inputs_used
        return self._prune_to(trace_groups(self._model, args, kwargs, self.config), value)

    def _decide(self, trace: GroupTrace, state: _Progress, value: float) -> None:
        """Mark the units each group loses. Under ``torch.distributed`` rank 0 decides (and
        alone measures sensitivity curves) and every rank takes its removal indices, so all
        ranks slice the same channels."""

        def decide() -> dict[str, Any]:
            trace.set_removals(self._allocate(trace, state, value))
            return {
                "groups": {g.root: (list(g.prune), g.skip) for g in trace.plan.groups},
                "progress": (state.sparsity, state.prefix, state.predicted_drop),
            }

        decision = on_main(decide)
        if is_main():
            return
        groups = decision["groups"]
        if sorted(groups) != sorted(g.root for g in trace.plan.groups):
            raise StateError(f"{self.kind}: rank 0 traced other channel groups than this rank")
        for g in trace.plan.groups:
            g.prune, g.skip = groups[g.root]
        state.sparsity, state.prefix, state.predicted_drop = decision["progress"]

    def _prune_to(self, trace: GroupTrace, value: float) -> bool:
        model, state = trace.model, self._state
        before, _ = forward_eval(model, trace.args, trace.kwargs)
        self._decide(trace, state, value)
        applied = apply_records(model, trace.records(), trace.args, trace.kwargs)
        after, _ = forward_eval(model, trace.args, trace.kwargs)
        shapes = [tuple(t.shape) for t in leaves(before)], [tuple(t.shape) for t in leaves(after)]
        if shapes[0] != shapes[1]:
            raise StateError(f"{self.kind}: output shapes changed from {shapes[0]} to {shapes[1]}")
        self.manifest.compose(applied)
        self.value = max(self.value, value)
        self.last_plan = trace.plan
        self._pruned.update(dict.fromkeys(g.root for g in trace.plan.groups if g.prune))
        self._record(trace)
        self._replaced = bool(applied.layers)
        return self._replaced

    def _record(self, trace: GroupTrace) -> None:
        plan, state, cfg = trace.plan, self._state, self.config
        modules = dict(trace.model.named_modules())
        self.selection = Selection(
            selected=[(root, modules[root]) for root in self._pruned],
            skipped=[(g.root, g.skip) for g in plan.groups if g.skip] + plan.skipped_modules,
        )
        groups = [g for g in plan.groups if g.skip is None or g.root in self._pruned]

        def now(g: GroupPlan) -> int:
            return g.units - (
                len(g.prune) // max(1, g.head_dim) if g.kind == "heads" else len(g.prune)
            )

        channels = [g for g in groups if g.kind == "channels"]
        total = sum(state.original.get(g.root, g.units) for g in channels)
        cost = self._cost(trace)
        self._totals = {
            "allocation": cfg.allocation,
            "target_metric": "channels" if cfg.target is None else cfg.target.metric,
            "target": self.value,
            "final_target": self.schedule.final_value,
            "channels": total,
            "channels_removed": total - sum(now(g) for g in channels),
            "heads_removed": sum(
                state.original.get(g.root, g.units) - now(g) for g in groups if g.kind == "heads"
            ),
            "params_removed": self.manifest.removed_parameters(),
            "macs_before": state.baseline.macs,
            "macs_after": cost.macs,
            "macs_reduction": cost.reduction(state.baseline, "flops"),
            "params_before": state.baseline.params,
            "params_after": cost.params,
            "params_reduction": cost.reduction(state.baseline, "params"),
            "groups_skipped": sum(1 for g in plan.groups if g.skip),
        }
        if cfg.target is not None and cfg.allocation != "sensitivity":
            self._totals["sparsity"] = state.sparsity
        if state.predicted_drop is not None:
            self._totals["predicted_drop"] = state.predicted_drop

    def finalize(self, model: nn.Module) -> nn.Module:
        """The model is plain PyTorch after every pass (smaller modules): returned as is. A run
        shorter than the schedule keeps what it reached (see the summary's totals)."""
        self._require_applied()
        self._replaced = False
        return model

    def scalars(self) -> dict[str, float]:
        """TensorBoard scalars: the value pruned to and the MACs / parameter reductions."""
        keys = ("target", "macs_reduction", "params_reduction")
        return {f"structured/{k}": float(self._totals[k]) for k in keys if k in self._totals}

    def summary(self) -> TechniqueSummary:
        selection = self._require_applied()
        rows = []
        for rec in self.manifest.layers.values():
            kept = [len(k) if k is not None else "" for k in (rec.kept_out, rec.kept_in)]
            heads = len(rec.kept_heads) if rec.kept_heads is not None else ""
            params = [t for t in rec.tensors.values() if t.kind == "parameter"]
            removed = sum(math.prod(t.original_shape) - math.prod(t.shape) for t in params)
            rows.append([rec.module, rec.type, *kept, heads, removed])
        return TechniqueSummary(
            technique=self.kind,
            columns=["module", "type", "out_kept", "in_kept", "heads_kept", "params_removed"],
            rows=rows,
            totals=dict(self._totals),
            skipped=list(selection.skipped),
        )

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["manifest"] = self.manifest.to_dict() if self.manifest is not None else None
        state["value"] = self.value
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        data = state.get("manifest")
        self.manifest = PruningManifest.from_dict(data) if data is not None else None
        self.value = float(state.get("value", 0.0))


__all__ = [
    "ATTENTION_ADAPTERS",
    "AttentionSpec",
    "GroupPlan",
    "PruningTarget",
    "StructuredPlan",
    "StructuredPruning",
    "StructuredPruningConfig",
]

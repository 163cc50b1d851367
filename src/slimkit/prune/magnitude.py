"""Magnitude pruning of Linear/Conv weights with schedules, patterns and rankings.

Masks live on the model as ``torch.nn.utils.parametrize`` parametrizations (:class:`WeightMask`,
buffers ``mask`` and ``importance``), so ``state_dict``, ``.to()``, DDP and ``torch.compile``
see them as ordinary module state. Biases are never pruned. ``finalize`` bakes the zeros into
plain weights.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn.utils import parametrize

from slimkit.core.config import Config
from slimkit.core.schedules import AnySchedule, ConstantSchedule, Schedule
from slimkit.core.scope import (
    WEIGHT_LAYER_NAMES,
    Scope,
    Selection,
    is_weight_layer,
    module_type_name,
)
from slimkit.core.technique import Technique, TechniqueSummary, register_technique
from slimkit.distributed import all_reduce_tensors_, broadcast_tensors_, check_unsharded
from slimkit.errors import ConfigError, StateError
from slimkit.prune import masks as M
from slimkit.prune.importance import (
    ImportanceName,
    ema_update,
    lamp_score,
    magnitude_score,
    taylor_score,
)


class Unstructured(Config):
    kind: Literal["unstructured"] = "unstructured"


class Block(Config):
    """Blocks over the 2-D weight view ``(out, in * prod(kernel))``; ragged edges allowed."""

    kind: Literal["block"] = "block"
    shape: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]


class NM(Config):
    """N:M sparsity: keep ``n`` of every ``m`` consecutive input channels (e.g. 2:4)."""

    kind: Literal["nm"] = "nm"
    n: int = Field(..., ge=1)
    m: int = Field(..., ge=2)

    @model_validator(mode="after")
    def _check(self) -> NM:
        if self.n >= self.m:
            raise ValueError(f"n ({self.n}) must be < m ({self.m})")
        return self

    @property
    def sparsity(self) -> float:
        return (self.m - self.n) / self.m


Pattern = Annotated[Unstructured | Block | NM, Field(discriminator="kind")]


class MagnitudePruningConfig(Config):
    """Prune weights of the scoped Linear/Conv layers to a scheduled sparsity.

    Give either ``sparsity`` (one-shot: a constant schedule from step 0) or a ``schedule``.
    ``ranking="global"`` uses one threshold across layers, keeping at least
    ``1 - max_layer_sparsity`` of every layer.
    """

    kind: Literal["magnitude_prune"] = "magnitude_prune"
    scope: Scope = Scope()
    sparsity: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None
    schedule: AnySchedule | None = None
    ranking: Literal["local", "global"] = "local"
    importance: ImportanceName = "magnitude"
    ema_alpha: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.9
    pattern: Pattern = Unstructured()
    max_layer_sparsity: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.98

    @model_validator(mode="after")
    def _check(self) -> MagnitudePruningConfig:
        both = self.sparsity is not None and self.schedule is not None
        neither = self.sparsity is None and self.schedule is None
        if both or (neither and not isinstance(self.pattern, NM)):
            raise ValueError("give exactly one of 'sparsity' or 'schedule'")
        if isinstance(self.pattern, NM):
            if self.ranking == "global":
                raise ValueError("N:M sparsity is per group: use ranking 'local'")
            goal = self.sparsity if self.schedule is None else self.schedule.final_value
            if goal is not None and not math.isclose(goal, self.pattern.sparsity, abs_tol=1e-6):
                raise ValueError(
                    f"{self.pattern.n}:{self.pattern.m} sparsity is {self.pattern.sparsity:g}, "
                    f"but the target is {goal:g}"
                )
        return self

    @property
    def effective_schedule(self) -> Schedule:
        if self.schedule is not None:
            return self.schedule
        target = self.pattern.sparsity if isinstance(self.pattern, NM) else self.sparsity
        return ConstantSchedule(target=target, begin=0, end=0)


class WeightMask(nn.Module):
    """Parametrization ``w -> w * mask``; ``importance`` holds EMA/Taylor statistics."""

    def __init__(self, weight: torch.Tensor, track_importance: bool = True) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones_like(weight))
        shape = weight.shape if track_importance else (0,)
        self.register_buffer("importance", torch.zeros(shape, dtype=weight.dtype))
        self.register_buffer("importance_count", torch.zeros((), dtype=torch.long))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def weight_mask_of(module: nn.Module) -> WeightMask | None:
    """The :class:`WeightMask` on ``module.weight``, if any."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, WeightMask)), None)


def strip_pruning(model: nn.Module) -> nn.Module:
    """Bake every :class:`WeightMask` into a plain weight (in place) and return the model."""
    for module in model.modules():
        if weight_mask_of(module) is not None:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


@register_technique
class MagnitudePruning(Technique):
    """See :class:`MagnitudePruningConfig`."""

    kind = "magnitude_prune"
    config_class = MagnitudePruningConfig
    config: MagnitudePruningConfig

    def __init__(self, config: MagnitudePruningConfig) -> None:
        super().__init__(config)
        self.schedule = config.effective_schedule
        self.thresholds: dict[str, float] = {}
        self.target = 0.0
        self._final_rows: list[list[Any]] | None = None

    # --- planning ---------------------------------------------------------------------------
    def plan(self, model: nn.Module) -> Selection:
        selection = self.config.scope.select(
            model,
            is_weight_layer,
            technique=self.kind,
            describe_supported=WEIGHT_LAYER_NAMES,
        )
        pattern = self.config.pattern
        if isinstance(pattern, NM):
            kept = []
            for name, module in selection.selected:
                inputs = module.weight.shape[1]
                if inputs % pattern.m:
                    why = f"{inputs} input channels not divisible by m={pattern.m}"
                    selection.skipped.append((name, why))
                else:
                    kept.append((name, module))
            selection.selected = kept
        if not selection.selected:
            raise ConfigError(f"{self.kind}: no module left to prune after scope and pattern")
        return selection

    def apply(self, model: nn.Module) -> None:
        if self._already_applied(model):
            return
        check_unsharded(model, self.kind)
        selection = self.plan(model)
        for name, module in selection.selected:
            if weight_mask_of(module) is not None:
                raise StateError(f"{self.kind}: module {name!r} already has a pruning mask")
            tracked = self.config.importance in ("ema", "taylor")
            parametrize.register_parametrization(
                module, "weight", WeightMask(module.weight, track_importance=tracked)
            )
        if self.config.importance == "ema":
            for _, module in selection.selected:
                weight_mask_of(module).importance.copy_(magnitude_score(module.weight))
        self.selection = selection
        self._model = model

    # --- stepping ---------------------------------------------------------------------------
    def _states(self) -> list[tuple[str, nn.Module, WeightMask]]:
        selection = self._require_applied()
        return [(n, m, weight_mask_of(m)) for n, m in selection.selected]

    @torch.no_grad()  # statistics only: no graph through the weight's parametrizations
    def _update_statistics(self) -> None:
        importance = self.config.importance
        if importance not in ("ema", "taylor"):
            return
        for _, module, state in self._states():
            weight = module.weight
            if importance == "ema":
                state.importance.copy_(ema_update(state.importance, weight, self.config.ema_alpha))
                continue
            grad = module.parametrizations.weight.original.grad
            if grad is None:
                continue
            if int(state.importance_count) == 0:
                state.importance.zero_()
            state.importance.add_(taylor_score(weight, grad))
            state.importance_count += 1

    def _scores(self, module: nn.Module, state: WeightMask, name: str) -> torch.Tensor:
        if self.config.importance == "magnitude":
            return magnitude_score(module.weight)
        if self.config.importance == "lamp":
            return lamp_score(module.weight)
        if self.config.importance == "taylor":
            if int(state.importance_count) == 0:
                raise StateError(
                    f"{self.kind}: taylor importance for {name!r} has seen no gradient; start the "
                    "schedule after at least one backward pass (begin >= 1), and call "
                    "compressor.step() before optimizer.zero_grad()"
                )
            return state.importance / state.importance_count
        return state.importance

    def step(self, step: int) -> bool:
        """Update statistics; on schedule update steps recompute masks. True if masks moved."""
        super().step(step)
        if step > 0:
            self._update_statistics()
        if not self.schedule.is_update_step(step):
            return False
        target = self.schedule.value(step)
        if target <= 0.0 and self.target <= 0.0:
            return False
        self.target = target
        self._update_masks(target)
        return True

    @torch.no_grad()
    def _update_masks(self, target: float) -> None:
        """New masks at ``target``. Under DDP the EMA/Taylor statistics are averaged over the
        ranks before ranking and rank 0's masks are broadcast after, so every rank prunes the
        same weights even where floating point would split a tie differently."""
        states = self._states()
        check_unsharded(self._model, self.kind)  # sharded since apply: no full weights to rank
        pattern = self.config.pattern
        block = pattern.shape if isinstance(pattern, Block) else None
        if self.config.importance in ("ema", "taylor"):
            all_reduce_tensors_([s.importance for _, _, s in states], "mean")
        scores = [self._scores(m, s, n) for n, m, s in states]
        threshold = float("nan")
        if isinstance(pattern, NM):
            new = [
                M.nm_mask(sc, s.mask, pattern.n, pattern.m, target)
                for sc, (_, _, s) in zip(scores, states, strict=True)
            ]
        elif self.config.ranking == "global":
            new, threshold = M.global_masks(
                scores,
                [s.mask for _, _, s in states],
                target,
                self.config.max_layer_sparsity,
                block,
            )
        else:
            new = [
                M.layer_mask(sc, s.mask, target, block)
                for sc, (_, _, s) in zip(scores, states, strict=True)
            ]
        broadcast_tensors_(new)
        if self.config.ranking == "global" and not isinstance(pattern, NM):
            self.thresholds = {n: threshold for n, _, _ in states}
        else:
            self.thresholds = {
                n: _threshold(sc, nm) for (n, _, _), sc, nm in zip(states, scores, new, strict=True)
            }
        for (_, _, state), mask in zip(states, new, strict=True):
            state.mask.copy_(mask)
            if self.config.importance == "taylor":
                state.importance_count.zero_()

    # --- reporting --------------------------------------------------------------------------
    def layer_sparsity(self) -> dict[str, float]:
        return {n: M.mask_sparsity(s.mask) for n, _, s in self._states()}

    def overall_sparsity(self) -> float:
        states = self._states()
        zeros = sum(int((s.mask == 0).sum()) for _, _, s in states)
        return zeros / max(1, sum(s.mask.numel() for _, _, s in states))

    def scalars(self) -> dict[str, float]:
        """TensorBoard scalars: per-layer sparsity and threshold, overall sparsity, target."""
        if self._final_rows is not None:
            return {}
        out = {f"sparsity/{n}": v for n, v in self.layer_sparsity().items()}
        out.update({f"threshold/{n}": v for n, v in self.thresholds.items() if not math.isnan(v)})
        out["sparsity/overall"] = self.overall_sparsity()
        out["sparsity/target"] = self.target
        return out

    def _rows(self) -> list[list[Any]]:
        return [
            [
                n,
                module_type_name(m),
                s.mask.numel(),
                round(M.mask_sparsity(s.mask), 4),
                self.thresholds.get(n, float("nan")),
            ]
            for n, m, s in self._states()
        ]

    def summary(self) -> TechniqueSummary:
        selection = self._require_applied()
        rows = self._final_rows if self._final_rows is not None else self._rows()
        total = sum(r[2] for r in rows)
        zeros = sum(r[2] * r[3] for r in rows)
        return TechniqueSummary(
            technique=self.kind,
            columns=["module", "type", "weights", "sparsity", "threshold"],
            rows=rows,
            totals={
                "weights": total,
                "sparsity": round(zeros / max(1, total), 4),
                "target": self.target,
            },
            skipped=list(selection.skipped),
        )

    # --- finalize / state -------------------------------------------------------------------
    def finalize(self, model: nn.Module) -> nn.Module:
        self._final_rows = self._rows()
        for _, module, _ in self._states():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        return model

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(target=self.target, thresholds=dict(self.thresholds))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.target = float(state["target"])
        self.thresholds = {k: float(v) for k, v in state["thresholds"].items()}


def _threshold(scores: torch.Tensor, keep: torch.Tensor) -> float:
    """Highest score among pruned weights of one layer (NaN when nothing is pruned)."""
    pruned = scores[keep == 0]
    return float(pruned.max()) if pruned.numel() else float("nan")

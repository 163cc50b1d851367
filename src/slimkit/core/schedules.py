"""Schedules map an optimizer step to a target value (sparsity, bits, ...).

The math lives in pure functions (``constant_value``, ``polynomial_value``, ``trials_value``) and
``is_update_step``; the classes are thin validated configs over them. Every schedule answers two
questions for a step: ``value(step)`` (the target in force) and ``is_update_step(step)`` (whether a
technique should move toward it now). Before ``begin`` the value is ``0.0`` (nothing is pruned
yet), also for schedules that give an ``initial``; from ``begin`` on it never decreases.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, model_validator

from slimkit.core.config import Config

Unit = Annotated[float, Field(ge=0.0, lt=1.0)]


# --- pure functions -------------------------------------------------------------------------


def constant_value(step: int, target: float, begin: int) -> float:
    """``target`` from ``begin`` on, ``0.0`` before."""
    return target if step >= begin else 0.0


def polynomial_value(
    step: int, initial: float, final: float, begin: int, end: int, power: float
) -> float:
    """Zhu & Gupta (2017): ``final + (initial - final) * (1 - p) ** power``, p = progress in [0, 1].

    Before ``begin`` nothing is pruned yet (``0.0``); after ``end`` the value stays ``final``.
    """
    if step < begin:
        return 0.0
    progress = 1.0 if end == begin else min(1.0, (step - begin) / (end - begin))
    return final + (initial - final) * (1.0 - progress) ** power


def trials_value(
    step: int, initial: float, target: float, begin: int, num_trials: int, step_interval: int
) -> float:
    """EasyCompression's trials: reach ``target`` in ``num_trials`` equal increments.

    Trial ``k`` (1-based) happens at ``begin + (k - 1) * step_interval`` and sets
    ``initial + (target - initial) * k / num_trials``.
    """
    if step < begin:
        return 0.0
    done = min(num_trials, (step - begin) // step_interval + 1)
    return initial + (target - initial) * done / num_trials


def is_update_step(step: int, begin: int, end: int | None, frequency: int) -> bool:
    """True at ``begin``, every ``frequency`` steps after it, and at ``end`` itself."""
    if step < begin or (end is not None and step > end):
        return False
    return (step - begin) % frequency == 0 or step == end


# --- configs ----------------------------------------------------------------------------------


class Schedule(Config):
    """Base class: ``value(step)`` and ``is_update_step(step)``; ``final_value`` is the goal."""

    kind: str

    def value(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def is_update_step(self, step: int) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def final_value(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def last_update_step(self) -> int | None:
        """The step after which the value never changes (``None``: open-ended)."""
        return None


class ConstantSchedule(Schedule):
    """Hold ``target`` from ``begin``; re-apply every ``frequency`` steps until ``end`` (if set)."""

    kind: Literal["constant"] = "constant"
    target: Unit
    begin: int = Field(0, ge=0)
    end: int | None = Field(None, ge=0)
    frequency: int = Field(100, ge=1)

    @model_validator(mode="after")
    def _check(self) -> ConstantSchedule:
        if self.end is not None and self.begin > self.end:
            raise ValueError(f"begin ({self.begin}) must be <= end ({self.end})")
        return self

    def value(self, step: int) -> float:
        return constant_value(step, self.target, self.begin)

    def is_update_step(self, step: int) -> bool:
        return is_update_step(step, self.begin, self.end, self.frequency)

    @property
    def final_value(self) -> float:
        return self.target

    @property
    def last_update_step(self) -> int | None:
        return self.begin


class PolynomialSchedule(Schedule):
    """Gradual sparsity (Zhu & Gupta): ``initial`` at ``begin`` to ``final`` at ``end``, cubic."""

    kind: Literal["polynomial"] = "polynomial"
    initial: Unit = 0.0
    final: Unit
    begin: int = Field(0, ge=0)
    end: int = Field(..., ge=0)
    frequency: int = Field(100, ge=1)
    power: float = Field(3.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> PolynomialSchedule:
        if self.begin > self.end:
            raise ValueError(f"begin ({self.begin}) must be <= end ({self.end})")
        if self.initial > self.final:
            raise ValueError(f"initial ({self.initial}) must be <= final ({self.final})")
        return self

    def value(self, step: int) -> float:
        return polynomial_value(step, self.initial, self.final, self.begin, self.end, self.power)

    def is_update_step(self, step: int) -> bool:
        return is_update_step(step, self.begin, self.end, self.frequency)

    @property
    def final_value(self) -> float:
        return self.final

    @property
    def last_update_step(self) -> int:
        return self.end


class TrialsSchedule(Schedule):
    """EasyCompression: ``num_trials`` equal steps to ``target``, one every ``step_interval``."""

    kind: Literal["trials"] = "trials"
    initial: Unit = 0.0
    target: Unit
    begin: int = Field(0, ge=0)
    num_trials: int = Field(..., ge=1)
    step_interval: int = Field(..., ge=1)

    @model_validator(mode="after")
    def _check(self) -> TrialsSchedule:
        if self.initial > self.target:
            raise ValueError(f"initial ({self.initial}) must be <= target ({self.target})")
        return self

    def value(self, step: int) -> float:
        return trials_value(
            step, self.initial, self.target, self.begin, self.num_trials, self.step_interval
        )

    def is_update_step(self, step: int) -> bool:
        return is_update_step(step, self.begin, self.last_update_step, self.step_interval)

    @property
    def final_value(self) -> float:
        return self.target

    @property
    def last_update_step(self) -> int:
        return self.begin + (self.num_trials - 1) * self.step_interval


AnySchedule = Annotated[
    ConstantSchedule | PolynomialSchedule | TrialsSchedule, Field(discriminator="kind")
]


def steps_to_reach(schedule: Schedule, tolerance: float = 1e-9) -> int:
    """First step at which ``schedule.value`` reaches its final value (for tests and reports)."""
    last = schedule.last_update_step
    limit = last if last is not None else 10**6
    for step in range(limit + 1):
        if math.isclose(schedule.value(step), schedule.final_value, abs_tol=tolerance):
            return step
    return limit

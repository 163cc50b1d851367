"""Schedules: one contract over every schedule class, exact values, validation, serialisation."""

from __future__ import annotations

import itertools
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from slimkit.core.schedules import (
    AnySchedule,
    ConstantSchedule,
    PolynomialSchedule,
    Schedule,
    TrialsSchedule,
    polynomial_value,
    steps_to_reach,
)
from slimkit.errors import ConfigError

SCHEDULES: list[Schedule] = [
    ConstantSchedule(target=0.5),
    ConstantSchedule(target=0.7, begin=5, end=20, frequency=3),
    ConstantSchedule(target=0.0, begin=2),
    PolynomialSchedule(final=0.8, end=100, frequency=10),
    PolynomialSchedule(initial=0.1, final=0.9, begin=10, end=50, frequency=7, power=2.0),
    PolynomialSchedule(initial=0.3, final=0.3, begin=4, end=40, frequency=1, power=0.5),
    PolynomialSchedule(final=0.5, begin=5, end=5),
    TrialsSchedule(target=0.8, num_trials=4, step_interval=10),
    TrialsSchedule(initial=0.2, target=0.6, begin=3, num_trials=3, step_interval=5),
    TrialsSchedule(target=0.3, num_trials=1, step_interval=1),
]

SCHEDULE_ADAPTER: TypeAdapter[Schedule] = TypeAdapter(AnySchedule)


def test_every_schedule_class_is_covered_by_the_contract() -> None:
    union = typing.get_args(AnySchedule)[0]
    assert set(typing.get_args(union)) == {type(s) for s in SCHEDULES}


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_schedule_contract(schedule: Schedule) -> None:
    last = schedule.last_update_step
    assert last is not None and last >= schedule.begin
    values = [schedule.value(step) for step in range(last + 60)]

    assert all(0.0 <= v < 1.0 for v in values)
    assert all(a <= b for a, b in itertools.pairwise(values)), "must never decrease"
    assert all(v == 0.0 for v in values[: schedule.begin]), "nothing before begin"
    assert values[last] == pytest.approx(schedule.final_value)
    assert all(v == pytest.approx(schedule.final_value) for v in values[last:])
    assert steps_to_reach(schedule) <= last

    assert schedule.is_update_step(schedule.begin)
    assert schedule.is_update_step(last), "the step reaching the final value must be applied"
    if schedule.begin > 0:
        assert not schedule.is_update_step(schedule.begin - 1)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_round_trip_through_dict_gives_an_equal_schedule(schedule: Schedule) -> None:
    data = schedule.to_dict()
    assert data["kind"] == schedule.kind
    assert type(schedule).from_dict(data) == schedule
    assert SCHEDULE_ADAPTER.validate_python(data) == schedule  # dispatched on "kind"


def test_polynomial_exact_values() -> None:
    s = PolynomialSchedule(initial=0.1, final=0.9, begin=10, end=50, frequency=7)
    assert s.value(9) == 0.0
    assert s.value(10) == pytest.approx(0.1)
    assert s.value(30) == pytest.approx(0.9 + (0.1 - 0.9) * 0.5**3)
    assert s.value(50) == pytest.approx(0.9)
    assert s.value(10_000) == pytest.approx(0.9)
    assert [t for t in range(60) if s.is_update_step(t)] == [10, 17, 24, 31, 38, 45, 50]


def test_trials_exact_values() -> None:
    s = TrialsSchedule(target=0.8, num_trials=4, step_interval=10)
    assert [s.value(t) for t in range(10)] == pytest.approx([0.2] * 10)
    assert s.value(10) == pytest.approx(0.4)
    assert s.value(20) == pytest.approx(0.6)
    assert s.value(29) == pytest.approx(0.6)
    assert s.value(30) == pytest.approx(0.8)
    assert s.value(31) == s.value(1000) == pytest.approx(0.8)
    assert s.last_update_step == 30
    assert [t for t in range(100) if s.is_update_step(t)] == [0, 10, 20, 30]


def test_constant_exact_values() -> None:
    s = ConstantSchedule(target=0.5, begin=10)
    assert s.value(0) == s.value(9) == 0.0
    assert s.value(10) == s.value(10_000) == 0.5
    assert [t for t in range(250) if s.is_update_step(t)] == [10, 110, 210]
    bounded = ConstantSchedule(target=0.5, begin=0, end=0)
    assert [t for t in range(5) if bounded.is_update_step(t)] == [0]


@settings(max_examples=200, deadline=None)
@given(
    bounds=st.tuples(
        st.floats(0.0, 1.0, exclude_max=True), st.floats(0.0, 1.0, exclude_max=True)
    ).map(sorted),
    begin=st.integers(0, 1_000),
    span=st.integers(0, 1_000),
    power=st.floats(0.1, 10.0),
    steps=st.tuples(st.integers(0, 2_500), st.integers(0, 2_500)).map(sorted),
)
def test_polynomial_value_is_monotone_in_step(
    bounds: list[float], begin: int, span: int, power: float, steps: list[int]
) -> None:
    initial, final = bounds
    early, late = (
        polynomial_value(step, initial, final, begin, begin + span, power) for step in steps
    )
    assert 0.0 <= early <= late <= final


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (ConstantSchedule, {"target": 0.5, "begin": 10, "end": 5}, "begin"),
        (PolynomialSchedule, {"final": 0.5, "begin": 10, "end": 5}, "begin"),
        (ConstantSchedule, {"target": 1.0}, "target"),
        (PolynomialSchedule, {"final": 1.0, "end": 10}, "final"),
        (PolynomialSchedule, {"initial": -0.1, "final": 0.5, "end": 10}, "initial"),
        (TrialsSchedule, {"target": 1.0, "num_trials": 2, "step_interval": 1}, "target"),
        (ConstantSchedule, {"target": 0.5, "begin": -1}, "begin"),
        (PolynomialSchedule, {"final": 0.5, "begin": -1, "end": 10}, "begin"),
        (
            TrialsSchedule,
            {"target": 0.5, "begin": -1, "num_trials": 2, "step_interval": 1},
            "begin",
        ),
        (ConstantSchedule, {"target": 0.5, "frequency": 0}, "frequency"),
        (PolynomialSchedule, {"final": 0.5, "end": 10, "frequency": 0}, "frequency"),
        (TrialsSchedule, {"target": 0.5, "num_trials": 2, "step_interval": 0}, "step_interval"),
        (TrialsSchedule, {"target": 0.5, "num_trials": 0, "step_interval": 1}, "num_trials"),
        (PolynomialSchedule, {"initial": 0.6, "final": 0.2, "end": 10}, "initial"),
        (
            TrialsSchedule,
            {"initial": 0.6, "target": 0.2, "num_trials": 2, "step_interval": 1},
            "initial",
        ),
        (PolynomialSchedule, {"final": 0.5, "end": 10, "power": 0}, "power"),
        (PolynomialSchedule, {"final": 0.5}, "end"),
        (ConstantSchedule, {"target": 0.5, "frequncy": 3}, "frequncy"),
    ],
)
def test_invalid_schedule_raises_config_error_naming_the_field(
    cls: type[Schedule], kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError) as info:
        cls(**kwargs)
    message = str(info.value)
    assert message.startswith(f"{cls.__name__}: ")
    assert field in message
    assert "\n" not in message
    assert isinstance(info.value, ValueError)


def test_range_error_says_what_was_expected_and_received() -> None:
    with pytest.raises(ConfigError) as info:
        PolynomialSchedule(final=1.0, end=10)
    assert info.value.fields == [("final", "Input should be less than 1 (got 1.0)")]
    with pytest.raises(ConfigError, match=r"begin \(10\) must be <= end \(5\)"):
        PolynomialSchedule(final=0.5, begin=10, end=5)

"""Sensitivity allocation on hand-made curves: insensitive groups go first, the target is met,
the per-group cap holds, and an unreachable target names the best reachable reduction."""

from __future__ import annotations

import pytest
import torch

from slimkit import ConfigError
from slimkit.prune.allocation import (
    GroupCurve,
    allocate_sensitivity,
    greedy_path,
    predicted_drop,
    predicted_reduction,
    trim_overshoot,
)
from slimkit.prune.channel_importance import global_prune_counts

GRID = (0.25, 0.5, 0.75)


def curve(drops, costs=(0.1, 0.2, 0.3)) -> GroupCurve:
    return GroupCurve(GRID, tuple(drops), tuple(costs))


def test_the_insensitive_group_is_pruned_first():
    curves = {"robust": curve((0.0, 0.01, 0.02)), "fragile": curve((0.2, 0.5, 0.9))}
    assert allocate_sensitivity(curves, 0.2) == {"robust": 0.5, "fragile": 0.0}
    result = allocate_sensitivity(curves, 0.35)  # beyond what robust alone can give (0.3)
    assert result == {"robust": 0.75, "fragile": 0.25}
    assert predicted_reduction(curves, result) >= 0.35
    assert predicted_drop(curves, result) == pytest.approx(0.22)


def test_the_target_is_met_with_the_shortest_prefix():
    curves = {
        "a": curve((0.01, 0.03, 0.2), (0.05, 0.1, 0.15)),
        "b": curve((0.02, 0.04, 0.06), (0.1, 0.2, 0.3)),
        "c": curve((0.0, 0.1, 0.5), (0.02, 0.04, 0.06)),
    }
    path = greedy_path(curves)
    assert [s.reduction for s in path] == sorted(s.reduction for s in path)
    for target in (0.01, 0.1, 0.25, 0.4):
        result = allocate_sensitivity(curves, target)
        reached = predicted_reduction(curves, result)
        assert reached >= target - 1e-12
        # one step fewer would not have reached it
        before = [s.reduction for s in path if s.reduction < reached - 1e-12]
        assert not before or before[-1] < target


def test_a_non_convex_curve_is_crossed_along_its_lower_hull():
    # "bumpy" drops a lot at 0.25 but nothing more after: its next point (0.3 per 0.1 saved)
    # is worse than "steady" (0.15 per 0.1), the jump to 0.75 (0.3 per 0.3) is better
    curves = {"bumpy": curve((0.3, 0.3, 0.3)), "steady": curve((0.15, 0.3, 0.45))}
    first = greedy_path(curves)[0]
    assert (first.group, first.sparsity) == ("bumpy", 0.75)


def test_the_per_group_cap_and_an_unreachable_target():
    curves = {"a": curve((0.0, 0.0, 0.0)), "b": curve((0.1, 0.2, 0.3))}
    result = allocate_sensitivity(curves, 0.4, max_layer_sparsity=0.5)
    assert max(result.values()) <= 0.5 and predicted_reduction(curves, result) >= 0.4
    with pytest.raises(
        ConfigError, match=r"reduction of 0\.5 is out of reach.*best reachable is 0\.4000"
    ):
        allocate_sensitivity(curves, 0.5, max_layer_sparsity=0.5)


def test_sensitivity_allocation_beats_uniform_on_hand_made_curves():
    curves = {
        "a": curve((0.0, 0.02, 0.1), (0.1, 0.2, 0.3)),
        "b": curve((0.05, 0.2, 0.6), (0.05, 0.1, 0.15)),
        "c": curve((0.01, 0.05, 0.08), (0.02, 0.04, 0.06)),
    }
    for sparsity in GRID:
        uniform = dict.fromkeys(curves, sparsity)
        result = allocate_sensitivity(curves, predicted_reduction(curves, uniform))
        assert predicted_drop(curves, result) <= predicted_drop(curves, uniform) + 1e-12


def test_rounding_points_that_save_nothing_are_stepped_over():
    curves = {"a": curve((0.0, 0.0, 0.01), (0.0, 0.0, 0.3))}
    assert allocate_sensitivity(curves, 0.1) == {"a": 0.75}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (((0.5, 0.25), (0, 0), (0, 0)), "must increase"),
        (((0.5, 1.0), (0, 0), (0, 0)), r"in \(0, 1\)"),
        (((0.5,), (0, 0), (0,)), "one drop and one cost per sparsity"),
    ],
)
def test_bad_curves(args, message):
    with pytest.raises(ConfigError, match=message):
        GroupCurve(*args)
    with pytest.raises(ConfigError, match="must be in"):
        allocate_sensitivity({}, 1.0)


def test_global_counts_refer_to_the_original_widths():
    scores = [torch.arange(1.0, 9.0), torch.arange(1.0, 17.0)]
    one_shot = global_prune_counts(scores, 0.5, 0.9)
    first = global_prune_counts(scores, 0.25, 0.9)
    rest = global_prune_counts(
        [s[c:] for s, c in zip(scores, first, strict=True)], 0.5, 0.9, original=[8, 16]
    )
    assert [a + b for a, b in zip(first, rest, strict=True)] == one_shot
    # the cap counts what earlier passes removed
    assert global_prune_counts([torch.ones(2)], 0.9, 0.75, original=[8]) == [0]


def additive_reaches(curves, target):
    return lambda chosen: predicted_reduction(curves, chosen) >= target - 1e-12


def test_trim_takes_back_an_overshooting_last_jump():
    # b is cheap to prune but its only grid step removes 0.5 of the model at once
    curves = {
        "a": curve((0.01, 0.02, 0.03), (0.1, 0.2, 0.3)),
        "b": GroupCurve((0.5,), (0.0,), (0.5,)),
    }
    overshooting = {"a": 0.75, "b": 0.5}  # reduction 0.8 for a target of 0.5
    trimmed = trim_overshoot(curves, overshooting, additive_reaches(curves, 0.5))
    assert trimmed == {"b": 0.5}  # a is not needed at all
    assert predicted_reduction(curves, trimmed) == pytest.approx(0.5)
    assert predicted_drop(curves, trimmed) < predicted_drop(curves, overshooting)


def test_trim_keeps_an_allocation_that_is_already_tight_and_never_raises_the_drop():
    curves = {"a": curve((0.01, 0.02, 0.03)), "b": curve((0.0, 0.5, 0.4))}
    tight = {"a": 0.75, "b": 0.5}  # reduction exactly 0.5
    assert trim_overshoot(curves, tight, additive_reaches(curves, 0.5)) == tight
    # from b=0.75, stepping b to 0.5 would raise the predicted drop (0.4 -> 0.5): never chosen;
    # b=0.25 reaches 0.4 and drops nothing
    loose = {"a": 0.75, "b": 0.75}
    assert trim_overshoot(curves, loose, additive_reaches(curves, 0.4)) == {"a": 0.75, "b": 0.25}

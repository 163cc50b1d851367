"""TensorBoard event files and console tables written from a real pruning run."""

from __future__ import annotations

import io
import itertools
from collections import OrderedDict

import pytest
import torch
from rich.console import Console
from torch import nn
from torch.nn import functional as F

from slimkit import (
    Compressor,
    ConfigError,
    MagnitudePruning,
    MagnitudePruningConfig,
    PolynomialSchedule,
)
from slimkit.prune.masks import prune_count
from slimkit.report.table import print_summary
from slimkit.report.tensorboard import CompressionSummaries, read_scalars

# acts at steps 1 (target 0.1), 3, 5 and 7 (0.6)
SCHEDULE = PolynomialSchedule(initial=0.1, final=0.6, begin=1, end=7, frequency=2)


def build_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            embed=nn.Embedding(10, 8),  # not prunable: reported as skipped
            fc1=nn.Linear(8, 16),
            act=nn.ReLU(),
            fc2=nn.Linear(16, 4),
        )
    )


def run(log_dir=None, steps: int = 9):
    """Train a few steps; return the technique and what it reported at each step."""
    model = build_model()
    technique = MagnitudePruning(MagnitudePruningConfig(schedule=SCHEDULE))
    compressor = Compressor([technique]).apply(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = {0: (technique.overall_sparsity(), technique.layer_sparsity(), {})}
    summaries = CompressionSummaries(log_dir, every=1000) if log_dir else None
    if summaries:
        summaries.log_compressor(compressor)  # step 0 is periodic (0 % every == 0)
    for i in range(1, steps + 1):
        gen = torch.Generator().manual_seed(i)
        tokens = torch.randint(0, 10, (6,), generator=gen)
        F.mse_loss(model(tokens), torch.randn(6, 4, generator=gen)).backward()
        optimizer.step()
        optimizer.zero_grad()
        compressor.step()
        seen[i] = (
            technique.overall_sparsity(),
            technique.layer_sparsity(),
            dict(technique.thresholds),
        )
        if summaries:
            summaries.log_compressor(compressor)
            summaries.log_scalars({"train/loss_scaled": float(i) / 10}, i)
    if summaries:
        summaries.close()
    return technique, compressor, seen


def test_event_files_hold_overall_and_per_layer_series(tmp_path):
    technique, _, seen = run(tmp_path)
    assert list(tmp_path.glob("events.out.tfevents.*"))
    scalars = read_scalars(tmp_path)

    overall = scalars["magnitude_prune/sparsity/overall"]
    steps = [s for s, _ in overall]
    assert steps == [0, 1, 3, 5, 7]  # step 0 (periodic) and the update steps only
    values = [v for _, v in overall]
    assert values[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(values[1:]))
    for step, value in overall:
        assert value == pytest.approx(seen[step][0], abs=1e-6)
    total = 8 * 16 + 16 * 4
    assert values[-1] == pytest.approx(
        (prune_count(128, 0.6) + prune_count(64, 0.6)) / total, abs=1e-6
    )

    target = scalars["magnitude_prune/sparsity/target"]
    assert [(s, v) for s, v in target] == [
        (s, pytest.approx(SCHEDULE.value(s) if s else 0.0, abs=1e-6)) for s in steps
    ]

    for layer in ("fc1", "fc2"):
        sparsity = scalars[f"magnitude_prune/sparsity/{layer}"]
        assert [s for s, _ in sparsity] == steps
        for step, value in sparsity:
            assert value == pytest.approx(seen[step][1][layer], abs=1e-6)
        threshold = scalars[f"magnitude_prune/threshold/{layer}"]
        assert [s for s, _ in threshold] == [1, 3, 5, 7]  # NaN (nothing pruned) is not written
        for step, value in threshold:
            assert value == pytest.approx(seen[step][2][layer], rel=1e-6)
        assert all(v > 0 for _, v in threshold)
    assert "magnitude_prune/sparsity/embed" not in scalars
    assert technique.target == pytest.approx(0.6)

    assert [s for s, _ in scalars["train/loss_scaled"]] == list(range(1, 10))
    assert scalars["train/loss_scaled"][-1][1] == pytest.approx(0.9)


def test_periodic_logging_and_force(tmp_path):
    model = build_model()
    compressor = Compressor([MagnitudePruningConfig(sparsity=0.5)]).apply(model)
    with CompressionSummaries(tmp_path, every=3) as summaries:
        written = []
        for _ in range(7):
            compressor.step()
            written.append(summaries.log_compressor(compressor))
        written.append(summaries.log_compressor(compressor, force=True))
    # 2 layers x (sparsity, threshold) + overall + target = 6 scalars per write
    assert written == [0, 0, 6, 0, 0, 6, 0, 6]
    overall = read_scalars(tmp_path)["magnitude_prune/sparsity/overall"]
    assert [s for s, _ in overall] == [3, 6, 7]
    assert all(v == pytest.approx(0.5, abs=0.01) for _, v in overall)


@pytest.mark.parametrize("every", [0, -5])
def test_summaries_reject_a_non_positive_period(tmp_path, every):
    with pytest.raises(ConfigError, match="every"):
        CompressionSummaries(tmp_path, every=every)
    assert not list(tmp_path.glob("events.out.tfevents.*"))


def render(summary) -> str:
    console = Console(record=True, width=120, color_system=None, file=io.StringIO())
    print_summary(summary, console=console)
    return console.export_text()


def test_print_summary_lists_layers_and_skipped_modules(tmp_path):
    technique, compressor, _ = run(steps=9)
    summary = technique.summary()
    text = render(summary)
    assert "magnitude_prune: per layer" in text
    lines = text.splitlines()
    header = next(line for line in lines if "module" in line and "sparsity" in line)
    for column in ("module", "type", "weights", "sparsity", "threshold"):
        assert column in header
    rows = {}
    for line in lines:
        cells = [c.strip() for c in line.replace("│", "|").split("|") if c.strip()]
        if cells and cells[0] in ("fc1", "fc2"):
            rows[cells[0]] = cells
    assert set(rows) == {"fc1", "fc2"}
    sparsities = technique.layer_sparsity()
    for name, weights in (("fc1", 128), ("fc2", 64)):
        cells = rows[name]
        assert cells[1] == "Linear"  # the user-facing class, not ParametrizedLinear
        assert cells[2] == str(weights)
        assert float(cells[3]) == pytest.approx(sparsities[name], abs=1e-4)
        assert float(cells[4]) == pytest.approx(technique.thresholds[name], rel=1e-3)
    assert "skipped embed: Embedding is not supported by magnitude_prune" in text
    assert "totals:" in text and "weights=192" in text
    # the same table after finalize (rows are frozen at finalize time)
    compressor.finalize()
    assert render(technique.summary()) == text


def test_print_summary_renders_nan_threshold_as_dash():
    model = build_model()
    technique = MagnitudePruning(
        MagnitudePruningConfig(schedule=PolynomialSchedule(final=0.5, begin=5, end=10))
    )
    Compressor([technique]).apply(model)  # nothing pruned yet
    text = render(technique.summary())
    fc1 = next(line for line in text.splitlines() if "fc1" in line)
    cells = [c.strip() for c in fc1.replace("│", "|").split("|") if c.strip()]
    assert cells[1:] == ["Linear", "128", "0", "-"]

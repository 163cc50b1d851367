"""TensorBoard summaries of a compression run, written by a real ``SummaryWriter``.

Each technique's :meth:`~slimkit.core.technique.Technique.scalars` (for pruning: per-layer sparsity
and threshold, overall sparsity, target) are written at every step where it acted, and every
``every`` steps in between, under the technique's kind (``magnitude_prune/sparsity/layer1.conv``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimkit.core.compressor import Compressor
from slimkit.errors import ConfigError


class CompressionSummaries:
    """Write technique scalars and training metrics to TensorBoard event files in ``log_dir``."""

    def __init__(self, log_dir: str | Path, *, every: int = 50) -> None:
        from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard is heavy

        if every < 1:
            raise ConfigError(f"CompressionSummaries: every must be >= 1 step, got {every!r}")
        self.log_dir = Path(log_dir)
        self.every = every
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_compressor(self, compressor: Compressor, *, force: bool = False) -> int:
        """Write scalars of techniques that acted this step (or all, every ``every`` steps)."""
        step = compressor.step_count
        periodic = force or step % self.every == 0
        written = 0
        for technique in compressor.techniques:
            if not (periodic or technique in compressor.updated):
                continue
            for tag, value in technique.scalars().items():
                self.writer.add_scalar(f"{technique.kind}/{tag}", value, step)
                written += 1
        return written

    def log_scalars(self, scalars: dict[str, Any], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, float(value), step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()

    def __enter__(self) -> CompressionSummaries:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Read every scalar series from the event files in ``log_dir`` (for tests and reports)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

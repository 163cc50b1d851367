"""``slimkit bench``: latency and size of one ONNX model in ONNX Runtime, stated honestly.

Latency is the median of ``repeats`` timed ``session.run`` calls after ``warmup`` untimed ones,
per batch size, with an explicit intra-op thread count; the report carries the CPU's ISA flags
(int8 kernels differ with and without VNNI).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from slimkit.errors import ConfigError, first_line
from slimkit.measure.latency import LatencyResult, cpu_info, measure_ort_latency


@dataclass
class BenchReport:
    path: str
    bytes: int
    threads: int
    results: list[LatencyResult]
    cpu: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "bytes": self.bytes,
            "threads": self.threads,
            "results": [r.to_dict() for r in self.results],
            "cpu": self.cpu,
        }

    def table(self) -> Table:
        isa = ", ".join(k for k, v in (self.cpu.get("isa") or {}).items() if v) or "unknown"
        table = Table(
            title=f"{self.path}: {self.bytes / 1024:.1f} KiB, ORT threads {self.threads}",
            caption=f"CPU: {self.cpu.get('model_name', '?')} ({isa})",
            title_justify="left",
        )
        for column in ("batch", "median ms", "p90 ms", "min ms", "per sample ms", "repeats"):
            table.add_column(column, justify="right")
        for r in self.results:
            table.add_row(
                str(r.batch_size),
                f"{r.median_ms:.3f}",
                f"{r.p90_ms:.3f}",
                f"{r.min_ms:.3f}",
                f"{r.per_sample_ms:.4f}",
                str(r.repeats),
            )
        return table


def bench_onnx(
    path: str | Path,
    *,
    batch_sizes: tuple[int, ...] = (1, 32),
    threads: int = 1,
    repeats: int = 50,
    warmup: int = 10,
) -> BenchReport:
    """Measure ``path`` at each batch size; a missing or non-ONNX file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model not found: {path}")
    if any(b < 1 for b in batch_sizes):
        raise ConfigError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    try:
        results = [
            measure_ort_latency(path, batch_size=b, threads=threads, warmup=warmup, repeats=repeats)
            for b in batch_sizes
        ]
    except ConfigError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        first = first_line(exc)[:200]
        raise ConfigError(f"cannot run {path} in ONNX Runtime: {first}") from None
    return BenchReport(str(path), path.stat().st_size, threads, results, cpu_info())

"""The measured gate after every stage: did the stage keep the metric and not slow the model?

Pure: numbers in, violation messages out. The runner measures (validation metric in PyTorch,
ONNX Runtime latency interleaved with the previous stage's model) and acts on the messages.
"""

from __future__ import annotations

__all__ = ["gate_violations"]


def gate_violations(
    *,
    metric_name: str,
    baseline_metric: float,
    metric: float,
    max_metric_drop: float | None,
    latency_ratio: float | None,
    max_latency_ratio: float | None,
    latency_batch: int | None = None,
) -> list[str]:
    """Messages for each bound the stage broke (empty: it passed).

    ``metric`` and ``baseline_metric`` are "higher is better" validation metrics; the drop is
    ``baseline_metric - metric``. ``latency_ratio`` is the stage's ONNX Runtime latency divided
    by the previous stage's (None: not measured). A bound of None is not checked.

    >>> gate_violations(metric_name="accuracy", baseline_metric=0.99, metric=0.95,
    ...                 max_metric_drop=0.01, latency_ratio=1.2, max_latency_ratio=1.05,
    ...                 latency_batch=64)  # doctest: +NORMALIZE_WHITESPACE
    ['val accuracy 0.9500 is 0.0400 below the baseline 0.9900 (max_metric_drop 0.0100)',
     'ONNX Runtime latency at batch 64 is x1.200 the previous stage (max_latency_ratio 1.050)']
    """
    violations = []
    drop = baseline_metric - metric
    if max_metric_drop is not None and drop > max_metric_drop + 1e-12:
        violations.append(
            f"val {metric_name} {metric:.4f} is {drop:.4f} below the baseline "
            f"{baseline_metric:.4f} (max_metric_drop {max_metric_drop:.4f})"
        )
    if latency_ratio is not None and max_latency_ratio is not None:
        if latency_ratio > max_latency_ratio:
            where = f" at batch {latency_batch}" if latency_batch is not None else ""
            violations.append(
                f"ONNX Runtime latency{where} is x{latency_ratio:.3f} the previous stage "
                f"(max_latency_ratio {max_latency_ratio:.3f})"
            )
    return violations

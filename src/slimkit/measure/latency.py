"""Latency in ONNX Runtime (the number that matters) and in PyTorch, measured reproducibly.

Sessions use explicit thread counts and sequential execution; inputs are synthesised from the
model's input metadata with a fixed seed; each measurement is ``warmup`` untimed runs followed by
``repeats`` runs timed with ``time.perf_counter``, summarised by the median. ``compare_latency``
interleaves several models so that drift on a shared machine hits all of them equally, and
``cpu_info`` records the CPU features that decide which int8 kernels ONNX Runtime uses.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from slimkit.errors import ConfigError
from slimkit.export.onnx import PathLike, ort_optimization_level

DEFAULT_SYMBOLIC_DIM = 16  # sequence length and any other named dim without a default


@dataclasses.dataclass(frozen=True)
class LatencyResult:
    """Summary of one latency measurement; times in milliseconds per ``run`` call."""

    batch_size: int
    threads: int
    warmup: int
    repeats: int
    median_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    per_sample_ms: float
    provider: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_counts(warmup: int, repeats: int, threads: int | None = None) -> None:
    if warmup < 0:
        raise ConfigError(f"warmup must be >= 0, got {warmup}")
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")


def time_callable(fn: Callable[[], Any], *, warmup: int = 10, repeats: int = 50) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times; return seconds per call."""
    _check_counts(warmup, repeats)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _summarise(
    seconds: Sequence[float], batch_size: int, threads: int, warmup: int, provider: str
) -> LatencyResult:
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    median = float(np.median(ms))
    return LatencyResult(
        batch_size=batch_size,
        threads=threads,
        warmup=warmup,
        repeats=len(ms),
        median_ms=median,
        p90_ms=float(np.percentile(ms, 90)),
        min_ms=float(ms.min()),
        mean_ms=float(ms.mean()),
        per_sample_ms=median / batch_size,
        provider=provider,
    )


def ort_session(
    path: PathLike, *, threads: int = 1, optimization: str = "all"
) -> ort.InferenceSession:
    """CPU session: ``threads`` intra-op threads, one inter-op thread, sequential execution."""
    _check_counts(0, 1, threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort_optimization_level(optimization)
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def synthetic_inputs(
    session: ort.InferenceSession,
    *,
    batch_size: int = 1,
    dim_defaults: Mapping[str, int] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Inputs built from ``session``'s metadata.

    Axis 0 becomes ``batch_size`` (an error if it is fixed to another size); other named axes take
    ``dim_defaults[name]`` or 16. Float inputs are standard normal; integer inputs are token ids in
    [0, 100), except names containing ``mask`` (all ones) or ``type_ids`` (all zeros).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    defaults = dict(dim_defaults or {})
    rng = np.random.default_rng(seed)
    inputs: dict[str, np.ndarray] = {}
    for meta in session.get_inputs():
        if meta.shape and isinstance(meta.shape[0], int) and meta.shape[0] != batch_size:
            raise ConfigError(
                f"input {meta.name!r} has a fixed batch of {meta.shape[0]}, cannot run "
                f"batch_size={batch_size}; export with a dynamic batch axis"
            )
        shape = [batch_size] if meta.shape else []
        for dim in meta.shape[1:]:
            fixed = isinstance(dim, int)
            shape.append(dim if fixed else int(defaults.get(dim, DEFAULT_SYMBOLIC_DIM)))
        dtype, name = _DTYPES.get(meta.type), meta.name.lower()
        if dtype is None:
            raise ConfigError(f"cannot synthesise input {meta.name!r} of type {meta.type}")
        if np.issubdtype(dtype, np.floating):
            inputs[meta.name] = rng.standard_normal(shape).astype(dtype)
        elif "mask" in name or dtype is np.bool_:
            inputs[meta.name] = np.ones(shape, dtype=dtype)
        elif "type_ids" in name:
            inputs[meta.name] = np.zeros(shape, dtype=dtype)
        else:
            inputs[meta.name] = rng.integers(0, 100, shape).astype(dtype)
    return inputs


def measure_ort_latency(
    path: PathLike,
    inputs: Mapping[str, np.ndarray] | None = None,
    *,
    batch_size: int = 1,
    threads: int = 1,
    warmup: int = 10,
    repeats: int = 50,
    input_factory: Callable[[int], Mapping[str, np.ndarray]] | None = None,
    dim_defaults: Mapping[str, int] | None = None,
    optimization: str = "all",
) -> LatencyResult:
    """Median latency of ``session.run`` on the model at ``path``.

    Inputs come from ``inputs``, else ``input_factory(batch_size)``, else :func:`synthetic_inputs`.
    Given inputs must have ``batch_size`` rows; ``per_sample_ms`` is ``median_ms / batch_size``.
    """
    _check_counts(warmup, repeats, threads)
    session = ort_session(path, threads=threads, optimization=optimization)
    if inputs is None and input_factory is None:
        feed = synthetic_inputs(session, batch_size=batch_size, dim_defaults=dim_defaults)
    else:
        feed = dict(inputs if inputs is not None else input_factory(batch_size))  # type: ignore[misc]
    for name, array in feed.items():
        if np.ndim(array) > 0 and np.shape(array)[0] != batch_size:
            raise ConfigError(
                f"input {name!r} has shape {np.shape(array)}, expected batch_size={batch_size} rows"
            )
    times = time_callable(lambda: session.run(None, feed), warmup=warmup, repeats=repeats)
    provider = session.get_providers()[0]
    return _summarise(times, batch_size, threads, warmup, provider)


def compare_latency(
    paths: Mapping[str, PathLike],
    *,
    batch_sizes: Sequence[int] = (1, 64),
    threads: int = 1,
    rounds: int = 3,
    warmup: int = 10,
    repeats: int = 50,
    dim_defaults: Mapping[str, int] | None = None,
    optimization: str = "all",
) -> dict[str, Any]:
    """Measure several models interleaved and report each against the first one.

    Each round measures every (batch size, model) pair once, rotating the model order between
    rounds. ``results[name][batch]`` holds ``median_ms`` (the median over rounds of each round's
    median), ``per_sample_ms``, ``rounds_ms`` and ``ratio`` = median_ms / the first model's
    median_ms at that batch size (> 1 means slower than the reference).
    """
    if not paths:
        raise ConfigError("compare_latency needs at least one model path, got none")
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    _check_counts(warmup, repeats, threads)
    names = list(paths)
    sessions = {n: ort_session(paths[n], threads=threads, optimization=optimization) for n in names}
    feeds = {
        (n, b): synthetic_inputs(sessions[n], batch_size=b, dim_defaults=dim_defaults)
        for n in names
        for b in batch_sizes
    }
    rounds_ms: dict[str, dict[int, list[float]]] = {n: {b: [] for b in batch_sizes} for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for b in batch_sizes:
            for n in order:
                session, feed = sessions[n], feeds[(n, b)]
                times = time_callable(
                    lambda s=session, f=feed: s.run(None, f), warmup=warmup, repeats=repeats
                )
                rounds_ms[n][b].append(statistics.median(times) * 1e3)
    results: dict[str, dict[int, dict[str, Any]]] = {n: {} for n in names}
    for b in batch_sizes:
        ref = statistics.median(rounds_ms[names[0]][b])
        for n in names:
            median = statistics.median(rounds_ms[n][b])
            results[n][b] = {
                "median_ms": median,
                "per_sample_ms": median / b,
                "rounds_ms": rounds_ms[n][b],
                "ratio": median / ref,
            }
    return {
        "reference": names[0],
        "threads": threads,
        "rounds": rounds,
        "warmup": warmup,
        "repeats": repeats,
        "batch_sizes": list(batch_sizes),
        "results": results,
        "cpu": cpu_info(),
    }


def measure_torch_latency(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | torch.Tensor,
    *,
    warmup: int = 10,
    repeats: int = 50,
    threads: int | None = None,
) -> LatencyResult:
    """Median forward latency in PyTorch (eval mode, ``torch.no_grad``).

    The batch size is axis 0 of the first input. ``threads`` sets ``torch.set_num_threads`` for the
    measurement only; training flags and the thread count are restored afterwards.
    """
    _check_counts(warmup, repeats, threads)
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    batch_size = int(first.shape[0]) if first is not None and first.dim() > 0 else 1
    modes = {module: module.training for module in model.modules()}
    previous_threads = torch.get_num_threads()
    model.eval()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.no_grad():
            times = time_callable(lambda: model(*args), warmup=warmup, repeats=repeats)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
        for module, training in modes.items():
            module.training = training
    return _summarise(times, batch_size, used, warmup, "torch")


ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx")


def cpu_info() -> dict[str, Any]:
    """CPU model, core counts, int8-relevant ISA flags and library versions.

    ``isa`` maps each of :data:`ISA_FLAGS` to True/False read from ``/proc/cpuinfo`` (``amx`` means
    ``amx_int8``). Without ``/proc/cpuinfo`` (non-Linux) every flag is None (unknown).
    """
    model_name = ""
    flags: set[str] | None = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model_name:
                    model_name = value.strip()
                elif key in ("flags", "Features") and flags is None:
                    flags = set(value.split())
    except OSError:
        pass
    model_name = model_name or platform.processor() or platform.machine()
    if flags is None:
        isa: dict[str, bool | None] = dict.fromkeys(ISA_FLAGS)
    else:
        isa = {flag: flag in flags for flag in ISA_FLAGS}
        isa["amx"] = "amx_int8" in flags
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "model_name": model_name,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "isa": isa,
        "platform": platform.platform(),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
    }


__all__ = [
    "ISA_FLAGS",
    "LatencyResult",
    "compare_latency",
    "cpu_info",
    "measure_ort_latency",
    "measure_torch_latency",
    "ort_session",
    "synthetic_inputs",
    "time_callable",
]

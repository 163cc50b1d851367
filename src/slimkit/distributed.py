"""Multi-process helpers over ``torch.distributed``; each one is a no-op in a single process.

slimkit runs a recipe on N processes started by ``torchrun`` (``slimkit compress RECIPE --nproc
N`` starts it for you). :func:`init_from_env` joins the process group torchrun describes in the
environment; afterwards techniques keep their decisions identical on every rank through the
helpers here (broadcast a mask from rank 0, all-reduce calibration statistics), and only the
main process (rank 0) writes files.

>>> rank(), world_size(), is_main(), is_distributed()
(0, 1, True, False)
>>> all_reduce_(torch.tensor([1.0, 2.0]), "sum")  # one process: unchanged
tensor([1., 2.])
>>> on_main(lambda: 42)
42
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch import nn

from slimkit.errors import ConfigError, UnsupportedModuleError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ShardedBatches",
    "all_reduce_",
    "all_reduce_tensors_",
    "barrier",
    "broadcast_object",
    "broadcast_tensor_",
    "broadcast_tensors_",
    "check_unsharded",
    "init_from_env",
    "is_distributed",
    "is_main",
    "launched_by_torchrun",
    "main_process_first",
    "on_main",
    "only_main",
    "rank",
    "shard_rows",
    "shutdown",
    "world_size",
]

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800.0  # a collective that waits longer than this fails the job
_OPS = ("sum", "mean", "min", "max")


# --- where am I -----------------------------------------------------------------------------------
def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return _initialized() and torch.distributed.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 in a single process)."""
    return torch.distributed.get_rank() if _initialized() else 0


def world_size() -> int:
    """Number of processes in the default group (1 in a single process)."""
    return torch.distributed.get_world_size() if _initialized() else 1


def is_main() -> bool:
    """True on rank 0, the process that evaluates, measures and writes files."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True when the environment describes a process group (``torchrun`` sets these)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_from_env(backend: str | None = None, timeout: float | timedelta | None = None) -> bool:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``); True if this call created it.

    ``backend``: default ``gloo``, or ``cpu:gloo,cuda:nccl`` when CUDA is available (CPU
    tensors then travel over gloo, CUDA tensors over NCCL; each process uses GPU
    ``LOCAL_RANK`` where there is one). ``timeout`` (seconds or a timedelta, default
    :data:`DEFAULT_TIMEOUT_S`) bounds every collective, so a rank that stops answering fails the
    job instead of hanging it.
    Without torchrun's variables, or when a group exists already, nothing happens.
    """
    if _initialized() or not launched_by_torchrun():
        return False
    if not torch.distributed.is_available():
        raise ConfigError("torch.distributed is not available in this PyTorch build")
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "nccl" in backend and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
    seconds = DEFAULT_TIMEOUT_S if seconds is None else float(seconds)
    if seconds <= 0:
        raise ConfigError(f"timeout must be positive seconds, got {seconds:g}")
    torch.distributed.init_process_group(backend, timeout=timedelta(seconds=seconds))
    return True


def shutdown() -> None:
    """Leave the process group: a barrier first (tearing gloo down while a peer still uses it
    can abort that peer), then ``destroy_process_group``. No-op without a group."""
    if not _initialized():
        return
    barrier()
    torch.distributed.destroy_process_group()


# --- collectives ----------------------------------------------------------------------------------
def barrier() -> None:
    """Wait until every rank gets here."""
    if is_distributed():
        torch.distributed.barrier()


def _reduce_op(op: str) -> Any:
    if op not in _OPS:
        raise ConfigError(f"op must be one of {', '.join(_OPS)}, got {op!r}")
    ops = torch.distributed.ReduceOp
    return {"sum": ops.SUM, "mean": ops.SUM, "min": ops.MIN, "max": ops.MAX}[op]


def _as_wire(t: torch.Tensor) -> torch.Tensor:
    """A tensor gloo can send (bool travels as uint8)."""
    return t.to(torch.uint8) if t.dtype == torch.bool else t


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``t`` in place over every rank (``sum``, ``mean``, ``min``, ``max``); returns it."""
    reduce = _reduce_op(op)
    if not is_distributed():
        return t
    if op == "mean" and not t.is_floating_point():
        raise ConfigError(f"all_reduce_ mean needs a float tensor, got {t.dtype}")
    wire = _as_wire(t).contiguous()
    torch.distributed.all_reduce(wire, op=reduce)
    if op == "mean":
        wire /= world_size()
    if wire is not t:
        t.copy_(wire)
    return t


def broadcast_tensor_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``t`` in place with rank ``src``'s value; returns it."""
    if not is_distributed():
        return t
    wire = _as_wire(t).contiguous()
    torch.distributed.broadcast(wire, src=src)
    if wire is not t:
        t.copy_(wire)
    return t


def _flat_groups(tensors: Sequence[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return groups


def broadcast_tensors_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """:func:`broadcast_tensor_` for many tensors, one message per dtype and device."""
    if not is_distributed():
        return
    for group in _flat_groups(tensors).values():
        flat = torch.cat([_as_wire(t).reshape(-1) for t in group])
        torch.distributed.broadcast(flat, src=src)
        for t, part in zip(group, flat.split([t.numel() for t in group]), strict=True):
            t.copy_(part.view(t.shape))


def all_reduce_tensors_(tensors: Sequence[torch.Tensor], op: str = "sum") -> None:
    """:func:`all_reduce_` for many tensors, one message per dtype and device."""
    reduce = _reduce_op(op)
    if not is_distributed():
        return
    for group in _flat_groups(tensors).values():
        if op == "mean" and not group[0].is_floating_point():
            raise ConfigError(f"all_reduce mean needs float tensors, got {group[0].dtype}")
        flat = torch.cat([_as_wire(t).reshape(-1) for t in group])
        torch.distributed.all_reduce(flat, op=reduce)
        if op == "mean":
            flat /= world_size()
        for t, part in zip(group, flat.split([t.numel() for t in group]), strict=True):
            t.copy_(part.view(t.shape))


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` (picklable) on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn`` on rank 0 only and return its result on every rank (the others wait).

    An exception on rank 0 is raised on every rank, so they fail together instead of waiting.
    """
    if not is_distributed():
        return fn(*args, **kwargs)
    outcome: tuple[bool, Any] = (True, None)
    if is_main():
        try:
            outcome = (True, fn(*args, **kwargs))
        except Exception as exc:
            outcome = (False, _picklable(exc))
    ok, value = broadcast_object(outcome)
    if not ok:
        raise value
    return value


def _picklable(exc: Exception) -> Exception:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def only_main(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator form of :func:`on_main`: the body runs on rank 0, every rank gets its result."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return on_main(fn, *args, **kwargs)

    return wrapper


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. creates a cache), then the others run it."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


# --- data -----------------------------------------------------------------------------------------
def _rows_of(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    if isinstance(batch, dict):
        items: Iterable[Any] = batch.values()
    elif isinstance(batch, (tuple, list)):
        items = batch
    else:
        return None
    return next((n for n in map(_rows_of, items) if n is not None), None)


def _take(batch: Any, rows: int, start: int, stop: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() and batch.shape[0] == rows else batch
    if isinstance(batch, dict):
        return type(batch)((k, _take(v, rows, start, stop)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a NamedTuple
        return type(batch)(*(_take(v, rows, start, stop) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_take(v, rows, start, stop) for v in batch)
    return batch


def shard_rows(batch: Any, index: int | None = None, count: int | None = None) -> tuple[Any, float]:
    """This rank's contiguous share of ``batch``'s rows and the weight of its mean loss.

    Every tensor whose first dimension is the batch's row count (the first such dimension found)
    is sliced; other items pass unchanged. Shares differ by at most one row; with the weight
    ``rows_here * count / rows`` a mean loss averaged over ranks (what DDP does to gradients)
    is the mean over the whole batch. A rank left without rows (a batch smaller than
    ``count``) gets the whole batch with weight 0.
    """
    index = rank() if index is None else index
    count = world_size() if count is None else count
    if count == 1:
        return batch, 1.0
    rows = _rows_of(batch)
    if rows is None:
        raise ConfigError(
            f"cannot split a {type(batch).__name__} batch across {count} processes: no tensor "
            "with a batch dimension in it"
        )
    start, stop = index * rows // count, (index + 1) * rows // count
    if stop == start:
        return batch, 0.0
    return _take(batch, rows, start, stop), (stop - start) * count / rows


class ShardedBatches:
    """Re-iterable view of ``batches`` with only this rank's rows of each (empty shares are
    left out): each rank calibrates on its part, and the statistics are all-reduced."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            part, weight = shard_rows(batch)
            if weight > 0:
                yield part


# --- what techniques cannot handle ---------------------------------------------------------------
def _sharded_types() -> tuple[type, ...]:
    types: list[type] = []
    if "torch.distributed.fsdp" not in sys.modules:  # nothing can be sharded yet: skip the import
        return ()
    with contextlib.suppress(ImportError):
        from torch.distributed.fsdp import FullyShardedDataParallel

        types.append(FullyShardedDataParallel)
    with contextlib.suppress(ImportError):
        from torch.distributed.fsdp import FSDPModule

        types.append(FSDPModule)
    return tuple(types)


def check_unsharded(model: nn.Module, what: str = "slimkit") -> None:
    """Raise :class:`UnsupportedModuleError` for a model wrapped in DDP or sharded by FSDP.

    Techniques need the plain module with full weights: masks and quantizers are attached
    before wrapping (DDP then keeps them in sync); FSDP's sharded parameters can be neither
    ranked, sliced nor observed whole.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        raise UnsupportedModuleError(
            f"{what}: the model is wrapped in DistributedDataParallel; apply techniques to the "
            "plain model (ddp.module) before wrapping it, then wrap it for training"
        )
    sharded = _sharded_types()
    name = next((n or "<model>" for n, m in model.named_modules() if isinstance(m, sharded)), None)
    if name is None and "torch.distributed.tensor" in sys.modules:
        with contextlib.suppress(ImportError):
            from torch.distributed.tensor import DTensor

            name = next((n for n, p in model.named_parameters() if isinstance(p, DTensor)), None)
    if name is not None:
        raise UnsupportedModuleError(
            f"{what}: {name!r} is sharded by FSDP (FullyShardedDataParallel, fully_shard "
            "or DTensor parameters), which is not supported: techniques rank, slice and observe "
            "full weights; compress the unsharded model (with DDP: slimkit compress --nproc N) "
            "and shard the finalized plain model afterwards"
        )

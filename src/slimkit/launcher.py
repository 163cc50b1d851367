"""``slimkit compress RECIPE --nproc N``: start N processes through ``torchrun``, and report a
failed rank in one line.

The command re-launches itself as ``python -m torch.distributed.run --standalone
--nproc-per-node N -m slimkit.cli compress ...`` (torchrun's own launcher: a rendezvous on a
free local port, workers watched, every worker stopped when one fails). Each worker joins the
process group with :func:`slimkit.distributed.init_from_env` (gloo on CPU, NCCL for CUDA
tensors). A worker that fails writes ``rank-R.json`` (rank, message, exit code, time) and
``rank-R.traceback.txt`` into the folder ``SLIMKIT_ERROR_DIR`` names, prints ``slimkit: error:
rank R failed: ...`` and exits; the launcher then prints the first failure as its last line,
instead of torchrun's report, and exits with that worker's code (2 for a slimkit error, 1
otherwise). For an unexpected exception (not a slimkit error) the line ends with the path of
the kept traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from slimkit.errors import SlimkitError
from slimkit.io import atomic_write_json, atomic_write_text

__all__ = ["ERROR_DIR_ENV", "launch", "record_failure", "torchrun_command"]

ERROR_DIR_ENV = "SLIMKIT_ERROR_DIR"
_TORCHRUN_NOISE = ("torch.distributed.elastic", "torch/distributed/elastic", "ChildFailedError")


def torchrun_command(nproc: int, argv: list[str], *, timeout: float) -> list[str]:
    """The ``torchrun`` command line (as ``python -m torch.distributed.run``) that starts
    ``nproc`` local workers running ``slimkit.cli`` with ``argv``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--max-restarts",
        "0",
        "--rdzv-conf",
        f"join_timeout={max(1, round(timeout))}",
        "-m",
        "slimkit.cli",
        *argv,
    ]


def record_failure(exc: BaseException, exit_code: int) -> str:
    """In a torchrun worker: the one-line message naming the rank, with the failure written to
    ``$SLIMKIT_ERROR_DIR/rank-R.json`` (for the launcher) and torchrun's error file."""
    rank = os.environ.get("RANK", "?")
    detail = " ".join(str(exc).split())
    if not isinstance(exc, SlimkitError):
        detail = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    message = f"rank {rank} failed: {detail}"
    stack = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    folder = os.environ.get(ERROR_DIR_ENV)
    if folder:
        record = {"rank": rank, "message": message, "exit_code": exit_code, "time": time.time()}
        try:
            atomic_write_text(Path(folder) / f"rank-{rank}.traceback.txt", stack)
            atomic_write_json(Path(folder) / f"rank-{rank}.json", record)
        except OSError:
            pass  # the message still reaches stderr
    torchrun_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if torchrun_file and not Path(torchrun_file).exists():
        extra = {"py_callstack": stack, "timestamp": str(int(time.time()))}
        try:  # the format torchrun's ErrorHandler.record_exception writes
            atomic_write_json(torchrun_file, {"message": {"message": message, "extraInfo": extra}})
        except OSError:
            pass
    return message


def _first_failure(folder: Path) -> dict | None:
    records = []
    for path in folder.glob("rank-*.json"):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return min(records, key=lambda r: r.get("time", 0.0)) if records else None


def _from_torchrun_report(lines: list[str], code: int) -> str:
    """The failed rank and its exit code from torchrun's "Root Cause" table."""
    text = "".join(lines)
    root = text[text.find("Root Cause") :] if "Root Cause" in text else text
    rank = re.search(r"\brank\s*:\s*(\d+)", root)
    exit_code = re.search(r"exitcode\s*:\s*(-?\d+)", root)
    who = f"rank {rank.group(1)}" if rank else "a rank"
    if exit_code is None:
        return f"{who} failed: torchrun exited with code {code}"
    value = int(exit_code.group(1))
    if value < 0:
        try:
            return f"{who} failed: killed by signal {signal.Signals(-value).name}"
        except ValueError:
            pass
    return f"{who} failed: exit code {value}"


def launch(nproc: int, argv: list[str], *, timeout: float) -> tuple[int, str | None]:
    """Run ``slimkit.cli argv`` on ``nproc`` local processes through torchrun.

    Standard output passes through; standard error too, until a worker fails, after which
    torchrun's own report is held back. Returns the exit code and, on failure, the one-line
    message (``rank R failed: ...``, naming the first rank that failed) for the caller to print.
    """
    folder = Path(tempfile.mkdtemp(prefix="slimkit-ranks-"))
    keep = False
    try:
        code, failure = _run_torchrun(nproc, argv, timeout, folder)
        first = _first_failure(folder)
        if code and first is not None:
            code, failure = int(first.get("exit_code") or 1), str(first["message"])
            trace = folder / f"rank-{first.get('rank')}.traceback.txt"
            if code != 2 and trace.is_file():  # not a slimkit error: keep where it came from
                keep, failure = True, f"{failure} (traceback: {trace})"
        return code, failure
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def _run_torchrun(
    nproc: int, argv: list[str], timeout: float, folder: Path
) -> tuple[int, str | None]:
    env = dict(os.environ)
    env[ERROR_DIR_ENV] = str(folder)
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its warning
    command = torchrun_command(nproc, argv, timeout=timeout)
    held: list[str] = []
    failing = False
    try:
        proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    except OSError as exc:
        return 1, f"cannot start torchrun: {exc}"
    try:
        for line in proc.stderr or ():
            if line.startswith("slimkit: error: rank "):
                failing = True
                continue  # the launcher prints the first failure itself
            failing = failing or any(mark in line for mark in _TORCHRUN_NOISE)
            if failing:
                held.append(line)
            else:
                sys.stderr.write(line)
                sys.stderr.flush()
        code = proc.wait()
    except KeyboardInterrupt:
        proc.wait()  # torchrun stops its workers on the same SIGINT
        return 130, "interrupted"
    if code == 0:
        sys.stderr.writelines(held)
        return 0, None
    return 1, _from_torchrun_report(held, code)

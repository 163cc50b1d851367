"""Both integrations under their framework's own DDP: 2 CPU processes over gloo, started by
``torchrun --standalone --nproc_per_node 2`` on the real example scripts (a short budget).

Each rank writes its compressed network's ``state_dict`` (masks, quantizer scales, weights) with
``--out``; the ranks must agree bit for bit, reach the target sparsity, and only rank 0 may
print or write the compressor state. A run that hangs is killed and fails the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
TIMEOUT_S = 240

# Runs an example with the compressor-state writer wrapped, so each rank logs what it wrote.
RECORDING_DRIVER = """\
import os, runpy, sys
from pathlib import Path

from slimkit.integrations import huggingface

_save = huggingface.SlimkitTrainerCallback.save


def save(self, checkpoint_dir):
    path = _save(self, checkpoint_dir)
    log = Path(os.environ["SLIMKIT_WRITES"]) / f"rank{os.environ['RANK']}.txt"
    with log.open("a", encoding="utf-8") as f:
        f.write(f"{path}\\n")
    return path


huggingface.SlimkitTrainerCallback.save = save
script = sys.argv.pop(1)
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
"""


def torchrun(script: Path, args: list[str], cwd: Path, **env_vars: str) -> str:
    """``torchrun --standalone --nproc_per_node 2 script args``; its stdout. After TIMEOUT_S
    torchrun is stopped (it stops its workers), then killed, and the test fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    env.update(env_vars)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", str(WORLD), str(script), *args]
    # output into files, not pipes: a worker left behind cannot block the reading
    with (cwd / "stdout.txt").open("w+") as out, (cwd / "stderr.txt").open("w+") as err:
        proc = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True
        )
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun's SIGTERM handler stops the workers
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            out.seek(0), err.seek(0)
            pytest.fail(
                f"{script.name} on {WORLD} processes did not finish within {TIMEOUT_S} s (a "
                f"hung collective?); its last output:\n{(out.read() + err.read())[-3000:]}"
            )
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    assert proc.returncode == 0, f"{script.name} failed:\n{stderr[-4000:]}"
    return stdout


def load_ranks(folder: Path) -> list[dict[str, Any]]:
    assert sorted(p.name for p in folder.glob("rank*.pt")) == [f"rank{r}.pt" for r in range(WORLD)]
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def assert_identical(ranks: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Every rank's state_dict equals rank 0's bit for bit; returns rank 0's."""
    first = ranks[0]["state"]
    for rank, other in enumerate(ranks[1:], start=1):
        assert sorted(other["state"]) == sorted(first)
        for name, tensor in first.items():
            assert torch.equal(other["state"][name], tensor), f"{name} differs on rank {rank}"
        for key in ("sparsity", "accuracy", "steps", "world_size"):
            assert other[key] == ranks[0][key], key
    return first


def mask_sparsity(state: dict[str, torch.Tensor]) -> float:
    masks = [t for name, t in state.items() if name.endswith(".mask")]
    assert masks
    return sum(int((m == 0).sum()) for m in masks) / sum(m.numel() for m in masks)


def test_lightning_ddp_prunes_and_quantizes_identically_on_every_rank(tmp_path: Path) -> None:
    pytest.importorskip("pytorch_lightning")
    script = ROOT / "examples" / "lightning_example.py"
    out = torchrun(script, ["--epochs", "1", "--out", str(tmp_path)], cwd=tmp_path)
    ranks = load_ranks(tmp_path)
    state = assert_identical(ranks)
    assert ranks[0]["world_size"] == WORLD
    assert ranks[0]["steps"] == 22  # 1400 rows in global batches of 64: as in one process
    # gradual magnitude pruning reached its 70%; the masks are the ones the sparsity counts
    assert ranks[0]["sparsity"] == pytest.approx(0.7, abs=0.01)
    assert mask_sparsity(state) == pytest.approx(ranks[0]["sparsity"])
    # LSQ: input ranges initialised from the calibration batches (all-reduced), then learned
    inputs = [n for n in state if n.endswith("input_quantizer.scale")]
    weights = [n for n in state if n.endswith("weight.1.scale")]
    assert len(inputs) == len(weights) == 4
    assert all(bool(state[n.replace("scale", "initialized")]) for n in inputs + weights)
    assert all(bool((state[n].abs() > 0).all()) for n in inputs + weights)  # |scale| is used
    assert ranks[0]["accuracy"] > 0.3  # one epoch, but it learned (chance: 0.1)
    assert out.count("sparsity=") == 1  # only rank 0 prints


def test_hf_trainer_ddp_prunes_identically_and_only_rank_0_writes(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    pytest.importorskip("transformers")
    from slimkit.integrations.transformers import STATE_FILE

    driver = tmp_path / "record_writes.py"
    driver.write_text(RECORDING_DRIVER, encoding="utf-8")
    writes = tmp_path / "writes"
    writes.mkdir()
    script = ROOT / "examples" / "hf_trainer_example.py"
    steps = 10
    args = [str(script), "--steps", str(steps), "--out", str(tmp_path)]
    out = torchrun(driver, args, cwd=tmp_path, SLIMKIT_WRITES=str(writes))
    ranks = load_ranks(tmp_path)
    state = assert_identical(ranks)
    assert ranks[0]["world_size"] == WORLD and ranks[0]["steps"] == steps
    assert ranks[0]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert mask_sparsity(state) == pytest.approx(ranks[0]["sparsity"])
    assert all(".encoder." in n for n in state if n.endswith(".mask"))  # the recipe's scope
    assert out.count("sparsity=") == 1  # only rank 0 prints
    # the checkpoint at the last step holds the compressor state, written by rank 0 alone
    checkpoint = tmp_path / "trainer" / f"checkpoint-{steps}"
    assert sorted(p.name for p in writes.iterdir()) == ["rank0.txt"]
    assert (writes / "rank0.txt").read_text(encoding="utf-8").splitlines() == [
        str(checkpoint / STATE_FILE)
    ]
    saved = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    assert saved["finalized"] is False and "compressor" in saved
    assert {f"rng_state_{r}.pth" for r in range(WORLD)} <= {p.name for p in checkpoint.iterdir()}

"""The integration examples run as scripts and print the sparsity and accuracy they reach."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return {k: float(v) for k, v in re.findall(r"^(\w+)=([0-9.]+)$", done.stdout, re.M)}


def test_lightning_example():
    pytest.importorskip("pytorch_lightning")
    numbers = run_example("lightning_example.py")
    assert numbers["sparsity"] == pytest.approx(0.7, abs=0.02)
    assert numbers["accuracy"] > 0.85


def test_hf_trainer_example():
    pytest.importorskip("accelerate")
    pytest.importorskip("transformers")
    numbers = run_example("hf_trainer_example.py")
    assert numbers["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert numbers["accuracy"] > 0.6

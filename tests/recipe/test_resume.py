"""Resume: a run killed mid-stage continues from its checkpoint and ends where an uninterrupted
run ends; finished parts are restored, not redone; bad resumes are one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from slimkit.cli import main

RECIPE = {
    "name": "resumable",
    "baseline": {"epochs": 3, "lr": 0.003},
    "export": {"latency": False},
    "stages": [
        {
            "name": "prune",
            "train": {"epochs": 5, "lr": 0.001, "lr_schedule": "cosine"},
            "techniques": [
                {
                    "kind": "magnitude_prune",
                    "schedule": {"kind": "polynomial", "final": 0.7, "end": 60, "frequency": 10},
                }
            ],
        },
        {
            "name": "int8",
            "train": {"epochs": 0},
            "calibration_batches": 4,
            "techniques": [{"kind": "static_quant"}],
        },
    ],
}


def slimkit(*args: str) -> subprocess.Popen:
    code = (
        "import sys, torch; torch.set_num_threads(1); from slimkit.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err


def measured(folder: Path) -> list[tuple[Any, ...]]:
    metrics = json.loads((folder / "metrics.json").read_text())
    parts = [metrics["baseline"], *metrics["stages"]]
    return [
        (p["name"], p["val_metric"], p["test_metric"], p["nonzero_params"], p["steps"])
        for p in parts
    ] + [metrics["artifacts"]["onnx"]["test_accuracy"], metrics["kept"]]


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resume") / "recipe.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return path


def test_a_run_killed_mid_stage_resumes_to_the_same_result(
    recipe_file: Path, tmp_path: Path
) -> None:
    whole = tmp_path / "whole"
    finish(slimkit("compress", str(recipe_file), "--run-dir", str(whole), "--quiet"))

    killed = tmp_path / "killed"
    proc = slimkit("compress", str(recipe_file), "--run-dir", str(killed), "--quiet")
    state = killed / "checkpoints" / "state.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if state.exists() and "baseline" in json.loads(state.read_text())["done"]:
            if (killed / "checkpoints" / "progress.pt").exists():
                break  # the prune stage has saved at least one epoch
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists()
    before = json.loads(state.read_text())
    assert before["done"] == ["baseline"] and not before.get("finished")

    finish(slimkit("compress", "--resume", str(killed), "--quiet"))
    assert measured(killed) == measured(whole)
    after = json.loads(state.read_text())
    assert after["finished"] and after["done"] == ["baseline", "prune", "int8"]
    # the baseline was restored from its checkpoint, not trained again
    assert after["results"]["baseline"] == before["results"]["baseline"]


def test_resume_errors_are_one_line(
    recipe_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compress", "--resume", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "run folder to resume not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "recipe.yaml").write_text(recipe_file.read_text())
    assert main(["compress", "--resume", str(empty), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nothing to resume" in err and "\n" not in err
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**RECIPE, "seed": 5}))
    assert main(["compress", str(other), "--resume", str(empty), "--quiet"]) == 2
    assert "differs from the one" in capsys.readouterr().err
    assert main(["compress", str(recipe_file), "--resume", str(empty), "--run-dir", "x"]) == 2
    assert "do not give --run-dir too" in capsys.readouterr().err


def test_finished_stages_are_rebuilt_from_their_records(tmp_path: Path) -> None:
    """A run that died after its last stage (before export) resumes by rebuilding every stage
    (structured slicing from the manifest, quantizers from the static_quant state)."""
    recipe = {
        "name": "rebuild",
        "baseline": {"epochs": 1},
        "export": {"latency": False},
        "stages": [
            {
                "name": "slim",
                "train": {"epochs": 1},
                "techniques": [{"kind": "structured_prune", "sparsity": 0.5}],
            },
            {"name": "int8", "train": {"epochs": 0}, "techniques": [{"kind": "static_quant"}]},
        ],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    assert main(["compress", str(path), "--run-dir", str(run), "--quiet"]) == 0
    first = measured(run)
    weights = (run / "model.safetensors").read_bytes()
    assert main(["compress", "--resume", str(run), "--quiet"]) == 2  # finished: nothing to do
    state_path = run / "checkpoints" / "state.json"
    state = json.loads(state_path.read_text())
    state["finished"] = False
    state_path.write_text(json.dumps(state))
    (run / "metrics.json").unlink()
    (run / "model.onnx").unlink()
    (run / "model.safetensors").unlink()
    assert main(["compress", "--resume", str(run), "--quiet"]) == 0
    assert measured(run) == first
    # the rebuilt small int8 model is the one the first run exported, bit for bit
    assert (run / "model.safetensors").read_bytes() == weights
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["artifacts"]["onnx"]["form"] == "static_quant"

"""Shared fixtures: a tiny digits recipe (1-epoch baseline, one 1-epoch one-shot prune stage)."""

from pathlib import Path

import pytest

TINY_RECIPE = """\
version: 1
name: tiny
task: digits
baseline: {epochs: 1}
stages:
  - name: prune
    train: {epochs: 1}
    techniques:
      - kind: magnitude_prune
        sparsity: 0.5
export: {packed: true, onnx: true}
"""


@pytest.fixture(scope="session")
def tiny_recipe_text() -> str:
    """YAML of a valid recipe that runs end to end in a few seconds."""
    return TINY_RECIPE


@pytest.fixture
def tiny_recipe(tmp_path: Path, tiny_recipe_text: str) -> Path:
    """``tiny_recipe_text`` written to a file."""
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_recipe_text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread per test: the suite runs on 2 shared cores, where torch's default
    thread pool oversubscribes badly (10-100x slower steps under load)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

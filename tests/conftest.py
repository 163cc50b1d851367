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


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One intra-op thread for the whole session (module/session fixtures included): the suite
    runs on 2 shared cores, where torch's default pool oversubscribes badly (10-100x slower
    steps under load), and trained fixtures get the same weights whichever test builds them."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def trained_digits_model(tmp_path_factory):
    """Factory: a reference model (``"resnet"`` or ``"mobilenet"``) trained 3 epochs on digits
    (seed 0), trained once per session and cached in the session's temp folder."""
    import torch

    from slimkit.models.cnn import DigitsResNet, mobilenetv2_tiny
    from slimkit.tasks.data import load_digits_split, train_epoch

    models = {"resnet": DigitsResNet, "mobilenet": mobilenetv2_tiny}
    folder = tmp_path_factory.getbasetemp()

    def make(name: str):
        path = folder / f"slimkit-{name}-digits-3ep.pt"
        torch.manual_seed(0)
        model = models[name]()
        if path.exists():
            model.load_state_dict(torch.load(path, weights_only=True))
            return model.eval()
        loaders = load_digits_split(seed=0).loaders(batch_size=64, seed=0)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(3):
            train_epoch(model, loaders.train, optimizer)
        torch.save(model.state_dict(), path)
        return model.eval()

    return make

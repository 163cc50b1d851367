"""Checkpoints of a run, for ``slimkit compress --resume RUN_DIR``.

``RUN_DIR/checkpoints/`` holds, each written atomically:

* ``state.json``: which parts are finished (``baseline``, then stage names in order), their
  measured results, the optimizer-step count, and the recipe's fingerprint;
* ``NAME.safetensors`` + ``NAME.techniques.pt``: the model after the baseline or a finished
  stage, and the techniques' ``state_dict``\\ s (what rebuilds the model's structure: a pruning
  manifest, calibrated quantizers);
* ``progress.pt``: the part in progress at the end of its last finished epoch: model, compressor,
  optimizer and learning-rate state, the torch RNG, and the epoch (a killed run loses at most
  one epoch of work).

Everything is loaded with ``weights_only=True``; a missing or corrupt file is a one-line
:class:`~slimkit.errors.CheckpointError`.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from slimkit.errors import CheckpointError, first_line
from slimkit.io import atomic_write_bytes, atomic_write_json

__all__ = ["STATE_VERSION", "RunCheckpoints", "recipe_fingerprint"]

STATE_VERSION = 1


def recipe_fingerprint(recipe_yaml: str) -> str:
    return hashlib.sha256(recipe_yaml.encode("utf-8")).hexdigest()


class RunCheckpoints:
    """The ``checkpoints/`` folder of one run folder."""

    def __init__(self, run_dir: Path) -> None:
        self.folder = Path(run_dir) / "checkpoints"

    # --- the run state ----------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.folder / "state.json"

    def save_state(self, state: dict[str, Any]) -> None:
        atomic_write_json(self.state_path, {"version": STATE_VERSION, **state})

    def load_state(self) -> dict[str, Any]:
        path = self.state_path
        if not path.is_file():
            raise CheckpointError(f"nothing to resume: {path} does not exist")
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read {path}: {first_line(exc)}") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise CheckpointError(f"{path} is not a version-{STATE_VERSION} slimkit run state")
        return state

    # --- finished parts ---------------------------------------------------------------------
    def save_model(self, name: str, model: nn.Module, techniques: list[dict[str, Any]]) -> None:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(self.folder / f"{name}.safetensors", save(state))
        atomic_write_bytes(self.folder / f"{name}.techniques.pt", _torch_bytes(techniques))

    def load_model(self, name: str) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
        weights = self.folder / f"{name}.safetensors"
        try:
            state = load_file(str(weights))
        except Exception as exc:  # missing, truncated or foreign files raise many types
            raise CheckpointError(f"cannot read checkpoint {weights}: {first_line(exc)}") from None
        techniques = self._load_torch(self.folder / f"{name}.techniques.pt")
        if not isinstance(techniques, list):
            raise CheckpointError(f"{name}.techniques.pt does not hold a list of technique states")
        return state, techniques

    # --- the part in progress ---------------------------------------------------------------
    @property
    def progress_path(self) -> Path:
        return self.folder / "progress.pt"

    def save_progress(self, payload: dict[str, Any]) -> None:
        atomic_write_bytes(self.progress_path, _torch_bytes(payload))

    def load_progress(self) -> dict[str, Any] | None:
        if not self.progress_path.is_file():
            return None
        payload = self._load_torch(self.progress_path)
        if not isinstance(payload, dict) or "part" not in payload:
            raise CheckpointError(f"{self.progress_path} is not a slimkit progress checkpoint")
        return payload

    def clear_progress(self) -> None:
        self.progress_path.unlink(missing_ok=True)

    @staticmethod
    def _load_torch(path: Path) -> Any:
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read checkpoint {path}: {first_line(exc)}") from None


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()

"""Records of a structurally pruned model, and their replay on a freshly built original model.

Records, not pickles: :func:`save_pruned` writes ``model.safetensors`` (the state dict) and
``manifest.json`` (for every changed module: the original indices it kept along each changed
dimension of each tensor, the original and new shapes, and the changed attributes such as
``out_channels`` or ``num_heads``). :func:`load_pruned` takes ``model_factory()``, slices it
per the manifest and loads the weights with a strict ``load_state_dict``; no module is ever
unpickled.

A record is measured, not derived from rules per layer type: :func:`record_slicing` runs the
pruning function on a copy of the module whose tensors hold their own flat positions and reads
off which positions survived, so any slicing that is a per-dimension selection is recorded
exactly, and anything else is refused with the module's name.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from slimkit.errors import CheckpointError, UnsupportedModuleError
from slimkit.io import atomic_write_bytes, atomic_write_json

FORMAT = "slimkit.pruned"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"

Attr = int | bool | tuple[int, ...]


@dataclass
class TensorRecord:
    """One parameter or buffer: ``kept[dim]`` lists the original indices kept along ``dim``."""

    kind: Literal["parameter", "buffer"]
    original_shape: tuple[int, ...]
    shape: tuple[int, ...]
    kept: dict[int, list[int]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorRecord:
        kept = {int(d): [int(i) for i in idx] for d, idx in data.get("kept", {}).items()}
        return cls(data["kind"], tuple(data["original_shape"]), tuple(data["shape"]), kept)


@dataclass
class LayerRecord:
    """What pruning changed in one module: its tensors (names relative to it, may be dotted),
    its integer attributes, and for reports the kept output / input channels and heads."""

    module: str
    type: str
    tensors: dict[str, TensorRecord] = field(default_factory=dict)
    attributes: dict[str, Attr] = field(default_factory=dict)
    original_attributes: dict[str, Attr] = field(default_factory=dict)
    kept_out: list[int] | None = None
    kept_in: list[int] | None = None
    kept_heads: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples serialise as lists, dims as string keys); None fields left out."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerRecord:
        def attrs(key: str) -> dict[str, Attr]:
            return {k: tuple(v) if isinstance(v, list) else v for k, v in data[key].items()}

        tensors = {n: TensorRecord.from_dict(t) for n, t in data["tensors"].items()}
        fields = {k: data.get(k) for k in ("kept_out", "kept_in", "kept_heads")}
        return cls(
            str(data["module"]),
            str(data["type"]),
            tensors,
            attrs("attributes"),
            attrs("original_attributes"),
            **fields,
        )

    def merge(self, other: LayerRecord) -> None:
        """Fold in a record of the same module that sliced other dimensions."""
        for name, rec in other.tensors.items():
            if name not in self.tensors:
                self.tensors[name] = copy.deepcopy(rec)
                continue
            mine = self.tensors[name]
            clash = set(mine.kept) & set(rec.kept)
            if clash:
                raise CheckpointError(f"{self.module}: {name} sliced twice along dims {clash}")
            mine.kept.update(rec.kept)
            mine.shape = tuple(
                len(mine.kept[d]) if d in mine.kept else n
                for d, n in enumerate(mine.original_shape)
            )
        for key, value in other.original_attributes.items():
            self.original_attributes.setdefault(key, value)
        self.attributes.update(other.attributes)
        for key in ("kept_out", "kept_in", "kept_heads"):
            if getattr(other, key) is not None:
                setattr(self, key, getattr(other, key))

    def compose(self, later: LayerRecord) -> None:
        """Fold in a record of a later pruning pass of this module, whose indices count the
        tensors as this record leaves them (iterative pruning), so every index stays original."""
        for name, rec in later.tensors.items():
            mine = self.tensors.get(name)
            if mine is None:
                self.tensors[name] = copy.deepcopy(rec)
                continue
            if tuple(rec.original_shape) != tuple(mine.shape):
                raise CheckpointError(
                    f"{self.module}: {name} is {list(mine.shape)} after the earlier pass, the "
                    f"later pass starts from {list(rec.original_shape)}"
                )
            for dim, idx in rec.kept.items():
                base = mine.kept.get(dim)
                mine.kept[dim] = [base[i] for i in idx] if base is not None else list(idx)
            mine.shape = tuple(rec.shape)
        for key, value in later.original_attributes.items():
            self.original_attributes.setdefault(key, value)
        self.attributes.update(later.attributes)
        for key in ("kept_out", "kept_in", "kept_heads"):
            new, base = getattr(later, key), getattr(self, key)
            if new is not None:
                setattr(self, key, [base[i] for i in new] if base is not None else list(new))


@dataclass
class PruningManifest:
    """Every changed module of one pruned model, in pruning order."""

    layers: dict[str, LayerRecord] = field(default_factory=dict)
    technique: dict[str, Any] = field(default_factory=dict)
    slimkit_version: str = field(default_factory=lambda: _slimkit_version())

    def add(self, record: LayerRecord) -> None:
        if record.module in self.layers:
            self.layers[record.module].merge(record)
        else:
            self.layers[record.module] = copy.deepcopy(record)

    def compose(self, later: PruningManifest) -> None:
        """Fold in the manifest of a later pass that pruned the model this one describes."""
        for name, record in later.layers.items():
            if name in self.layers:
                self.layers[name].compose(record)
            else:
                self.layers[name] = copy.deepcopy(record)

    def removed_parameters(self) -> int:
        """Parameter elements removed (original minus new), from the recorded shapes alone."""
        return sum(
            math.prod(t.original_shape) - math.prod(t.shape)
            for layer in self.layers.values()
            for t in layer.tensors.values()
            if t.kind == "parameter"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "slimkit_version": self.slimkit_version,
            "technique": self.technique,
            "layers": [layer.to_dict() for layer in self.layers.values()],
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "manifest") -> PruningManifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CheckpointError(f"{source}: not a slimkit pruning manifest (format {FORMAT!r})")
        if data.get("version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{source}: manifest version {data.get('version')!r} is not supported "
                f"(expected {FORMAT_VERSION})"
            )
        manifest = cls(technique=dict(data.get("technique") or {}))
        manifest.slimkit_version = str(data.get("slimkit_version", "unknown"))
        for entry in data.get("layers", []):
            try:
                manifest.add(LayerRecord.from_dict(entry))
            except (KeyError, TypeError, ValueError) as exc:
                name = entry.get("module", "?") if isinstance(entry, dict) else "?"
                raise CheckpointError(
                    f"{source}: layer {name!r}: malformed record ({exc})"
                ) from None
        return manifest


def _slimkit_version() -> str:
    import slimkit  # lazily: this module may be imported while slimkit itself initialises

    return str(getattr(slimkit, "__version__", "unknown"))


# --- recording ------------------------------------------------------------------------------------


def _tensors(module: nn.Module) -> dict[str, tuple[Literal["parameter", "buffer"], torch.Tensor]]:
    out: dict[str, tuple[Literal["parameter", "buffer"], torch.Tensor]] = {}
    for name, p in module.named_parameters(recurse=True):
        out[name] = ("parameter", p)
    for name, b in module.named_buffers(recurse=True):
        out[name] = ("buffer", b)
    return out


def _attributes(module: nn.Module) -> dict[str, Attr]:
    """Integer / bool / int-tuple attributes of a module and its children (dotted names)."""
    out: dict[str, Attr] = {}
    for prefix, sub in module.named_modules():
        for key, value in vars(sub).items():
            if key.startswith("_") or key == "training":
                continue
            ok = isinstance(value, (int, bool)) or (
                isinstance(value, tuple) and all(isinstance(v, int) for v in value)
            )
            if ok:
                out[f"{prefix}.{key}" if prefix else key] = value
    return out


def _owner(module: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    prefix, _, leaf = dotted.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module), leaf


def _set_tensor(module: nn.Module, dotted: str, value: torch.Tensor) -> None:
    owner, leaf = _owner(module, dotted)
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        needs_grad = old.requires_grad if old is not None else True
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=needs_grad)
    else:
        owner._buffers[leaf] = value


def record_slicing(module: nn.Module, name: str, prune: Callable[[nn.Module], Any]) -> LayerRecord:
    """Run ``prune(copy)`` on a coded copy of ``module`` and record what it kept.

    Each floating tensor of the copy holds its own flat positions (float64, exact below 2**53),
    so the surviving values say which original index survived along each dimension. A result
    that is not a per-dimension selection raises :class:`UnsupportedModuleError` naming ``name``.
    """
    probe = copy.deepcopy(module)
    before = _tensors(probe)
    attrs_before = _attributes(probe)
    with torch.no_grad():
        for tname, (_, t) in before.items():
            if t.is_floating_point() and t.dim() > 0:
                code = torch.arange(t.numel(), dtype=torch.float64, device=t.device)
                _set_tensor(probe, tname, code.reshape(t.shape))
    prune(probe)
    record = LayerRecord(module=name, type=type(module).__name__)
    after = _tensors(probe)
    for tname, (kind, old) in before.items():
        new = after.get(tname, (kind, None))[1]
        if new is None or tuple(new.shape) == tuple(old.shape):
            continue
        if not old.is_floating_point() or new.dim() != old.dim():
            raise UnsupportedModuleError(f"{name}: pruning changed {tname} in an unsupported way")
        kept = _kept_indices(new.detach().to(torch.float64), tuple(old.shape))
        if kept is None:
            raise UnsupportedModuleError(
                f"{name}: pruning {tname} is not a per-dimension channel selection"
            )
        record.tensors[tname] = TensorRecord(kind, tuple(old.shape), tuple(new.shape), kept)
    for key, value in _attributes(probe).items():
        if key in attrs_before and attrs_before[key] != value:
            record.attributes[key] = value
            record.original_attributes[key] = attrs_before[key]
    return record


def _kept_indices(coded: torch.Tensor, shape: tuple[int, ...]) -> dict[int, list[int]] | None:
    flat = coded.reshape(-1).round().long()
    coords = torch.unravel_index(flat, shape) if flat.numel() else ()
    kept: dict[int, list[int]] = {}
    for dim, (size, axis) in enumerate(zip(shape, coords, strict=False)):
        values = torch.unique(axis).tolist()
        if len(values) != size or coded.shape[dim] != size:
            kept[dim] = values
    index = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)
    expected = _select(index, kept)
    if tuple(expected.shape) != tuple(coded.shape) or not torch.equal(expected, coded.cpu()):
        return None
    return kept


def _select(t: torch.Tensor, kept: dict[int, list[int]]) -> torch.Tensor:
    for dim, idx in sorted(kept.items()):
        t = t.index_select(dim, torch.tensor(idx, dtype=torch.long, device=t.device))
    return t.contiguous()


# --- replay -------------------------------------------------------------------------------------

Undo = list[tuple[nn.Module, str, Any]]


def _get_tensor(module: nn.Module, dotted: str) -> torch.Tensor | None:
    try:
        owner, leaf = _owner(module, dotted)
    except AttributeError:
        return None
    return owner._parameters.get(leaf, owner._buffers.get(leaf))


def apply_record(module: nn.Module, record: LayerRecord) -> Undo:
    """Slice ``module`` in place per ``record``; returns what :func:`undo` needs to revert it.

    Only the recorded dimensions must still have their original sizes, so records of the
    same module that touch different dimensions can be applied one after another. Nothing is
    changed when the record does not fit (:class:`CheckpointError` naming the layer).
    """
    where = f"layer {record.module!r}"
    if type(module).__name__ != record.type:
        raise CheckpointError(f"{where}: is {type(module).__name__}, manifest says {record.type}")
    for tname, rec in record.tensors.items():
        t = _get_tensor(module, tname)
        if t is None:
            raise CheckpointError(f"{where}: has no tensor {tname!r}")
        if t.dim() != len(rec.original_shape) or any(
            t.shape[d] != rec.original_shape[d] or max(idx, default=-1) >= t.shape[d]
            for d, idx in rec.kept.items()
        ):
            raise CheckpointError(
                f"{where}: {tname} has shape {list(t.shape)}, manifest expects "
                f"{list(rec.original_shape)}"
            )
    for key, value in record.attributes.items():
        try:
            owner, leaf = _owner(module, key)
            current = getattr(owner, leaf)
        except AttributeError:
            raise CheckpointError(f"{where}: has no attribute {key!r}") from None
        expected = record.original_attributes.get(key, current)
        if type(current) is not type(value) or current != expected:
            raise CheckpointError(
                f"{where}: attribute {key} is {current!r}, manifest expects {expected!r}"
            )
    log: Undo = []
    with torch.no_grad():
        for tname, rec in record.tensors.items():
            owner, leaf = _owner(module, tname)
            old = _get_tensor(module, tname)
            log.append((owner, leaf, old))
            _set_tensor(module, tname, _select(old.detach(), rec.kept))
    for key, value in record.attributes.items():
        owner, leaf = _owner(module, key)
        log.append((owner, "attr:" + leaf, getattr(owner, leaf)))
        setattr(owner, leaf, value)
    return log


def undo(log: Undo) -> None:
    """Revert what :func:`apply_record` did (in reverse order)."""
    for owner, key, old in reversed(log):
        if key.startswith("attr:"):
            setattr(owner, key[5:], old)
        elif key in owner._parameters:
            owner._parameters[key] = old
        else:
            owner._buffers[key] = old


def apply_manifest(model: nn.Module, manifest: PruningManifest) -> nn.Module:
    """Slice an original ``model`` in place to the pruned shapes of ``manifest``; on a
    :class:`CheckpointError` (naming the layer) the model is left as it was."""
    modules = dict(model.named_modules())
    log: Undo = []
    try:
        for name, record in manifest.layers.items():
            if name not in modules:
                raise CheckpointError(f"layer {name!r}: no such module in {type(model).__name__}")
            log += apply_record(modules[name], record)
    except CheckpointError:
        undo(log)
        raise
    return model


def check_manifest(model: nn.Module, manifest: PruningManifest) -> None:
    """Raise :class:`CheckpointError` unless ``model`` has every shape the manifest records."""
    modules = dict(model.named_modules())
    for name, record in manifest.layers.items():
        if name not in modules:
            raise CheckpointError(f"layer {name!r}: no such module in {type(model).__name__}")
        for tname, rec in record.tensors.items():
            t = _get_tensor(modules[name], tname)
            if t is None or tuple(t.shape) != rec.shape:
                shape = None if t is None else list(t.shape)
                raise CheckpointError(
                    f"layer {name!r}: {tname} is {shape}, manifest says {list(rec.shape)}"
                )


# --- files ----------------------------------------------------------------------------------------


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, tied ones cloned (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for key, t in state.items():
        t = t.detach()
        ptr = (t.untyped_storage().data_ptr(), t.device) if t.numel() else None
        out[key] = t.clone().contiguous() if ptr in seen else t.contiguous()
        seen.add(ptr)
    return out


def save_pruned(
    model: nn.Module, manifest: PruningManifest, path_dir: str | os.PathLike[str]
) -> Path:
    """Write ``model.safetensors``, then ``manifest.json`` (with the weights' SHA-256), each
    atomically, into ``path_dir``; returns the folder."""
    from safetensors.torch import save

    check_manifest(model, manifest)
    folder = Path(path_dir)
    blob = save(_unshared(model.state_dict()), metadata={"format": FORMAT})
    atomic_write_bytes(folder / WEIGHTS_FILE, blob)
    data = manifest.to_dict()
    data["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    atomic_write_json(folder / MANIFEST_FILE, data)
    return folder


def _manifest_json(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no pruning manifest here") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest ({exc})") from None


def read_manifest(path_dir: str | os.PathLike[str]) -> PruningManifest:
    """The manifest of a folder written by :func:`save_pruned`."""
    folder = Path(path_dir)
    return PruningManifest.from_dict(_manifest_json(folder), source=str(folder / MANIFEST_FILE))


def load_pruned(model: nn.Module, path_dir: str | os.PathLike[str]) -> nn.Module:
    """Slice a freshly built original ``model`` per the manifest in ``path_dir`` and load the
    saved weights into it (safetensors, strict); returns ``model``."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    folder = Path(path_dir)
    data = _manifest_json(folder)
    manifest = PruningManifest.from_dict(data, source=str(folder / MANIFEST_FILE))
    weights = folder / WEIGHTS_FILE
    try:
        blob = weights.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{weights}: cannot read weights ({exc.strerror or exc})") from None
    expected = data.get("weights_sha256")
    if expected is not None and hashlib.sha256(blob).hexdigest() != expected:
        raise CheckpointError(f"{weights}: does not match the manifest's weights_sha256")
    try:
        state = load(blob)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"{weights}: not a safetensors file ({exc})") from None
    apply_manifest(model, manifest)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split("\n\t")[1:2]).strip() or str(exc).splitlines()[0]
        raise CheckpointError(f"{weights}: weights do not fit the sliced model: {detail}") from None
    return model


__all__ = [
    "LayerRecord",
    "PruningManifest",
    "TensorRecord",
    "apply_manifest",
    "apply_record",
    "check_manifest",
    "load_pruned",
    "read_manifest",
    "record_slicing",
    "save_pruned",
    "undo",
]

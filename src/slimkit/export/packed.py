"""Sparse "packed" checkpoints: a pruned state_dict as a compact safetensors file.

Each floating tensor (float16, bfloat16, float32, float64) is encoded with whichever of these
takes the fewest payload bytes:

- ``dense``: every value (part ``dense``);
- ``bitmask``: ``np.packbits`` of the nonzero mask (part ``mask``, uint8) plus the nonzero values
  in flat order (part ``values``);
- ``index``: gaps between nonzero flat positions as uint8 codes (part ``index``) plus the values.
  A gap ``g`` is written as ``g // 255`` bytes of 255 followed by one byte ``g % 255``.

Other tensors (integer buffers, bool masks, float8, complex) are stored as-is (part ``raw``).
Values are stored in ``values_dtype``, or in the tensor's own dtype when that is no wider, and come
back in the original dtype. Zeros (+0.0 and -0.0 alike) come back as +0.0; NaN and inf survive.

``values_dtype="int8"`` stores the values of floating tensors with 2 or more dims (weights) as
int8 codes with one float32 scale per row of dim 0 (output channel; part ``scales``):
``scale = max|row| / 127`` (0 for an all-zero row), ``code = round(x / scale)`` (half to even) in
[-127, 127], and a value comes back as ``code * scale`` rounded once to the tensor's dtype, within
``scale / 2`` of the original. Zeros are still marked by the mask, the index or a zero code, so
they stay exactly zero; weights already on such a grid (slimkit's per-channel symmetric int8
PTQ/QAT) come back exact up to float rounding. Tensors with fewer dims (biases, norms), and
tensors holding NaN or inf, keep float16 values as under ``values_dtype="float16"``.

A tensor of two or more elements that are all bitwise equal (per-channel zero points, flags,
constant buffers) is stored as ``fill``: its one value, exactly, in its own dtype (version 4).

File layout (version 4). The parts of all tensors are concatenated, in state_dict order, into a
few 1-D safetensors entries ("blobs") keyed by role and dtype, so the safetensors header stays a
small constant however many tensors there are:

- ``bits`` (uint8): every ``mask`` and ``index`` part;
- ``values.<dtype>`` (e.g. ``values.float16``, ``values.int8``): every ``values`` and
  (flattened) ``dense`` part stored in that dtype;
- ``scales.float32``: every ``scales`` part;
- ``raw.<dtype>`` (e.g. ``raw.int64``): every (flattened) ``raw`` part, and every ``fill``
  part (one element), of that dtype.

The safetensors ``__metadata__`` holds two string values:

- ``slimkit.packed``: the record, compact JSON, zlib-compressed, base64-encoded::

    {"format": "slimkit-packed", "version": 4, "values_dtype": "int8",
     "blobs": ["bits", "values.int8", "scales.float32", ...],
     "tensors": {name: [encoding, shape, dtype, [[blob, offset, length], ...]], ...}}

  with one ``[blob, offset, length]`` per part (in the order listed above, then ``scales`` last
  for a tensor whose values are int8 codes), ``blob`` an index into ``blobs`` and
  ``offset``/``length`` counted in elements of that blob;
- ``slimkit.user_metadata``: the user's metadata as plain JSON (an object of strings).

Version 2 files (written before int8 values existed) have the same layout without int8 values,
``scales.float32`` or ``scales`` parts, and version 3 files without ``fill``; both still load.
"""

from __future__ import annotations

import base64
import json
import math
import os
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from slimkit.errors import CheckpointError, ConfigError
from slimkit.io import atomic_path
from slimkit.measure.size import dense_checkpoint_bytes, file_size

FORMAT = "slimkit-packed"
VERSION = 4
READABLE_VERSIONS = (2, 3, 4)
METADATA_KEY = "slimkit.packed"
USER_METADATA_KEY = "slimkit.user_metadata"
PathLike = str | os.PathLike[str]
ValuesDtype = Literal["float32", "float16", "int8"]
Encoding = Literal["dense", "bitmask", "index", "raw", "fill"]

_PARTS: dict[str, tuple[str, ...]] = {
    "dense": ("dense",),
    "bitmask": ("mask", "values"),
    "index": ("index", "values"),
    "raw": ("raw",),
    "fill": ("fill",),
}
_PACKABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_VALUES_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}
_MAX_RECORD_BYTES = 1 << 30  # refuse records that inflate past this (a corrupt or hostile file)


def encode_gaps(positions: np.ndarray) -> np.ndarray:
    """Encode strictly increasing, non-negative flat positions as uint8 gap codes."""
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    gaps = np.diff(positions, prepend=-1) - 1
    if gaps.size and gaps.min() < 0:
        raise ConfigError("positions must be strictly increasing and >= 0")
    lengths = gaps // 255 + 1
    codes = np.full(int(lengths.sum()), 255, dtype=np.uint8)
    codes[np.cumsum(lengths) - 1] = gaps % 255
    return codes


def decode_gaps(codes: np.ndarray) -> np.ndarray:
    """Invert :func:`encode_gaps`: return the int64 flat positions."""
    codes = np.asarray(codes, dtype=np.uint8).reshape(-1)
    if codes.size and codes[-1] == 255:
        raise CheckpointError("index codes end inside an escape sequence (last byte is 255)")
    ends = np.flatnonzero(codes != 255)
    return np.cumsum(codes, dtype=np.int64)[ends] + np.arange(ends.size, dtype=np.int64)


def is_constant(x: torch.Tensor) -> bool:
    """True if ``x`` has two or more elements and all are bitwise equal, after floating zeros are
    made ``+0.0`` as every encoding stores them (NaNs must share one payload)."""
    if x.numel() < 2:
        return False
    flat = _positive_zeros(x.detach().reshape(-1))
    if flat.dtype in (torch.bool, torch.uint8, torch.int8):
        raw = flat.view(torch.uint8)
    else:
        raw = flat.contiguous().view(torch.uint8).reshape(flat.numel(), flat.element_size())
    return bool((raw == raw[:1]).all())


def _positive_zeros(x: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(x == 0, 0) if x.is_floating_point() else x


def encode_tensor(
    x: torch.Tensor, *, values_dtype: ValuesDtype = "float16", encoding: Encoding | None = None
) -> tuple[str, dict[str, torch.Tensor]]:
    """Return ``(encoding, parts)`` for ``x``; ``encoding=None`` picks the smallest one.

    When the values are int8 codes, ``parts`` also holds ``scales`` (float32, one per row).
    """
    x = x.detach().cpu()
    allowed = ("dense", "bitmask", "index") if x.dtype in _PACKABLE else ("raw",)
    constant = is_constant(x)
    if encoding == "fill" and not constant:
        raise ConfigError("encoding 'fill' needs two or more bitwise-equal elements")
    if encoding == "fill" or (encoding is None and constant):
        return "fill", {"fill": _positive_zeros(x.reshape(-1)[:1]).clone()}
    if encoding is not None and encoding not in allowed:
        allowed += ("fill",) if constant else ()
        raise ConfigError(f"encoding for a {x.dtype} tensor must be in {allowed}, got {encoding!r}")
    if allowed == ("raw",):
        return "raw", {"raw": x.clone(memory_format=torch.contiguous_format)}
    vdtype = _values_dtype(values_dtype)
    quantized = _int8_rows(x) if vdtype == torch.int8 and x.dim() >= 2 else None
    extra = {} if quantized is None else {"scales": quantized[1]}
    vdtype = torch.float16 if vdtype == torch.int8 and quantized is None else vdtype
    vdtype = x.dtype if x.dtype.itemsize <= vdtype.itemsize else vdtype
    flat = x.reshape(-1)
    nonzero = flat != 0  # NaN counts as nonzero; +0.0 and -0.0 as zero
    stored = flat.masked_fill(~nonzero, 0).to(vdtype) if quantized is None else quantized[0]
    values = stored[nonzero]
    build = {
        "dense": lambda: {"dense": stored.reshape(x.shape)},
        "bitmask": lambda: {"mask": torch.from_numpy(np.packbits(nonzero.numpy()))},
        "index": lambda: {"index": torch.from_numpy(encode_gaps(np.flatnonzero(nonzero.numpy())))},
    }
    if encoding is None and values.numel() >= (flat.numel() + 7) // 8:
        build.pop("index")  # its codes take >= 1 byte per nonzero, never less than the mask
    candidates = {name: make() | extra for name, make in build.items() if encoding in (None, name)}
    for name in ("bitmask", "index"):
        if name in candidates:
            candidates[name]["values"] = values
    best = min(candidates, key=lambda name: _cost(candidates[name]))
    return best, candidates[best]


def decode_tensor(
    encoding: str,
    parts: Mapping[str, torch.Tensor],
    *,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    name: str = "tensor",
) -> torch.Tensor:
    """Rebuild the dense tensor from :func:`encode_tensor` output; raise CheckpointError if bad."""
    shape, numel = tuple(shape), math.prod(shape)
    if encoding == "fill":
        value = parts["fill"]
        if value.numel() != 1 or numel < 2:
            found = f"{value.numel()} element(s) for shape {shape}"
            raise CheckpointError(
                f"{name}: a fill part holds one value of 2+ elements, got {found}"
            )
        return value.reshape(()).to(dtype).expand(shape).clone()
    scales = _scales(encoding, parts, shape, name)
    row = numel // shape[0] if scales is not None and shape[0] else 0  # elements per row
    if encoding in ("dense", "raw"):
        stored = parts[encoding]
        if tuple(stored.shape) != shape:
            raise CheckpointError(f"{name}: stored shape {tuple(stored.shape)}, expected {shape}")
        if scales is None:
            return stored.to(dtype, copy=True)  # never a view of the stored part
        return _dequantize(stored.reshape(shape[0], row), scales[:, None], dtype).reshape(shape)
    if encoding not in ("bitmask", "index"):
        raise CheckpointError(f"{name}: unknown encoding {encoding!r}")
    code = parts[_PARTS[encoding][0]]
    values = parts["values"]
    if code.dtype != torch.uint8 or code.dim() != 1 or values.dim() != 1:
        raise CheckpointError(f"{name}: {encoding} parts must be 1-D, the {encoding} part uint8")
    if encoding == "bitmask":
        if code.numel() != (numel + 7) // 8:
            raise CheckpointError(f"{name}: mask has {code.numel()} bytes, expected {numel} bits")
        positions = np.flatnonzero(np.unpackbits(code.numpy(), count=numel))
    else:
        try:
            positions = decode_gaps(code.numpy())
        except CheckpointError as exc:
            raise CheckpointError(f"{name}: {exc}") from exc
        if positions.size and positions[-1] >= numel:
            raise CheckpointError(f"{name}: index points past the end of {numel} elements")
    if positions.size != values.numel():
        count = f"{positions.size} nonzeros but {values.numel()} values"
        raise CheckpointError(f"{name}: {encoding} part marks {count}")
    out = torch.zeros(numel, dtype=dtype)
    index = torch.from_numpy(positions)
    if scales is None:
        out[index] = values.to(dtype)
    else:
        out[index] = _dequantize(values, scales[index // row] if row else scales[:0], dtype)
    return out.reshape(shape)


def _int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Flat int8 codes and float32 scales (one per row of dim 0) of ``x``, or None if not finite.

    ``scale = max|row| / 127`` rounded to the nearest float32, moved one ulp where that rounding
    would break ``|x| <= 127.5 * scale`` (subnormal scales) or make ``127 * scale`` overflow.
    """
    rows = x.shape[0]
    x2d = x.reshape(rows, x.numel() // rows if rows else 0)
    top = x2d.abs().amax(dim=1) if x2d.numel() else torch.zeros(rows, dtype=x.dtype)
    top = top.to(torch.float64)  # NaN stays NaN
    scale = (top / 127).to(torch.float32)
    if not bool(torch.isfinite(scale).all()):
        return None  # NaN or inf in x, or a float64 row too large for a float32 scale
    up = top > 127.5 * scale.double()
    down = torch.isinf(scale * 127)
    scale = torch.where(up, torch.nextafter(scale, torch.tensor(math.inf)), scale)
    scale = torch.where(down, torch.nextafter(scale, torch.tensor(0.0)), scale)
    work = torch.promote_types(x.dtype, torch.float32)
    divisor = torch.where(scale > 0, scale, 1.0).to(work)[:, None]  # all-zero rows give code 0
    codes = (x2d.to(work) / divisor).round_().clamp_(-127, 127).to(torch.int8)
    return codes.reshape(-1), scale


def _dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codes * scales`` (broadcast), computed in float32 or wider, rounded once to ``dtype``."""
    work = torch.promote_types(dtype, torch.float32)
    return (codes.to(work) * scales.to(work)).to(dtype)


def _scales(
    encoding: str, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], name: str
) -> torch.Tensor | None:
    """The validated ``scales`` part: present exactly when the values are int8 codes."""
    stored = parts.get({"dense": "dense", "raw": "raw"}.get(encoding, "values"))
    int8 = stored is not None and stored.dtype == torch.int8 and encoding != "raw"
    if "scales" not in parts:
        if int8:
            raise CheckpointError(f"{name}: int8 values need a scales part (one per row)")
        return None
    if not int8:
        found = "none" if stored is None else _dtype_name(stored.dtype)
        raise CheckpointError(f"{name}: a scales part needs int8 {encoding} values, got {found}")
    if len(shape) < 2:
        raise CheckpointError(f"{name}: int8 values need 2 or more dims, got shape {shape}")
    scales = parts["scales"]
    if scales.dtype != torch.float32 or scales.dim() != 1 or scales.numel() != shape[0]:
        found = f"a {tuple(scales.shape)} {_dtype_name(scales.dtype)} tensor"
        raise CheckpointError(
            f"{name}: scales part is {found}, expected {shape[0]} float32 values (one per row)"
        )
    if not bool((torch.isfinite(scales) & (scales >= 0)).all()):
        raise CheckpointError(f"{name}: scales must be finite and >= 0")
    return scales


@dataclass(frozen=True)
class PackedTensorInfo:
    """How one tensor was stored.

    ``stored_bytes`` counts payload bytes (scales included), not header bytes; ``values_dtype`` is
    the dtype its values were stored in (``None`` for ``raw`` tensors).
    """

    name: str
    encoding: str
    shape: tuple[int, ...]
    dtype: str
    nonzero: int | None
    stored_bytes: int
    values_dtype: str | None = None


@dataclass(frozen=True)
class PackedReport:
    """Result of :func:`save_packed`.

    ``dense_fp32_bytes`` is the size of a safetensors file holding the same state dict with every
    floating tensor in float32 (measured by serialising it); ``ratio`` is
    ``bytes_on_disk / dense_fp32_bytes``; ``values_dtype`` is the one asked for (each tensor's
    :class:`PackedTensorInfo` says what it got: under ``"int8"``, 1-D tensors get float16).
    """

    path: Path
    bytes_on_disk: int
    dense_fp32_bytes: int
    ratio: float
    values_dtype: str
    tensors: tuple[PackedTensorInfo, ...]

    @property
    def encodings(self) -> dict[str, str]:
        """Map tensor name to its encoding."""
        return {info.name: info.encoding for info in self.tensors}

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {**asdict(self), "path": str(self.path)}

    def __str__(self) -> str:
        head = (
            f"packed checkpoint {self.path}: {self.bytes_on_disk:,} bytes = {self.ratio:.3f}x "
            f"of dense fp32 ({self.dense_fp32_bytes:,} bytes), values {self.values_dtype}"
        )
        rows = [("tensor", "shape", "dtype", "encoding", "values", "nonzero", "stored bytes")]
        for t in self.tensors:
            nonzero = "-" if t.nonzero is None else f"{t.nonzero:,}"
            shape = "x".join(map(str, t.shape)) or "scalar"
            values = t.values_dtype or "-"
            rows.append(
                (t.name, shape, t.dtype, t.encoding, values, nonzero, f"{t.stored_bytes:,}")
            )
        widths = [max(map(len, column)) for column in zip(*rows, strict=True)]
        lines = ["  ".join(map(str.ljust, row, widths)).rstrip() for row in rows]
        return "\n".join([head, *lines])


def save_packed(
    state_dict_or_module: Mapping[str, torch.Tensor] | nn.Module,
    path: PathLike,
    *,
    values_dtype: ValuesDtype = "float16",
    metadata: dict[str, str] | None = None,
) -> PackedReport:
    """Write a packed checkpoint atomically; a failed write leaves any existing file intact."""
    state_dict = state_dict_or_module
    if isinstance(state_dict, nn.Module):
        state_dict = state_dict.state_dict()
    elif not isinstance(state_dict, Mapping):
        raise ConfigError(f"expected a state_dict or nn.Module, got {type(state_dict).__name__}")
    _values_dtype(values_dtype)
    user = dict(metadata or {})
    for key, value in user.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(f"metadata must map str to str, got {key!r}: {type(value).__name__}")
    chunks: dict[str, list[torch.Tensor]] = {}  # blob name -> its parts, blobs in order of use
    lengths: dict[str, int] = {}
    entries: dict[str, list[Any]] = {}
    infos = []
    for name, tensor in state_dict.items():
        if not isinstance(name, str):
            raise ConfigError(f"state_dict keys must be str, got {type(name).__name__} {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise ConfigError(f"state_dict[{name!r}] must be a tensor, got {type(tensor).__name__}")
        encoding, parts = encode_tensor(tensor, values_dtype=values_dtype)
        refs = []
        for suffix in _part_names(encoding, "scales" in parts):
            part = parts[suffix].reshape(-1)
            blob = _blob_name(suffix, part.dtype)
            if blob not in chunks:
                chunks[blob], lengths[blob] = [], 0
            refs.append([list(chunks).index(blob), lengths[blob], part.numel()])
            chunks[blob].append(part)
            lengths[blob] += part.numel()
        dtype = _dtype_name(tensor.dtype)
        entries[name] = [encoding, list(tensor.shape), dtype, refs]
        nonzero = int(torch.count_nonzero(tensor)) if encoding not in ("raw", "fill") else None
        size = _cost(parts)
        exact = encoding in ("raw", "fill")
        stored_as = None if exact else _dtype_name(parts[_PARTS[encoding][-1]].dtype)
        info = (name, encoding, tuple(tensor.shape), dtype, nonzero, size, stored_as)
        infos.append(PackedTensorInfo(*info))
    blobs = {blob: torch.cat(parts) for blob, parts in chunks.items()}
    record = {"format": FORMAT, "version": VERSION, "values_dtype": values_dtype}
    record |= {"blobs": list(blobs), "tensors": entries}
    header = {
        METADATA_KEY: _encode_record(record),
        USER_METADATA_KEY: json.dumps(user, ensure_ascii=False, separators=(",", ":")),
    }
    try:
        with atomic_path(path) as tmp:
            safetensors.torch.save_file(blobs, str(tmp), metadata=header)
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"could not write packed checkpoint {path}: {_line(exc)}") from exc
    on_disk, dense = file_size(path), dense_checkpoint_bytes(state_dict)
    return PackedReport(Path(path), on_disk, dense, on_disk / dense, values_dtype, tuple(infos))


def load_packed(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return ``(state_dict, user_metadata)``: dense tensors in their original dtype, zeros +0.0."""
    if not Path(path).exists():
        raise CheckpointError(f"packed checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            stored = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {_line(exc)}") from exc
    record = _read_record(header, path)
    user = _read_user_metadata(header, path)
    names = record["blobs"]
    if missing := [blob for blob in names if blob not in stored]:
        raise CheckpointError(f"{path}: lacks stored blob(s) {_names(missing)}")
    if extra := [key for key in stored if key not in names]:
        raise CheckpointError(f"{path}: stored tensors not described by metadata: {_names(extra)}")
    for blob in names:
        _check_blob(blob, stored[blob], path, record["version"])
    state_dict: dict[str, torch.Tensor] = {}
    for name, entry in record["tensors"].items():
        what = f"{path}: tensor {name!r}"
        encoding, shape, dtype, refs = _parse_entry(entry, len(names), what, record["version"])
        parts = {
            suffix: _part(suffix, names[ref[0]], stored[names[ref[0]]], ref, shape, dtype, what)
            for suffix, ref in zip(
                _part_names(encoding, len(refs) > len(_PARTS[encoding])), refs, strict=True
            )
        }
        state_dict[name] = decode_tensor(encoding, parts, shape=shape, dtype=dtype, name=what)
    return state_dict, user


def load_packed_into(module: nn.Module, path: PathLike, *, strict: bool = True) -> dict[str, str]:
    """Load a packed checkpoint into ``module`` and return the user metadata.

    Shape mismatches always raise CheckpointError; missing or unexpected keys raise it when
    ``strict``.
    """
    state_dict, user = load_packed(path)
    own = module.state_dict()
    found = {
        "missing keys": [k for k in own if k not in state_dict] if strict else [],
        "unexpected keys": [k for k in state_dict if k not in own] if strict else [],
        "shape mismatch": [
            f"{k} checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in state_dict.items()
            if k in own and v.shape != own[k].shape
        ],
    }
    if problems := [f"{kind} {_names(keys)}" for kind, keys in found.items() if keys]:
        where = f"packed checkpoint {path} does not fit {type(module).__name__}"
        raise CheckpointError(f"{where}: {'; '.join(problems)}")
    try:
        module.load_state_dict(state_dict, strict=strict)
    except RuntimeError as exc:
        raise CheckpointError(
            f"could not load {path} into {type(module).__name__}: {_line(exc)}"
        ) from exc
    return user


def _part_names(encoding: str, scaled: bool) -> tuple[str, ...]:
    """The parts of an ``encoding``, in record order; ``scaled``: values are int8 codes."""
    return (*_PARTS[encoding], "scales") if scaled else _PARTS[encoding]


def _blob_name(suffix: str, dtype: torch.dtype) -> str:
    if suffix in ("mask", "index"):
        return "bits"
    role = "raw" if suffix == "fill" else suffix if suffix in ("raw", "scales") else "values"
    return f"{role}.{_dtype_name(dtype)}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_dtype(name: Any) -> torch.dtype | None:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def _encode_record(record: dict[str, Any]) -> str:
    text = json.dumps(record, separators=(",", ":"))
    return base64.b64encode(zlib.compress(text.encode("utf-8"), 9)).decode("ascii")


def _decode_record(text: str) -> Any:
    """Invert :func:`_encode_record`; raise ValueError or zlib.error if ``text`` is not one."""
    inflater = zlib.decompressobj()
    data = inflater.decompress(
        base64.b64decode(text.encode("ascii"), validate=True), _MAX_RECORD_BYTES
    )
    if inflater.unconsumed_tail:
        raise ValueError(f"it inflates past {_MAX_RECORD_BYTES:,} bytes")
    if not inflater.eof or inflater.unused_data:
        raise ValueError("the zlib stream is truncated or followed by extra bytes")
    return json.loads(data.decode("utf-8"))


def _read_record(header: dict[str, str], path: PathLike) -> dict[str, Any]:
    if METADATA_KEY not in header:
        raise CheckpointError(f"{path} is not a slimkit packed checkpoint (no {METADATA_KEY!r})")
    text = header[METADATA_KEY]
    plain = text.lstrip().startswith("{")  # version 1 stored the record as plain JSON
    try:
        record = json.loads(text) if plain else _decode_record(text)
    except (ValueError, RecursionError, zlib.error) as exc:  # RecursionError: deep nesting
        kind = "JSON" if plain else "zlib-compressed base64 JSON"
        raise CheckpointError(
            f"{path}: {METADATA_KEY!r} record is not {kind}: {_line(exc)}"
        ) from exc
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: {METADATA_KEY!r} record must be a JSON object")
    found = (record.get("format"), record.get("version"))
    if (found[0], type(found[1])) != (FORMAT, int) or found[1] not in READABLE_VERSIONS:
        versions = " or ".join(map(str, READABLE_VERSIONS))
        raise CheckpointError(
            f"{path}: format {found[0]!r} version {found[1]!r} is not supported "
            f"(expected {FORMAT!r} version {versions})"
        )
    if plain:
        raise CheckpointError(f"{path}: {METADATA_KEY!r} record must be zlib-compressed base64")
    blobs, tensors = record.get("blobs"), record.get("tensors")
    blobs_ok = isinstance(blobs, list) and all(isinstance(b, str) for b in blobs)
    if not blobs_ok or len(set(blobs)) != len(blobs) or not isinstance(tensors, dict):
        raise CheckpointError(
            f"{path}: metadata record needs a 'blobs' list of distinct names and a 'tensors' object"
        )
    return record


def _read_user_metadata(header: dict[str, str], path: PathLike) -> dict[str, str]:
    if USER_METADATA_KEY not in header:
        raise CheckpointError(f"{path}: no {USER_METADATA_KEY!r} in the safetensors metadata")
    try:
        user = json.loads(header[USER_METADATA_KEY])
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: {USER_METADATA_KEY!r} is not JSON: {_line(exc)}") from exc
    if not isinstance(user, dict) or not all(isinstance(v, str) for v in user.values()):
        raise CheckpointError(f"{path}: {USER_METADATA_KEY!r} must be a JSON object of strings")
    return user


def _check_blob(name: str, blob: torch.Tensor, path: PathLike, version: int) -> None:
    role, _, dtype_name = name.partition(".")
    dtype = _torch_dtype(dtype_name)
    int8 = version >= 3  # int8 values and their scales came with version 3
    if name == "bits":
        dtype = torch.uint8
    elif not (
        role == "raw"
        or (role == "values" and (dtype in _PACKABLE or (int8 and dtype == torch.int8)))
        or (int8 and name == "scales.float32")
    ):
        dtype = None
    if dtype is None:
        raise CheckpointError(f"{path}: unknown blob name {name!r}")
    if blob.dtype != dtype or blob.dim() != 1:
        found = f"a {tuple(blob.shape)} {_dtype_name(blob.dtype)} tensor"
        raise CheckpointError(
            f"{path}: blob {name!r} is {found}, expected 1-D {_dtype_name(dtype)}"
        )


def _parse_entry(
    entry: Any, blob_count: int, what: str, version: int
) -> tuple[str, tuple[int, ...], torch.dtype, list[tuple[int, int, int]]]:
    """Validate one tensor's ``[encoding, shape, dtype, refs]`` record entry.

    ``refs`` has one ref per part of ``encoding``, plus a last one for ``scales`` (version 3).
    """

    def count(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    ok = isinstance(entry, list) and len(entry) == 4
    encoding, shape, dtype_name, refs = entry if ok else (None, None, None, None)
    dtype = _torch_dtype(dtype_name)
    ok = ok and encoding in _PARTS and dtype is not None
    ok = ok and (encoding != "fill" or version >= 4)  # fill came with version 4
    ok = ok and (encoding in ("raw", "fill") or dtype in _PACKABLE)
    ok = ok and isinstance(shape, list) and all(map(count, shape))
    extra = (0, 1) if version >= 3 and encoding not in ("raw", "fill") else (0,)  # 1: scales
    ok = ok and isinstance(refs, list) and len(refs) - len(_PARTS[encoding]) in extra
    ok = ok and all(
        isinstance(ref, list) and len(ref) == 3 and all(map(count, ref)) and ref[0] < blob_count
        for ref in refs
    )
    if not ok:
        raise CheckpointError(f"{what} has a bad metadata entry {json.dumps(entry)}")
    return encoding, tuple(shape), dtype, [tuple(ref) for ref in refs]


def _part(
    suffix: str,
    blob: str,
    data: torch.Tensor,
    ref: tuple[int, int, int],
    shape: tuple[int, ...],
    dtype: torch.dtype,
    what: str,
) -> torch.Tensor:
    """The ``suffix`` part of one tensor: ``ref = (blob index, offset, length)`` into ``data``."""
    _, offset, length = ref
    if suffix in ("dense", "values"):
        wanted, ok = "a values.<dtype> blob", blob.startswith("values.")
    else:  # bits, scales.float32, or raw.<the tensor's dtype> (raw and fill parts)
        wanted = _blob_name(suffix, torch.float32 if suffix == "scales" else dtype)
        ok = blob == wanted
    if not ok:
        raise CheckpointError(f"{what}: {suffix} part is in blob {blob!r}, not {wanted}")
    if offset + length > data.numel():
        raise CheckpointError(
            f"{what}: {suffix} part [{offset}:{offset + length}] is out of range of blob {blob!r} "
            f"({data.numel()} elements)"
        )
    part = data[offset : offset + length]
    if suffix not in ("dense", "raw"):
        return part  # decode_tensor checks the lengths of values and scales
    if length != math.prod(shape):
        needs = f"shape {shape} needs {math.prod(shape)}"
        raise CheckpointError(f"{what}: {suffix} part has {length} elements, {needs}")
    return part.reshape(shape)


def _values_dtype(values_dtype: str) -> torch.dtype:
    if values_dtype not in _VALUES_DTYPES:
        choices = ", ".join(map(repr, _VALUES_DTYPES))
        raise ConfigError(f"values_dtype must be one of {choices}, got {values_dtype!r}")
    return _VALUES_DTYPES[values_dtype]


def _cost(parts: Mapping[str, torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in parts.values())


def _names(keys: Any, limit: int = 5) -> str:
    keys = list(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(map(str, keys[:limit])) + more


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__

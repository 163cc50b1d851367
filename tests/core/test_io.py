"""Atomic writes: the target is either the old file or the complete new one, never half of it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from slimkit.io import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_write_with,
)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_writes_replace_content_and_leave_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "out" / "metrics.json"
    assert atomic_write_text(target, "first\n") == target  # creates the parent folder
    assert target.read_text() == "first\n"
    atomic_write_bytes(target, b"\x00second")
    assert target.read_bytes() == b"\x00second"
    atomic_write_json(target, {"b": 1, "a": [1.5, "x"]})
    assert target.read_text() == '{\n  "a": [\n    1.5,\n    "x"\n  ],\n  "b": 1\n}\n'
    assert json.loads(target.read_text()) == {"a": [1.5, "x"], "b": 1}
    atomic_write_with(target, lambda tmp: tmp.write_text("from writer"))
    assert target.read_text() == "from writer"
    assert listing(target.parent) == ["metrics.json"]


def test_a_failing_writer_leaves_the_previous_file_byte_identical(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    before = bytes(range(256)) * 4
    target.write_bytes(before)

    def writer(tmp: Path) -> None:
        tmp.write_bytes(b"half a mod")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_with(target, writer)
    assert target.read_bytes() == before
    assert listing(tmp_path) == ["model.bin"]


def test_an_error_inside_atomic_path_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "new.txt"
    with pytest.raises(KeyError), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".new.txt.")
        tmp.write_text("partial")
        raise KeyError("boom")
    assert listing(tmp_path) == []


def test_new_files_get_ordinary_permissions_and_replaced_files_keep_theirs(tmp_path: Path) -> None:
    fresh = atomic_write_text(tmp_path / "fresh.txt", "x")
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~current_umask()
    kept = tmp_path / "kept.txt"
    kept.write_text("old")
    kept.chmod(0o640)
    atomic_write_text(kept, "new")
    assert kept.read_text() == "new"
    assert kept.stat().st_mode & 0o777 == 0o640

"""atomic_path and the atomic writers: the target is the old content or the new, never half."""

from __future__ import annotations

import json

import pytest

from craft_ray.runtime import atomic_path, atomic_write_json, atomic_write_text


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_file_is_renamed_into_place(tmp_path):
    out = tmp_path / "a.txt"
    out.write_text("old")
    with atomic_path(out) as tmp:
        assert tmp.parent == out.parent and tmp != out
        tmp.write_text("new")
        assert out.read_text() == "old"  # the target is untouched until the block ends
    assert out.read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_block_raising_keeps_old_file_and_removes_tmp(tmp_path):
    out = tmp_path / "a.txt"
    out.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert out.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_folder_is_renamed_and_removed_on_error(tmp_path):
    out = tmp_path / "model"
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "w.bin").write_bytes(b"1")
    assert (out / "w.bin").read_bytes() == b"1"
    with pytest.raises(ValueError), atomic_path(tmp_path / "other") as tmp:
        tmp.mkdir()
        (tmp / "w.bin").write_bytes(b"2")
        raise ValueError
    assert not (tmp_path / "other").exists()
    assert _leftovers(tmp_path) == []


def test_failed_rename_onto_a_full_folder_removes_tmp(tmp_path):
    """A rename never replaces a non-empty folder (what gguf/onnx caches rely on to detect a
    concurrent writer): the error reaches the caller, the temporary folder is gone."""
    out = tmp_path / "cache"
    out.mkdir()
    (out / "done").write_text("theirs")
    with pytest.raises(OSError), atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "done").write_text("mine")
    assert (out / "done").read_text() == "theirs"
    assert _leftovers(tmp_path) == []


def test_atomic_write_json_and_text(tmp_path):
    atomic_write_json(tmp_path / "sub" / "x.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "sub" / "x.json").read_text()) == {"a": [1, 2], "b": 1}
    atomic_write_text(tmp_path / "t.md", "héllo\n")
    assert (tmp_path / "t.md").read_text(encoding="utf-8") == "héllo\n"

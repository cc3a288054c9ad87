"""Atomic writes: the final path holds the old content or the whole new one, never a part."""

from __future__ import annotations

import pytest

from pipeline.atomic import atomic_copy, atomic_dir, atomic_path, atomic_write


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_replaces_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    atomic_write(target, "old")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    atomic_copy(target, tmp_path / "sub" / "copy.json")
    assert (tmp_path / "sub" / "copy.json").read_text() == "new"
    assert _leftovers(target.parent) == []


def test_failure_midway_keeps_the_old_file(tmp_path):
    target = tmp_path / "best.pt"
    target.write_text("the user's file")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "the user's file"
    assert _leftovers(tmp_path) == []


def test_folder_is_replaced_whole_or_not_at_all(tmp_path):
    out = tmp_path / "shards"
    with atomic_dir(out) as tmp:
        (tmp / "a.tar").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "b.tar").write_text("2")
        raise RuntimeError("disk full")
    assert sorted(p.name for p in out.iterdir()) == ["a.tar"]
    with atomic_dir(out) as tmp:
        (tmp / "c.tar").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["c.tar"]
    assert _leftovers(tmp_path) == []
    plain = tmp_path / "plain"
    plain.mkdir()
    assert out.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # the umask's mode

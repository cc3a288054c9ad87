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


def test_files_written_together_replace_all_or_none(tmp_path):
    """atomic_files (seg eval's outputs): a failure at the last file leaves every old file."""
    from pipeline.atomic import atomic_files

    for name in ("metrics.json", "confusion.png"):
        (tmp_path / name).write_text(f"old {name}")
    with pytest.raises(OSError), atomic_files() as new:
        new(tmp_path / "metrics.json").write_text("new")
        new(tmp_path / "confusion.png", ".png")
        raise OSError("the second file could not be written")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        "metrics.json": "old metrics.json",
        "confusion.png": "old confusion.png",
    }
    with atomic_files() as new:
        new(tmp_path / "metrics.json").write_text("new")
        new(tmp_path / "confusion.png", ".png").write_text("new png")
    assert (tmp_path / "metrics.json").read_text() == "new"
    assert (tmp_path / "confusion.png").read_text() == "new png"
    assert _leftovers(tmp_path) == []

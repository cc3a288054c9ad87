"""Atomic writes: a file or folder appears whole at its final path, or not at all.

Everything the pipeline writes (checkpoints, metrics, shards, PNGs, params, the run history)
is first written under a temporary name in the same folder, flushed, then renamed over the
final path with `os.replace` (atomic on POSIX within one file system), and the folder itself
is fsynced so the rename survives a power cut. A failure midway removes the temporary file
and leaves whatever was at the final path untouched.

    with atomic_path("outputs/eval/metrics.json") as tmp:
        tmp.write_text(...)                    # or torch.save(obj, tmp), fig.savefig(tmp) ...
    atomic_write("outputs/eval/metrics.json", text)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(folder: Path | str) -> None:
    """Make a rename inside `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace(tmp: Path | str, path: Path | str) -> Path:
    """Rename `tmp` over `path` (a file, or a folder onto a missing path) and fsync the folder."""
    path = Path(path)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


@contextmanager
def atomic_path(path: Path | str, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to `path`; on a clean exit it is fsynced and renamed over
    `path`, on an exception it is removed. `suffix` keeps an extension for writers that infer
    the format from the name (matplotlib's savefig)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path | str, data: bytes | str) -> Path:
    """Write bytes (or UTF-8 text) to `path` atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


def atomic_copy(src: Path | str, path: Path | str) -> Path:
    """Copy a file to `path` atomically (e.g. best.pt from a best-k snapshot)."""
    with atomic_path(path) as tmp:
        shutil.copyfile(src, tmp)
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on a clean exit it replaces `path` (an old
    folder there is removed only after the new one is complete), on an exception it is
    removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the folder keeps the usual mode
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        try:
            replace(tmp, path)
        except BaseException:
            if old is not None:  # put the user's folder back
                os.replace(old / path.name, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

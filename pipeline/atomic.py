"""Atomic writes: a file or folder appears whole at its final path, or not at all.

Everything the pipeline writes (checkpoints, metrics, shards, PNGs, params, the run history)
is first written under a temporary name in the same folder, flushed, then renamed over the
final path with `os.replace` (atomic on POSIX within one file system), and the folder itself
is fsynced so the rename survives a power cut. A failure midway removes the temporary file
and leaves whatever was at the final path untouched.

    with atomic_path("outputs/eval/metrics.json") as tmp:
        tmp.write_text(...)                    # or torch.save(obj, tmp), fig.savefig(tmp) ...
    atomic_write("outputs/eval/metrics.json", text)
    with atomic_files() as new:                # several files that change together
        new("metrics.json").write_text(...); new("confusion.png", ".png") ...

Modes: temporary files and folders are created with 0o666 / 0o777 and the kernel applies the
process umask (and a folder's default ACL), so a result has the mode a plain `open()` or
`mkdir` gives it (0644 / 0755 under umask 022) - not mkstemp's 0600, which left colleagues
and service users unable to read each other's results.

A full disk (ENOSPC, or EDQUOT: over quota) while writing raises `DiskFull` naming the final
path; the temporary file is removed and the final path keeps its old content.

Leftovers: a writer killed mid-write (SIGKILL, a lost machine) cannot remove its temporary
file or folder. Each writer holds an flock on its temporary while it writes (the kernel drops
it when the process dies, on any host of a shared file system that honours flock), and the
next writer of the same final path removes the temporaries nobody holds (`sweep`) before it
starts; a live writer's are left alone. A folder replaced halfway (`.NAME.old-*` holding the
previous folder, nothing at NAME) is put back, not removed. Git ignores all of them
(.gitignore: `.*.tmp`, `.*.tmp-*`, `.*.old-*`, ...).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import DiskFull

_FULL = (errno.ENOSPC, errno.EDQUOT)


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


def disk_full(exc: BaseException) -> bool:
    """Did `exc` (or what it was raised from) fail for lack of space (ENOSPC, EDQUOT)?"""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(path: Path | str, exc: BaseException | None = None, part: str = "") -> DiskFull:
    """The one-line error for a write to `path` (`part`: the file inside a folder) that ran
    out of space."""
    quota = isinstance(exc, OSError) and exc.errno == errno.EDQUOT
    why = "disk quota exceeded" if quota else "disk full (no space left on device)"
    writing = f" writing {part}" if part else ""
    return DiskFull(f"{path}: {why}{writing}; it was left as it was: free space and run again")


# temporaries being written by this process -> the fd that holds their flock
_held: dict[str, int] = {}


def _hold(tmp: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _held[str(tmp)] = fd


def _release(tmp: Path) -> None:
    fd = _held.pop(str(tmp), None)
    if fd is not None:
        os.close(fd)


def _leftover(path: Path) -> re.Pattern:
    """The names of the temporaries of writes to `path`: `.NAME.<hex>[.ext]` files,
    `.NAME.tmp-<hex>` and `.NAME.old-<hex>` folders."""
    name = re.escape(path.name)
    return re.compile(rf"\.{name}\.(?:[0-9a-f]{{8}}(?:\..*)?|(tmp|old)-[0-9a-f]{{8}})")


def sweep(path: Path | str) -> list[Path]:
    """Remove what killed writers of `path` left next to it (temporaries nobody holds a lock
    on); a folder replaced halfway, whose previous version sits in `.NAME.old-*` while NAME
    is missing, is put back first. Returns the paths removed (or put back)."""
    path = Path(path)
    pattern = _leftover(path)
    try:
        names = [n for n in os.listdir(path.parent) if pattern.fullmatch(n)]
    except FileNotFoundError:
        return []
    done = []
    for name in sorted(names):
        tmp = path.parent / name
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live writer's
            os.close(fd)
            continue
        try:
            kept = tmp / path.name
            if pattern.fullmatch(name).group(1) == "old" and kept.exists() and not path.exists():
                os.replace(kept, path)  # the user's previous folder, never lost
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            done.append(tmp)
        finally:
            os.close(fd)
    return done


def _new_file(path: Path, suffix: str) -> Path:
    """A new empty file next to `path`, created as `open()` creates one (mode 0o666 less the
    umask), under a name nothing else uses, locked by this process (`sweep`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            _hold(tmp)
            return tmp
        except FileExistsError:
            continue


def _new_dir(path: Path, kind: str) -> Path:
    """A new empty folder next to `path`, with `mkdir`'s mode (0o777 less the umask), locked
    by this process (`sweep`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "tmp":  # the start of a write (`old` comes at its end)
        sweep(path)
    while True:
        tmp = path.parent / f".{path.name}.{kind}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir(0o777)
            _hold(tmp)
            return tmp
        except FileExistsError:
            continue


def _commit(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    replace(tmp, path)
    _release(tmp)


@contextmanager
def atomic_path(path: Path | str, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to `path`; on a clean exit it is fsynced and renamed over
    `path`, on an exception it is removed. `suffix` keeps an extension for writers that infer
    the format from the name (matplotlib's savefig)."""
    path = Path(path)
    tmp = _new_file(path, suffix)
    try:
        yield tmp
        _commit(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _release(tmp)
        if disk_full(exc):
            raise disk_full_error(path, exc) from None
        raise


@contextmanager
def atomic_files() -> Iterator[Callable[..., Path]]:
    """Several files that replace their final paths together: `new(path, suffix=".tmp")`
    gives each one a temporary path. Only when the block ends cleanly are they all fsynced
    and renamed into place; on an exception (a full disk at the third file) every temporary
    file is removed and none of the final paths has changed."""
    made: list[tuple[Path, Path]] = []  # (temporary, final)

    def new(path: Path | str, suffix: str = ".tmp") -> Path:
        path = Path(path)
        made.append((_new_file(path, suffix), path))
        return made[-1][0]

    try:
        yield new
        for tmp, _ in made:  # everything on disk before any final path changes
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for tmp, path in made:
            replace(tmp, path)
            _release(tmp)
    except BaseException as exc:
        for tmp, _ in made:
            tmp.unlink(missing_ok=True)
            _release(tmp)
        if disk_full(exc):
            name = getattr(exc, "filename", None)
            failed = next((p for t, p in made if str(t) == str(name)), None)
            raise disk_full_error(failed or (made[-1][1] if made else "?"), exc) from None
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


@contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on a clean exit it replaces `path` (an old
    folder there is removed only after the new one is complete), on an exception it is
    removed. A full disk raises DiskFull naming `path` (and the file being written)."""
    path = Path(path)
    tmp = _new_dir(path, "tmp")
    old = None
    try:
        yield tmp
        if path.exists():
            old = _new_dir(path, "old")
            os.replace(path, old / path.name)
        try:
            replace(tmp, path)
            _release(tmp)
        except BaseException:
            if old is not None:  # put the user's folder back
                os.replace(old / path.name, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            _release(old)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _release(tmp)
        if old is not None:
            _release(old)
        if disk_full(exc):
            name = getattr(exc, "filename", None)
            raise disk_full_error(path, exc, Path(name).name if name else "") from None
        raise

"""Checkpoints that outlive the machine that wrote them: copies of last.pt in a run store.

A run store is a folder or an object-store prefix (pipeline.store) that belongs to one piece
of work: a commit and its overrides (the flows choose it and pass it to `seg train` as
SEG_RUN_STORE; stages/experiments.py checkpoint_store). While a run trains, each checkpoint it saves
is copied there (`push`) under a name of its own,

    step-000000300.<run>.pt     the step it holds, the run that wrote it

so nothing stored is ever rewritten: two runs of the same work (one that lost its slot but
still trains, and the one that took it over) write different names. A run keeps only its
newest copy (`prune`). The next run of the same work, on any host, starts from the newest
copy that loads (`newest`, `fetch`): a killed run loses at most `train.checkpoint_interval`
steps, wherever it ran.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline import store
from pipeline.atomic import atomic_path

log = logging.getLogger(__name__)

_NAME = re.compile(r"step-(\d{9})\.(.+)\.pt")


@dataclass(frozen=True)
class Copy:
    step: int
    run: str
    url: str  # a path or a URL


def name(step: int, run: str) -> str:
    return f"step-{step:09d}.{run or 'run'}.pt"


def push(path: Path, where: str, step: int, run: str) -> Copy:
    """Copy the checkpoint at `path` into the store as step `step` of run `run`: an object
    store's put is whole or absent; a folder gets a temporary file renamed into place."""
    url = str(store.join(where, name(step, run)))
    if store.is_url(where):
        store.put_once(path, url)  # a new name each time: created, never rewritten
    else:
        dest = store.local(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest, suffix=".pt") as tmp:
            shutil.copyfile(path, tmp)
    return Copy(step, run, url)


def copies(where: str) -> list[Copy]:
    """The store's checkpoints, newest step first (ties: by run name)."""
    if store.is_url(where):
        try:
            names = store.list_names(where)
        except FileNotFoundError:
            names = []
    else:
        folder = store.local(where)
        names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    found = []
    for n in names:
        m = _NAME.fullmatch(n)
        if m:
            found.append(Copy(int(m.group(1)), m.group(2), str(store.join(where, n))))
    return sorted(found, key=lambda c: (-c.step, c.run))


def fetch(copy: Copy, dest: Path) -> Path:
    """Download a copy to `dest`, atomically (a file renamed into place)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest, suffix=".pt") as tmp:
        if store.is_url(copy.url):
            tmp.write_bytes(store.read_bytes(copy.url))
        else:
            shutil.copyfile(store.local(copy.url), tmp)
    return dest


def prune(where: str, run: str, keep: Copy) -> None:
    """Remove this run's older copies (another run's copies are never touched)."""
    old = [c.url for c in copies(where) if c.run == run and c.url != keep.url]
    if not old:
        return
    if store.is_url(where):
        store.remove(old)  # a delete marker where the bucket keeps versions, not a new version
    else:
        for url in old:
            store.local(url).unlink(missing_ok=True)

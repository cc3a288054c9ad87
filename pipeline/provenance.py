"""Provenance stamped on every result: git revision, params/data hashes, hardware, time."""

from __future__ import annotations

import datetime as dt
import platform
import subprocess
from pathlib import Path

import torch

from pipeline.errors import DataError


def git_state(cwd: Path | str = ".") -> dict:
    """{"revision": sha or None, "dirty": bool or None} of the repository holding cwd."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
            )
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    rev = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"revision": rev, "dirty": bool(status) if status is not None else None}


def data_hash(shard_dir, dvc_lock: Path | str = "dvc.lock") -> dict:
    """The shards' hash: the md5 DVC recorded for the folder in dvc.lock where there is one,
    and always the sha256 of the split's manifest. The manifest already holds the sha256 of
    every member of every shard (and the shards are a function of their members), so hashing
    it identifies the data without reading gigabytes of tars again at each evaluation.

    `shard_dir`: a folder, URL, or the Pinned split the evaluation read (pipeline.data.shards:
    then the hash is of the manifest it scored, read once). A folder that points to a store
    (data.store) adds `store`: the prefix that holds the shards."""
    from pipeline import store
    from pipeline.data.shards import pin

    try:
        pinned = pin(shard_dir)
        sha, in_store = pinned.sha256, store.display(pinned.base) if pinned.in_store else None
    except DataError:  # no manifest
        sha, in_store = None, None
    where = store.display(str(shard_dir))  # a bucket URL: never user info or a query
    out = {"path": where, "sha256": sha, "dvc_md5": None, "store": in_store}
    lock = Path(dvc_lock)
    if lock.is_file():
        import yaml

        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for stage in stages.values():
            for o in stage.get("outs", []) or []:
                if _same_place(o.get("path", ""), str(shard_dir)):
                    out["dvc_md5"] = o.get("md5") or o.get("etag")
    return out


def _same_place(recorded: str, shard_dir: Path | str) -> bool:
    """dvc.lock's path of an output and a shard folder (or bucket URL) name the same place."""
    from pipeline import store

    if store.is_url(shard_dir):
        return recorded.rstrip("/") == store.display(shard_dir).rstrip("/")
    return not store.is_url(recorded) and Path(recorded) == Path(shard_dir)


def run_info() -> dict | None:
    """The flow run this result belongs to, when a flow started the stage (SEG_RUN: its
    name, commit, overrides, host, experiment; stages/flows.py), else None."""
    import json
    import os

    text = os.environ.get("SEG_RUN")
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def hardware() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": __import__("os").cpu_count(),
        "cuda": None,
    }
    if torch.cuda.is_available():
        info["cuda"] = {"device": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    return info


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")

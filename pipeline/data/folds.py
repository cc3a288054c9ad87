"""Grouped k-fold cross-validation over a split's shards: fold assignment and the summary.

Frames of one group (a Cityscapes city, a CamVid sequence, a Virtual KITTI 2 scene: the
manifest's `group` column) always land in the same fold. Neighbouring video frames are
near-duplicates; one in the training part and its neighbour in the validation part would
inflate the score. A frame without a group (VOC photos) is a group of its own.

The assignment is deterministic and needs no seed: groups, largest first (ties by name), go
one by one to the fold holding the fewest frames so far (ties: the lowest fold index), the
greedy balance of Graham's "longest processing time first". It is stored as a JSON document
(`folds.json`, tracked by DVC) with the sha256 of the manifest it was made from, so training
never runs on folds of other shards.

Fold k trains on every frame outside fold k and is scored on fold k; `summarize` reduces the
K per-fold metrics to the mean and standard deviation of mIoU and of each class's IoU.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pipeline import store
from pipeline.data.shards import MANIFEST, manifest_bytes, read_manifest
from pipeline.errors import ConfigError, DataError


def assign(group_sizes: Mapping[str, int], k: int) -> list[list[str]]:
    """Groups (name -> frames) into `k` folds balanced by frames; the groups of each fold, sorted."""
    if k < 2:
        raise ConfigError(f"data.folds: k-fold needs K >= 2 folds, got {k}")
    if len(group_sizes) < k:
        raise ConfigError(
            f"data.folds: {k} folds need at least {k} groups, there are {len(group_sizes)} "
            f"({', '.join(sorted(group_sizes))})"
        )
    folds: list[list[str]] = [[] for _ in range(k)]
    load = [0] * k
    for name in sorted(group_sizes, key=lambda g: (-group_sizes[g], g)):
        i = min(range(k), key=lambda f: (load[f], f))
        folds[i].append(name)
        load[i] += group_sizes[name]
    return [sorted(f) for f in folds]


def make_folds(shard_dir: Path | str, k: int) -> dict:
    """The folds document of a shard folder: K, the manifest it came from, and per fold its
    groups, sample count and keys. K = 0 (k-fold off) gives a document with no folds."""
    table = read_manifest(shard_dir)
    rows = [r for r in table.select(["key", "group", "error"]).to_pylist() if r["error"] is None]
    doc = {
        "k": k,
        "shards": str(shard_dir),
        "manifest_sha256": _sha256(shard_dir),
        "folds": [],
    }
    if k == 0:
        return doc
    members: dict[str, list[str]] = {}
    for r in rows:
        members.setdefault(r["group"] if r["group"] is not None else r["key"], []).append(r["key"])
    try:
        groups = assign({g: len(keys) for g, keys in members.items()}, k)
    except ConfigError as exc:
        raise ConfigError(f"{store.join(shard_dir, MANIFEST)}: {exc}") from None
    for i, names in enumerate(groups):
        keys = sorted(key for g in names for key in members[g])
        doc["folds"].append({"fold": i, "groups": names, "samples": len(keys), "keys": keys})
    return doc


def load_folds(path: Path | str, shard_dir: Path | str | None = None) -> dict:
    """Read a folds document; with `shard_dir`, check it was made from that folder's manifest."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no folds file (run `seg kfold split` or `dvc repro`)")
    try:
        doc = json.loads(path.read_text())
        folds = doc["folds"]
        if doc["k"] != len(folds) or any(f["fold"] != i for i, f in enumerate(folds)):
            raise ValueError("fold numbers do not run 0..k-1")
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a folds file made by `seg kfold split` ({exc})") from None
    if shard_dir is not None and doc["manifest_sha256"] != _sha256(shard_dir):
        raise DataError(
            f"{path}: made from other shards than {shard_dir} (its manifest changed since); "
            "run `seg kfold split` again"
        )
    return doc


def fold_keys(doc: dict, fold: int) -> tuple[frozenset[str], frozenset[str]]:
    """(training keys, validation keys) of one fold: everything outside it, and it."""
    k = doc["k"]
    if not 0 <= fold < k:
        raise ConfigError(
            f"fold {fold}: the folds file has {k} folds"
            + (f" (0..{k - 1})" if k else "; set data.folds >= 2")
        )
    val = frozenset(doc["folds"][fold]["keys"])
    train = frozenset(key for f in doc["folds"] if f["fold"] != fold for key in f["keys"])
    return train, val


def summarize(per_fold: Sequence[dict]) -> dict:
    """Mean and standard deviation over folds of mIoU, pixel accuracy and each class's IoU.

    `std` is the sample standard deviation (ddof=1: K folds are a sample of the splits one
    could have drawn); None with fewer than two values. A class's IoU is undefined (None) in
    a fold whose validation part neither holds nor predicts it; such folds are left out of
    that class's mean, and `n` says how many folds it is over.
    """
    if not per_fold:
        return {"folds": 0}
    names = list(per_fold[0]["per_class_iou"])
    for i, m in enumerate(per_fold):
        if list(m["per_class_iou"]) != names:
            raise DataError(f"fold {i}: its metrics have other classes than fold 0's")

    def stats(values: list[float | None]) -> dict:
        v = np.asarray([x for x in values if x is not None], dtype=np.float64)
        return {
            "mean": float(v.mean()) if v.size else None,
            "std": float(v.std(ddof=1)) if v.size > 1 else None,
            "n": int(v.size),
        }

    return {
        "folds": len(per_fold),
        "miou": stats([m["miou"] for m in per_fold]),
        "pixel_accuracy": stats([m["pixel_accuracy"] for m in per_fold]),
        "per_class_iou": {n: stats([m["per_class_iou"][n] for m in per_fold]) for n in names},
        "per_fold": {
            f"fold-{i}": {"miou": m["miou"], "images": m.get("num_images")}
            for i, m in enumerate(per_fold)
        },
    }


def _sha256(shard_dir: Path | str) -> str:
    """The sha256 of a shard folder's manifest (DataError naming it when there is none)."""
    return hashlib.sha256(manifest_bytes(shard_dir)).hexdigest()

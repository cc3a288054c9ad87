"""The run history: every evaluation appended to a Parquet table, shown by `seg runs`."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.atomic import atomic_path
from pipeline.errors import DataError


def _row(metrics: dict) -> dict:
    prov = metrics.get("provenance", {})
    ckpt = prov.get("checkpoint", {})
    model = prov.get("model_config") or {}
    return {
        "run": (ckpt.get("sha256") or "")[:8] + "-" + (prov.get("params_hash") or "")[:6],
        "time": prov.get("time"),
        "git_revision": (prov.get("git") or {}).get("revision"),
        "git_dirty": (prov.get("git") or {}).get("dirty"),
        "params_hash": prov.get("params_hash"),
        "data_sha256": (prov.get("data") or {}).get("sha256"),
        "checkpoint_sha256": ckpt.get("sha256"),
        "step": ckpt.get("step"),
        "model": f"{model.get('arch')}/{model.get('backbone')}/os{model.get('output_stride')}",
        # the working point: the figure depends on it (engine/device.py)
        "device": (prov.get("working_point") or {}).get("device"),
        "train_precision": (prov.get("train_working_point") or {}).get("precision"),
        "eval_precision": (prov.get("working_point") or {}).get("precision"),
        "miou": metrics.get("miou"),
        "pixel_accuracy": metrics.get("pixel_accuracy"),
        "per_class_iou": json.dumps(metrics.get("per_class_iou", {})),
    }


def append_run(path: Path | str, metrics: dict, tmp: Path | None = None) -> dict:
    """Append one evaluation; the file is rewritten to a temporary name and renamed (`tmp`:
    the caller's temporary path, renamed with the evaluation's other files)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    row = _row(metrics)
    table = pa.Table.from_pylist([row])
    if path.exists():
        table = pa.concat_tables([pq.read_table(path), table], promote_options="default")
    if tmp is not None:
        pq.write_table(table, tmp)
        return row
    with atomic_path(path) as new:
        pq.write_table(table, new)
    return row


def read_runs(path: Path | str) -> list[dict]:
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no run history yet (run `seg eval` or `dvc repro` first)")
    return pq.read_table(path).to_pylist()


def find_run(runs: list[dict], ref: str) -> dict:
    """A run by index (0, -1 = latest) or by a prefix of its id."""
    try:
        return runs[int(ref)]
    except (ValueError, IndexError):
        pass
    hits = [r for r in runs if r["run"].startswith(ref)]
    if not hits:
        raise DataError(f"no run {ref!r}; runs: {', '.join(r['run'] for r in runs)}")
    return hits[-1]

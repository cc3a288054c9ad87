"""`seg doctor`: the machine, and the working point each command would use on it.

Everything here is read, nothing is run: the device, the precision `amp` resolves to and why
(pipeline.engine.device, the same rule the commands use), compile, channels-last, the loader
workers, the cores, /dev/shm against what the loaders keep in flight, free disk where the
shards and outputs go, and a warning for each known trap.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.params import Params

# DataLoader batches in flight per worker (pipeline.engine.train / pipeline.data.readers)
TRAIN_PREFETCH, EVAL_PREFETCH = 4, 2


def _free_bytes(path: Path | str) -> int | None:
    """Free bytes on the file system that holds `path` (its nearest existing parent); None
    for an object store."""
    from pipeline import store

    if store.is_url(path):
        return None
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _frame_size(shards: Path) -> tuple[int, int] | None:
    """The largest (height, width) in a split's manifest, or None before `seg preprocess`."""
    from pipeline.data.shards import read_manifest

    try:
        rows = read_manifest(shards).select(["height", "width"]).to_pylist()
    except Exception:  # no shards yet, or not readable: the size is simply unknown
        return None
    return (max(r["height"] for r in rows), max(r["width"] for r in rows)) if rows else None


def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**30, 2)


def diagnose(p: Params, gpus: int = 0) -> dict:
    """The report as a dict (what `seg doctor --json` prints). `gpus`: processes per node
    the run would use (`seg train --gpus N`; 0 = one process)."""
    import torch

    from pipeline import store
    from pipeline.engine.device import (
        compile_enabled,
        cpu_info,
        precision,
        resolve_device,
        versions,
    )
    from stages.steps import shard_dir

    warnings: list[str] = []
    cpu = cpu_info()
    gpu_list = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpu_list.append(
                {
                    "index": i,
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gib": _gib(props.total_memory),
                }
            )
    world = max(gpus, 1)
    commands = {}
    for name, section in (("train", p.train), ("eval", p.evaluate)):
        device = resolve_device(section.device)
        prec = precision(section.amp, device, warn=False)
        point = {
            "device": str(device),
            "precision": prec.name,
            "why": prec.why,
            "loader_workers": section.workers,
        }
        if name == "train":
            sync_bn = device.type == "cuda" and world > 1
            point["compile"] = compile_enabled(section.compile, device, sync_bn)
            point["channels_last"] = section.channels_last and device.type == "cuda"
            point["processes"] = world
            if section.compile is True and sync_bn:
                warnings.append(
                    "train.compile: true with SyncBatchNorm across processes: Dynamo breaks the "
                    "graph at every SyncBN layer; `auto` runs eager there"
                )
        if section.amp == "bf16" and prec.name == "bf16" and device.type == "cpu":
            if not cpu["native_bf16"]:
                warnings.append(
                    f"{'evaluate' if name == 'eval' else 'train'}.amp: bf16 on a CPU without "
                    f"native bf16 ({cpu['bf16_why']}): 10-100x slower than fp32; use auto"
                )
        if section.amp == "bf16" and device.type == "cuda" and "emulates" in prec.why:
            warnings.append(f"{name}: amp bf16 on a GPU that emulates it; auto uses fp16")
        commands[name] = point

    # shared memory: every worker keeps `prefetch` batches in /dev/shm
    shm_total = shm_free = None
    if Path("/dev/shm").is_dir():
        usage = shutil.disk_usage("/dev/shm")
        shm_total, shm_free = usage.total, usage.free
    train_shards = shard_dir(p, p.data.train_split)
    val_shards = shard_dir(p, p.data.val_split)
    need = 0
    for shards, workers, batch, prefetch, per_pixel in (
        (train_shards, p.train.workers, p.train.batch_size // world, TRAIN_PREFETCH, 4),
        (val_shards, p.evaluate.workers, p.evaluate.batch_size, EVAL_PREFETCH, 8),
    ):  # bytes per pixel: image 3 + label 1 (+ instance ids 4 in evaluation)
        size = _frame_size(shards)
        if size and workers:
            need = max(need, workers * prefetch * batch * size[0] * size[1] * per_pixel)
    if shm_free is not None and need > shm_free:
        warnings.append(
            f"/dev/shm has {_gib(shm_free)} GiB free, the loaders keep ~{_gib(need)} GiB of "
            "batches in it: workers die with a bus error; enlarge it (docker --shm-size) or "
            "use fewer workers"
        )

    # shards against consumers: fewer shards than ranks x workers share shards
    try:  # a local folder or a bucket's: the shards its manifest lists
        from pipeline.data.readers import shard_urls

        shards_count = len(shard_urls(train_shards))
    except Exception:  # not written yet
        shards_count = None
    consumers = world * max(p.train.workers, 1)
    if shards_count is not None and shards_count < consumers:
        warnings.append(
            f"{store.display(train_shards)}: {shards_count} shard(s) for {consumers} consumers (processes x "
            "train.workers): consumers take turns within shards; more shards "
            "(preprocess.samples_per_shard) let each read its own"
        )
    if p.train.workers + 1 > (os.cpu_count() or 1) and p.train.workers:
        warnings.append(
            f"train.workers {p.train.workers}: with the training process that is more busy "
            f"processes than the {os.cpu_count()} cores"
        )
    disk = {
        store.display(p.data.shards): _gib(_free_bytes(p.data.shards)),
        str(p.data.outputs): _gib(_free_bytes(p.data.outputs)),
    }
    return {
        "machine": {
            "cpu": cpu["model"],
            "cores": cpu["cores"],
            "torch_threads": torch.get_num_threads(),
            "avx2": cpu["avx2"],
            "avx512": cpu["avx512"],
            "cpu_capability": cpu["capability"],
            "native_bf16": cpu["native_bf16"],
            "bf16_why": cpu["bf16_why"],
            "gpus": gpu_list,
            **versions(),
        },
        "commands": commands,
        "shm": {
            "total_gib": _gib(shm_total),
            "free_gib": _gib(shm_free),
            "loaders_need_gib": _gib(need),
        },
        "shards": {
            "train": store.display(train_shards),
            "count": shards_count,
            "consumers": consumers,
        },
        "free_disk_gib": disk,
        "warnings": warnings,
    }

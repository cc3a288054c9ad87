"""`seg doctor`: the machine, and the working point each command would use on it.

Everything here is read, nothing is run: the device, the precision `amp` resolves to and why
(pipeline.engine.device, the same rule the commands use), compile, channels-last, the loader
workers, the cores, /dev/shm against what the loaders keep in flight, free disk where the
shards and outputs go, and a warning for each known trap.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pipeline.params import Params

# DataLoader batches in flight per worker (pipeline.engine.train / pipeline.data.readers)
TRAIN_PREFETCH, EVAL_PREFETCH = 4, 2
# Frames/s one core feeds training with, by the training shards' image format: the loader end
# to end (TrainStream, its xxh3 checks on, decode only: a GPU node augments on the GPU, into
# shared memory for the training process), one DataLoader worker, 1024x2048 mosaics of real
# photos, one core of an AVX2-only EPYC (benchmarks/data_path.py; benchmarks/results/
# 2026-12-06-cpu-data-path.md: 42.6 zstd, 19.7 png, 7.2 png shards of format 1, whose labels
# are PNGs too). npy is not measured: taken as zstd's (its decode is a copy, but 2.4x the
# bytes). Other frame sizes scale by pixels; a faster core feeds more, so this errs on the
# side of warning.
LOADER_FPS_PER_CORE = {"png": 19.7, "npy": 42.6, "zstd": 42.6, "png (format 1)": 7.2}
LOADER_REF_PIXELS = 1024 * 2048
# What one GPU trains on per second where gpu_check has not measured it on this node:
# R-50 DeepLabV3+ OS16, 512x1024 crops, bf16, compiled, on one H100 (~200 img/s)
GPU_IMAGES_PER_S = 200.0
# gpu_check.sh's step figure on this node (its WORK folder), when it has run here
GPU_STEP_JSON = Path(os.environ.get("WORK", "/tmp/gpu_check_work")) / "report" / "step.json"


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


def gpu_step_rate(path: Path = GPU_STEP_JSON) -> tuple[float, str]:
    """(images/s one GPU trains on, where the figure comes from): gpu_check's step figure
    (our configuration's row) where it has run on this node, else GPU_IMAGES_PER_S."""
    try:
        rows = json.loads(path.read_text())["rows"]
        ours = [r["images_per_s"] for r in rows if not str(r["name"]).startswith("plain")]
        if ours:
            return float(max(ours)), f"gpu_check's step, {path}"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return GPU_IMAGES_PER_S, "R-50 V3+ at 512x1024 on an H100, not measured here"


def loader_pace(
    cores: int, processes: int, workers: int, image_format: str, frame: tuple[int, int],
    gpu_images_per_s: float, rate_from: str = "",
) -> dict:  # fmt: skip
    """Will the loader set the pace? The loader workers that get a core of their own (train.
    workers per process, at most the cores the training processes leave) x frames/s per core
    (LOADER_FPS_PER_CORE at this frame size), against what `processes` GPUs consume. The
    dict's `warning` says so in a line, or is None."""
    per_core = LOADER_FPS_PER_CORE.get(image_format, LOADER_FPS_PER_CORE["png"])
    per_core *= LOADER_REF_PIXELS / max(frame[0] * frame[1], 1)
    loader_cores = max(min(workers * processes, cores - processes), 1 if workers else 0)
    supply = loader_cores * per_core if workers else per_core / 2  # 0 workers: in the step
    demand = processes * gpu_images_per_s
    warning = None
    if supply < demand:
        faster = (
            ""
            if image_format != "png"
            else "preprocess.image_format: zstd (decodes ~5x faster than png), "
        )
        warning = (
            f"the loader will set the pace: {loader_cores} loader core(s) x ~{per_core:.0f} "
            f"frames/s per core ({image_format} shards at {frame[0]}x{frame[1]}) = "
            f"~{supply:.0f} frames/s, but {processes} GPU(s) train on ~{demand:.0f} img/s"
            f"{f' ({rate_from})' if rate_from else ''}; use {faster}more train.workers, or a "
            "node with more cores per GPU"
        )  # fmt: skip
    return {
        "image_format": image_format,
        "frame": list(frame),
        "frames_per_s_per_core": round(per_core, 1),
        "loader_cores": loader_cores,
        "supply_frames_per_s": round(supply, 1),
        "demand_images_per_s": round(demand, 1),
        "gpu_rate_from": rate_from,
        "warning": warning,
    }


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
    # on a GPU node: can the cores decode what the GPUs consume?
    pace = None
    if gpu_list:
        try:
            from pipeline.data.shards import manifest_info

            info = manifest_info(train_shards)
            image_format = info["image_format"]
            if info["format_version"] == "1" and image_format == "png":
                image_format = "png (format 1)"
        except Exception:  # not written yet: what preprocess would write
            image_format = p.preprocess.image_format
        rate, rate_from = gpu_step_rate()
        frame = _frame_size(train_shards) or (1024, 2048)
        pace = loader_pace(os.cpu_count() or 1, world, p.train.workers, image_format, frame,
                           rate, rate_from)  # fmt: skip
        if pace["warning"]:
            warnings.append(pace["warning"])
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
        "loader_pace": pace,
        "warnings": warnings,
    }

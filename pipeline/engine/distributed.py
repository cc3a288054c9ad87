"""torch.distributed set-up for torchrun workers, and distributed evaluation of a checkpoint.

torchrun starts one process per GPU (or per CPU slot) and tells each who it is through the
environment: RANK (global), WORLD_SIZE, LOCAL_RANK (on this node), MASTER_ADDR/MASTER_PORT.
`init_from_env()` turns that into a process group: NCCL with one GPU per process on CUDA,
gloo on CPU. Outside torchrun (no WORLD_SIZE, or 1) it does nothing, so the same code runs
in one process. The train loop and `evaluate` then read rank and world size from
torch.distributed; nothing here knows about params files or the CLI.

`seg train --gpus N` and `seg eval --gpus N` start the workers (stages/launch.py); N = 1 is a
one-process group, the multi-GPU code path (NCCL, DDP, SyncBatchNorm) on one GPU.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

# The env vars torchrun sets in every worker.
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: a single process, no process group
    device: torch.device | None = None  # None: whatever the caller resolves


def in_worker() -> bool:
    """True inside a torchrun worker (torchrun sets RANK, also for one process)."""
    return "RANK" in os.environ


def init_from_env(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes; a no-op outside torchrun.

    `device` is the training device setting (auto | cpu | cuda): CUDA gets NCCL and
    `torch.cuda.set_device(LOCAL_RANK)` (one GPU per process, so DDP, SyncBatchNorm and
    `torch.cuda.current_device()` agree); CPU gets gloo.
    """
    if not in_worker():
        return DistInfo()
    rank, world = int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", "1") or 1)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device cuda: no CUDA device here; use -S train.device=cpu (gloo)")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: start with torchrun")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) on this "
                "node: start at most that many processes per node (--gpus)"
            )
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend, init_method="env://", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )  # fmt: skip
        log.info("rank %d/%d (local %d): %s process group on %s", rank, world, local_rank,
                 backend, dev)  # fmt: skip
    return DistInfo(rank, world, local_rank, backend, dev)


def cleanup() -> None:
    """Leave the process group (safe to call when none was made)."""
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """A process group is set up (torchrun, also with one process)."""
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, (0, 1) without one."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every process (pickled); `obj` itself without a process group."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every process's `obj`, in rank order ([obj] without a process group)."""
    if not is_distributed():
        return [obj]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, obj)
    return everyone


def local_device(name: str = "auto") -> torch.device:
    """This process's device for `name` (auto | cpu | cuda): under torchrun on CUDA, the GPU
    init_from_env made current (LOCAL_RANK); else pipeline.engine.device.resolve_device."""
    from pipeline.engine.device import resolve_device

    device = resolve_device(name)
    if device.type == "cuda" and is_distributed():
        device = torch.device("cuda", torch.cuda.current_device())
    return device

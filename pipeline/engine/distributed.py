"""torch.distributed set-up for torchrun workers, and distributed evaluation of a checkpoint.

torchrun starts one process per GPU (or per CPU slot) and tells each who it is through the
environment: RANK (global), WORLD_SIZE, LOCAL_RANK (on this node), MASTER_ADDR/MASTER_PORT.
`init_from_env()` turns that into a process group: NCCL with one GPU per process on CUDA,
gloo on CPU. Outside torchrun (no WORLD_SIZE, or 1) it does nothing, so the same code runs
in one process. The train loop and `evaluate` then read rank and world size from
torch.distributed; nothing here knows about params files or the CLI.

    python -m torch.distributed.run --nproc-per-node 2 -m pipeline.engine.distributed \
        eval --checkpoint outputs/train/best.pt --shards data/shards/val --out outputs/eval
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path

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


def env_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) outside it."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def in_worker() -> bool:
    """True inside a multi-process torchrun worker (RANK set and WORLD_SIZE > 1)."""
    return "RANK" in os.environ and env_info()[1] > 1


def init_from_env(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes; a no-op when WORLD_SIZE is unset or 1.

    `device` is the training device setting (auto | cpu | cuda): CUDA gets NCCL and
    `torch.cuda.set_device(LOCAL_RANK)` (one GPU per process, so DDP, SyncBatchNorm and
    `torch.cuda.current_device()` agree); CPU gets gloo.
    """
    rank, world, local_rank = env_info()
    if world <= 1:
        return DistInfo()
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
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_world() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0, or a single process: the one that writes files and prints."""
    return rank_world()[0] == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- evaluation


def evaluate_checkpoint(
    checkpoint: Path | str,
    shards: Path | str,
    dataset: str = "cityscapes",
    device: str = "auto",
    batch_size: int = 1,
    output_stride: int | None = None,
    opts=None,
) -> tuple[dict, object]:
    """Score a checkpoint on shards, each rank a disjoint slice, confusion matrices summed
    across ranks (every rank returns the same result). Call `init_from_env` first."""
    from pipeline.data.labels import get_spec
    from pipeline.engine.checkpoint import build_from_checkpoint
    from pipeline.engine.evaluate import InferenceOptions, evaluate, resolve_device

    rank, world = rank_world()
    dev = resolve_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", torch.cuda.current_device())
    model, _ = build_from_checkpoint(checkpoint, dev, output_stride=output_stride)
    return evaluate(
        model, shards, get_spec(dataset), dev, opts or InferenceOptions(), batch_size=batch_size,
        rank=rank, world_size=world,
    )  # fmt: skip


def _main(argv: list[str] | None = None) -> int:
    """`eval` entry point for torchrun workers: rank 0 writes metrics.json and confusion.json."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m pipeline.engine.distributed")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("eval", help="evaluate a checkpoint on shards, one slice per rank")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--shards", required=True)
    ev.add_argument("--out", required=True, help="folder for metrics.json, confusion.json")
    ev.add_argument("--dataset", default="cityscapes")
    ev.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ev.add_argument("--batch-size", type=int, default=1)
    ev.add_argument("--output-stride", type=int, default=None)
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    info = init_from_env(args.device)
    try:
        metrics, acc = evaluate_checkpoint(
            args.checkpoint, args.shards, args.dataset, args.device, args.batch_size,
            args.output_stride,
        )  # fmt: skip
        if info.rank == 0:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            metrics["world_size"] = info.world_size
            for name, data in (
                ("metrics.json", metrics),
                ("confusion.json", {"matrix": acc.confusion.cpu().tolist()}),
            ):
                tmp = out / f".{name}.tmp"
                tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
                os.replace(tmp, out / name)
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())

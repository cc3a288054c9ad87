"""SyncBatchNorm across 2 processes on one GPU: eager vs torch.compile (not a test).

    python benchmarks/syncbn_check.py --json syncbn.json                 # CUDA
    python benchmarks/syncbn_check.py --device cpu --backbone mobilenet_v3_large --crop 64 64

Two processes join a gloo group (NCCL refuses two ranks on one GPU), each on the same device,
and run the training loop's step (pipeline.engine.train.build_forward_loss: DDP, the forward
and the loss) on a DeepLabV3+ whose BatchNorm layers are SyncBatchNorm. It measures what the
loop's `compile: auto` decides on (eager wherever SyncBN spans processes):

- host syncs in one eager step (torch.cuda.set_sync_debug_mode: SyncBN's forward filters
  the per-rank counts with a boolean mask, a wait for the GPU in each BN layer);
- the graphs Dynamo makes of the step and its graph breaks (SyncBN breaks at every layer);
- steps/s eager and compiled (after one compile; `--backend eager` runs Dynamo alone).

On CPU (--device cpu, the rehearsal) SyncBN does not run (it needs CUDA): the layers stay
BatchNorm and only the plumbing is exercised.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, args, port: int) -> None:
    from pipeline.engine.losses import SegLoss
    from pipeline.engine.train import ForwardLoss, build_forward_loss
    from pipeline.models import build_model

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = build_model(arch="deeplabv3plus", backbone=args.backbone, num_classes=19)
    sync_bn = device.type == "cuda"
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device).train()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    loss_fn = SegLoss(19).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    h, w = args.crop
    x = torch.randn(args.batch, 3, h, w, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 19, (args.batch, h, w), device=device)
    amp = torch.bfloat16 if device.type == "cuda" else None

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(fl) -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = fl(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(fl, n: int) -> float:
        sync()
        t = time.perf_counter()
        for _ in range(n):
            step(fl)
        sync()
        return n / (time.perf_counter() - t)

    row: dict = {"device": str(device), "sync_bn": sync_bn, "world_size": 2}
    eager = build_forward_loss(model, loss_fn, 0.4, device, compiled=False)
    step(eager)
    syncs = None
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(eager)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = sum("synchroniz" in str(c.message) for c in caught)
    row["host_syncs_per_eager_step"] = syncs
    row["eager_steps_per_s"] = timed(eager, args.steps)

    from torch._dynamo.utils import counters

    counters.clear()
    compiled = ForwardLoss(eager.net, torch.compile(eager.fn, backend=args.backend))
    t = time.perf_counter()
    step(compiled)
    sync()
    row["compile_s"] = time.perf_counter() - t
    row["graph_breaks"] = sum(counters["graph_break"].values())
    row["graph_break_reasons"] = sorted({r.splitlines()[0] for r in counters["graph_break"]})[:5]
    row["unique_graphs"] = counters["stats"].get("unique_graphs")
    row["compiled_steps_per_s"] = timed(compiled, args.steps)
    row["compiled_speedup"] = row["compiled_steps_per_s"] / row["eager_steps_per_s"]
    if rank == 0:
        print(json.dumps(row, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(row, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--crop", type=int, nargs=2, default=(512, 1024))
    ap.add_argument("--batch", type=int, default=4, help="images per process")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--backend", default="inductor", help="torch.compile's (eager: Dynamo only)")
    ap.add_argument("--json")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(args, _free_port()), nprocs=2, join=True)


if __name__ == "__main__":
    main()

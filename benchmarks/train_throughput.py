"""Training-step throughput of DeepLabV3(+): a plain fp32 eager loop vs the train loop's own
step (not a test).

    # GPU, the default model (DeepLabV3+ ResNet-50 OS16, 512x1024 crops, batch 8)
    .venv/bin/python benchmarks/train_throughput.py
    # CPU, small
    .venv/bin/python benchmarks/train_throughput.py --device cpu --backbone mobilenet_v3_large \\
        --crop 128 128 --batch 4 --steps 3 --warmup 1
    # data loader: the real shard stream vs a batch already on the device
    .venv/bin/python benchmarks/train_throughput.py --mode loader --shards data/shards/train --workers 4

Step mode times, on one model and one batch, (a) a plain fp32 eager loop (model, SegLoss,
torch.optim.SGD, NCHW) and (b) the train loop's step, built by pipeline.engine.train's own
functions: autocast (bf16 where the GPU has it, fp16 + GradScaler on older GPUs; on CPU
with native bf16, else fp32), channels_last, the forward and the loss compiled together
(torch.compile; --no-compile to turn it off), a fused SGD. Steps run back to back and the
device is waited for once at the end, as in the loop (which reads the loss every
`log_every` steps). It prints images/s, the speedup, FLOP utilisation = 3 x forward FLOPs
per image (torch.utils.flop_counter, a multiply-add = 2 FLOPs; backward ~ 2 x forward) x
images/s / peak (--peak-tflops; 989 = H100 SXM bf16 dense by default on CUDA), and the peak
memory twice: over the timed steps, and including the warm-up (where cuDNN's autotuner
tries its algorithms with their workspaces: --cudnn-benchmark off shows what that costs).

Loader mode times our step fed by pipeline.data.readers.TrainStream (DataLoader workers
decode; scale, crop, flip and colour run batched on the device) against the same step on a
batch already on the device, and the loader alone (decode + copy): if the loader's images/s
is below the step's, training is input-bound and wants more --workers (or zstd shards).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch

from pipeline.data.transforms import BatchAugment, step_generator
from pipeline.engine.device import autocast, precision
from pipeline.engine.losses import SegLoss
from pipeline.engine.train import build_forward_loss, build_optimizer, prepare_batch
from pipeline.errors import ConfigError
from pipeline.models import ARCHS, BACKBONES, build_model
from pipeline.models.complexity import count_macs
from pipeline.params import TrainParams

H100_BF16_DENSE_TFLOPS = 989.0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Step:
    """One training step (forward, loss, backward, optimizer) of one configuration."""

    def __init__(self, model, num_classes: int, device: torch.device, ours: bool, args) -> None:
        self.device = device
        self.model = model.to(device).train()
        loss_fn = SegLoss(num_classes).to(device)
        if not ours:  # plain: fp32, NCHW, eager, torch.optim.SGD's default (foreach) kernel
            self.amp, self.scaler, self.channels_last, self.cudagraphs = None, None, False, False
            self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

            def forward_loss(x, y):
                return loss_fn(self.model(x)["out"], y)

            self.forward_loss = forward_loss
            return
        try:
            prec = precision(args.amp, device)
            self.amp, use_scaler = prec.dtype, prec.scaler
        except ConfigError as exc:
            raise SystemExit(str(exc)) from None
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.channels_last = not args.no_channels_last and device.type == "cuda"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        p = TrainParams(lr=0.01)
        self.opt = build_optimizer(p, list(self.model.parameters()), device)
        self.forward_loss = build_forward_loss(
            self.model, loss_fn, p.aux_weight, device, args.compile, args.compile_mode
        )
        self.cudagraphs = args.compile and args.compile_mode == "reduce-overhead"

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the graphs' outputs may be reused
        with autocast(self.device, self.amp):
            loss = self.forward_loss(x, y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def time_steps(step: Step, batches, warmup: int, steps: int) -> tuple[float, dict]:
    """Seconds per step over `steps` steps run back to back after `warmup` steps
    (compilation and autotuning happen there), and the peak memory (GiB) with and without
    the warm-up. `batches` yields (x, y) on the device; fetching counts as part of the step."""
    dev = step.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(warmup):
        step(*next(batches))
    sync(dev)
    mem = {}
    if dev.type == "cuda":
        mem["with_warmup"] = torch.cuda.max_memory_allocated(dev) / 2**30
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step(*next(batches))
    float(loss)  # waits for the last step
    seconds = (time.perf_counter() - t0) / steps
    if dev.type == "cuda":
        mem["steady"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return seconds, mem


def repeat(x: torch.Tensor, y: torch.Tensor):
    while True:
        yield x, y


def forward_flops(model: torch.nn.Module, crop: tuple[int, int]) -> int:
    """FLOPs of one forward pass of one image (on the meta device: no arithmetic)."""
    meta = copy.deepcopy(model).to("meta")
    return 2 * count_macs(meta, crop)


def report(name: str, sec: float, batch: int, flops: int, peak: float | None, mem: dict) -> dict:
    ips = batch / sec
    achieved = 3 * flops * ips / 1e12
    util = 100 * achieved / peak if peak else None
    memory = (
        f"  peak {mem['steady']:.1f} GiB ({mem['with_warmup']:.1f} with warm-up)" if mem else ""
    )
    print(
        f"  {name:<48} {ips:8.2f} img/s  {1000 * sec:8.1f} ms/step  {achieved:8.2f} TFLOP/s  "
        + (f"MFU {util:5.1f} %" if util is not None else "MFU n/a")
        + memory
    )
    return {"name": name, "images_per_s": ips, "tflops": achieved, "mfu_pct": util, **mem}


def bench_step(args, device: torch.device, model: torch.nn.Module, flops: int) -> list[dict]:
    h, w = args.crop
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, h, w, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch, h, w), generator=g).to(device)
    rows = []
    for is_ours in [c == "ours" for c in args.configs.split(",")]:
        step = Step(copy.deepcopy(model), args.num_classes, device, is_ours, args)
        name = "plain fp32 eager"
        if is_ours:
            name = (
                f"ours: {str(step.amp).replace('torch.', '') if step.amp else 'fp32'}"
                + (" + channels_last" if step.channels_last else "")
                + (
                    f" + compile{f' ({args.compile_mode})' if args.compile_mode else ''}"
                    if args.compile
                    else ""
                )
                + (" + fused SGD" if device.type == "cuda" else "")
            )
        sec, mem = time_steps(step, repeat(x, y), args.warmup, args.steps)
        rows.append(report(name, sec, args.batch, flops, args.peak_tflops, mem))
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if len(rows) == 2:
        print(
            f"\n  speedup (ours / plain): {rows[1]['images_per_s'] / rows[0]['images_per_s']:.2f}x"
        )
    return rows


def bench_loader(args, device: torch.device, model: torch.nn.Module, flops: int) -> list[dict]:
    from pipeline.data.labels import get_spec
    from pipeline.data.readers import TrainStream, collate_train
    from pipeline.data.shards import manifest_info

    if not args.shards:
        raise SystemExit("--mode loader needs --shards DIR (a training shard folder)")
    spec = get_spec(manifest_info(args.shards)["dataset"])
    step = Step(copy.deepcopy(model), spec.num_classes, device, True, args)
    loader = torch.utils.data.DataLoader(
        TrainStream(args.shards, seed=0), batch_size=args.batch, num_workers=args.workers,
        collate_fn=collate_train, pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0, prefetch_factor=4 if args.workers else None,
    )  # fmt: skip
    augment = BatchAugment(tuple(args.crop), (0.5, 2.0), True, spec.ignore_index)
    batches = iter(loader)
    counter = iter(range(10**9))

    def fed():  # the loop's path: decoded batch -> device -> augment, distort, normalise
        while True:
            g = step_generator(0, next(counter))
            yield prepare_batch(next(batches), augment, g, True, device, False)

    stream = fed()
    x, y = next(stream)
    resident, mem = time_steps(step, repeat(x, y), args.warmup, args.steps)
    streamed, _ = time_steps(step, stream, args.warmup, args.steps)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        batch = next(batches)
        batch["image"].to(device, non_blocking=True)
    sync(device)
    alone = (time.perf_counter() - t0) / args.steps
    print(f"  shards {args.shards} ({spec.name}), {args.workers} DataLoader worker(s)")
    rows = [
        report("step, batch already on the device", resident, args.batch, flops,
               args.peak_tflops, mem),
        report("step, fed by the shard loader", streamed, args.batch, flops, args.peak_tflops, {}),
    ]  # fmt: skip
    print(f"  {'loader alone (decode + copy)':<48} {args.batch / alone:8.2f} img/s")
    overhead = 100 * (streamed / resident - 1)
    print(f"\n  input-bound overhead: {overhead:+.1f} % step time")
    rows.append({"name": "loader alone", "images_per_s": args.batch / alone})
    rows.append({"name": "overhead_pct", "value": overhead})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mode", choices=("step", "loader", "both"), default="step")
    ap.add_argument("--configs", default="plain,ours", help="step mode: plain, ours or both")
    ap.add_argument("--arch", choices=ARCHS, default="deeplabv3plus")
    ap.add_argument("--backbone", choices=BACKBONES, default="resnet50")
    ap.add_argument("--output-stride", type=int, default=16)
    ap.add_argument("--num-classes", type=int, default=19)
    ap.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), default=(512, 1024))
    ap.add_argument("--batch", type=int, default=8, help="images per step (one device)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    ap.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                    help="ours: auto = bf16 / fp16+scaler on CUDA, off on CPU")  # fmt: skip
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="ours without torch.compile")  # fmt: skip
    ap.add_argument("--compile-mode", choices=("reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                    default=None, help="torch.compile mode (reduce-overhead = CUDA graphs)")  # fmt: skip
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--cudnn-benchmark", choices=("on", "off"), default="on",
                    help="cuDNN autotuning (the train loop turns it on)")  # fmt: skip
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak dense TFLOP/s for the utilisation (default 989 on CUDA)")  # fmt: skip
    ap.add_argument("--shards", help="loader mode: a training shard folder")
    ap.add_argument("--workers", type=int, default=4, help="loader mode: DataLoader workers")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"
        if args.peak_tflops is None:
            args.peak_tflops = H100_BF16_DENSE_TFLOPS
    h, w = args.crop
    model = build_model(
        args.arch, args.backbone, num_classes=args.num_classes, output_stride=args.output_stride
    )
    flops = forward_flops(model, (h, w))
    print(f"# measured on: {device_name(device)}")
    print(
        f"# torch {torch.__version__}; {args.arch} {args.backbone} OS{args.output_stride}, "
        f"{args.num_classes} classes, crop {h}x{w}, batch {args.batch}, "
        f"{args.warmup} warm-up + {args.steps} timed steps, cudnn.benchmark {args.cudnn_benchmark}"
    )
    print(f"# forward {flops / 1e9:.2f} GFLOP/image; a training step counted as 3x forward")
    rows = []
    if args.mode in ("step", "both"):
        print("\nstep (same model, same batch):")
        rows += bench_step(args, device, model, flops)
    if args.mode in ("loader", "both"):
        print("\nloader (our step):")
        rows += bench_loader(args, device, model, flops)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device_name(device), "rows": rows}, f)


if __name__ == "__main__":
    main()

"""Training-step throughput of DeepLabV3(+): plain fp32 eager vs our step (not a test).

    # GPU, the default model (DeepLabV3+ ResNet-50 OS16, 512x1024 crops, batch 8)
    .venv/bin/python benchmarks/train_throughput.py
    # CPU, small
    .venv/bin/python benchmarks/train_throughput.py --device cpu --backbone mobilenet_v3_large \
        --crop 128 128 --batch 4 --steps 3 --warmup 1
    # data loader: the real shard stream vs a batch already on the device
    .venv/bin/python benchmarks/train_throughput.py --mode loader --shards data/shards/train --workers 4

Step mode times, on one model and one batch, (a) a plain fp32 eager loop and (b) the train
loop's step: autocast (bf16 where the GPU has it, fp16 + GradScaler on older GPUs; bf16 on
CPU only with --amp bf16) + channels_last + torch.compile (--no-compile to turn it off).
Each step is forward, SegLoss (CE, ignore 255), backward, SGD. It prints images/s, the
speedup, and FLOP utilisation = 3 x forward FLOPs per image (torch.utils.flop_counter, a
multiply-add = 2 FLOPs; backward ~ 2 x forward) x images/s / peak (--peak-tflops; 989 = H100
SXM bf16 dense by default on CUDA, none on CPU).

Loader mode times our step fed by pipeline.data.shards.TrainStream (decode + augment in
DataLoader workers, photometric distortion on the device) against the same step on a batch
already on the device, and the loader alone: if the loader's images/s is below the step's,
training is input-bound and wants more --workers (or npy shards).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from contextlib import nullcontext

import torch

from pipeline.engine.losses import SegLoss
from pipeline.engine.train import amp_setting as _amp_setting
from pipeline.errors import ConfigError
from pipeline.models import ARCHS, BACKBONES, build_model
from pipeline.models.complexity import count_macs

H100_BF16_DENSE_TFLOPS = 989.0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def amp_setting(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a GradScaler): the train loop's own rule for `train.amp`."""
    try:
        return _amp_setting(mode, device)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None


class Step:
    """One training step (forward, loss, backward, SGD) of one configuration."""

    def __init__(
        self,
        model: torch.nn.Module,
        num_classes: int,
        device: torch.device,
        amp: torch.dtype | None,
        scaler: bool,
        channels_last: bool,
        compile_: bool,
    ) -> None:
        self.device, self.amp, self.channels_last = device, amp, channels_last
        self.model = model.to(device).train()
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.fwd = torch.compile(self.model) if compile_ else self.model
        self.loss_fn = SegLoss(num_classes).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.scaler = torch.amp.GradScaler(device.type, enabled=scaler)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext()
        with ctx:
            out = self.fwd(x)
            loss = self.loss_fn(out["out"], y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def time_steps(step: Step, batches, warmup: int, steps: int) -> float:
    """Median seconds per step after `warmup` steps (compilation and autotuning happen
    there). The median, not the mean: a shared machine's hiccups do not move it. `batches`
    yields (x, y) on the device; fetching a batch counts as part of its step."""
    for _ in range(warmup):
        x, y = next(batches)
        step(x, y)
    sync(step.device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        x, y = next(batches)
        float(step(x, y))  # waits for the step to finish
        sync(step.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def repeat(x: torch.Tensor, y: torch.Tensor):
    while True:
        yield x, y


def forward_flops(model: torch.nn.Module, crop: tuple[int, int]) -> int:
    """FLOPs of one forward pass of one image (on the meta device: no arithmetic)."""
    meta = copy.deepcopy(model).to("meta")
    return 2 * count_macs(meta, crop)


def report(name: str, sec: float, batch: int, flops: int, peak: float | None) -> float:
    ips = batch / sec
    achieved = 3 * flops * ips / 1e12
    util = f"{100 * achieved / peak:5.1f} % of {peak:g}" if peak else "n/a (no --peak-tflops)"
    print(
        f"  {name:<44} {ips:8.2f} img/s  {1000 * sec:9.1f} ms/step  "
        f"{achieved:8.3f} TFLOP/s  utilisation {util}"
    )
    return ips


def peak_memory(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    gib = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return f"  (peak memory {gib:.1f} GiB)"


def bench_step(args, device: torch.device, model: torch.nn.Module, flops: int) -> None:
    amp, scaler = amp_setting(args.amp, device)
    h, w = args.crop
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, h, w, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch, h, w), generator=g).to(device)
    ours_name = (
        f"ours: amp {str(amp).replace('torch.', '') if amp else 'off'}"
        + (" + scaler" if scaler else "")
        + (" + channels_last" if not args.no_channels_last else "")
        + (" + compile" if args.compile else "")
    )
    configs = [
        ("plain fp32 eager", dict(amp=None, scaler=False, channels_last=False, compile_=False)),
        (ours_name, dict(amp=amp, scaler=scaler, channels_last=not args.no_channels_last,
                         compile_=args.compile)),
    ]  # fmt: skip
    results = []
    for name, cfg in configs:
        step = Step(copy.deepcopy(model), args.num_classes, device, **cfg)
        try:
            sec = time_steps(step, repeat(x, y), args.warmup, args.steps)
        except Exception as exc:  # torch.compile without a working toolchain
            if not cfg["compile_"]:
                raise
            print(f"  ({name}: torch.compile failed: {type(exc).__name__}: {exc}; eager instead)")
            name = name.replace(" + compile", " (compile failed: eager)")
            step = Step(copy.deepcopy(model), args.num_classes, device, **dict(cfg, compile_=False))
            sec = time_steps(step, repeat(x, y), args.warmup, args.steps)
        results.append(report(name, sec, args.batch, flops, args.peak_tflops))
        print(peak_memory(device), end="")
        del step
    print(f"\n  speedup (ours / plain): {results[1] / results[0]:.2f}x")


def bench_loader(args, device: torch.device, model: torch.nn.Module, flops: int) -> None:
    from pipeline.data.labels import get_spec
    from pipeline.data.shards import TrainStream, manifest_info
    from pipeline.data.transforms import TrainAugment, normalize, photometric_distortion
    from pipeline.engine.train import _collate

    if not args.shards:
        raise SystemExit("--mode loader needs --shards DIR (a training shard folder)")
    spec = get_spec(manifest_info(args.shards)["dataset"])
    amp, scaler = amp_setting(args.amp, device)
    step = Step(
        copy.deepcopy(model), args.num_classes, device, amp, scaler,
        not args.no_channels_last, args.compile,
    )  # fmt: skip
    stream = TrainStream(
        args.shards, seed=0, transform=TrainAugment(tuple(args.crop), (0.5, 2.0), True, 255)
    )
    loader = torch.utils.data.DataLoader(
        stream, batch_size=args.batch, num_workers=args.workers, collate_fn=_collate,
        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)

    def from_loader():
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True).float()  # (B, 3, h, w)
            labels = batch["label"].to(device, non_blocking=True)  # (B, h, w)
            yield normalize(photometric_distortion(images, g)), labels

    stream_iter = from_loader()
    x, y = next(stream_iter)
    resident = time_steps(step, repeat(x, y), args.warmup, args.steps)
    streamed = time_steps(step, stream_iter, args.warmup, args.steps)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        next(stream_iter)
        sync(device)
        times.append(time.perf_counter() - t0)
    alone = statistics.median(times)
    print(f"  shards {args.shards} ({spec.name}), {args.workers} DataLoader worker(s)")
    report("step, batch already on device", resident, args.batch, flops, args.peak_tflops)
    report("step, fed by the shard loader", streamed, args.batch, flops, args.peak_tflops)
    print(f"  {'loader alone (decode+augment+copy)':<44} {args.batch / alone:8.2f} img/s")
    print(f"\n  input-bound overhead: {100 * (streamed / resident - 1):+.1f} % step time")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mode", choices=("step", "loader", "both"), default="step")
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
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak dense TFLOP/s for the utilisation (default 989 on CUDA)")  # fmt: skip
    ap.add_argument("--shards", help="loader mode: a training shard folder")
    ap.add_argument("--workers", type=int, default=4, help="loader mode: DataLoader workers")
    args = ap.parse_args()

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
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
        f"{args.warmup} warm-up + {args.steps} timed steps"
    )
    print(f"# forward {flops / 1e9:.2f} GFLOP/image; a training step counted as 3x forward")
    if device.type == "cuda":
        print(
            f"# plain fp32 uses TF32 for convs: cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}"
        )
    if args.mode in ("step", "both"):
        print("\nstep (same model, same batch):")
        bench_step(args, device, model, flops)
    if args.mode in ("loader", "both"):
        print("\nloader (our step):")
        bench_loader(args, device, model, flops)


if __name__ == "__main__":
    main()

"""Parameters, multiply-adds and CPU forward time of every DeepLab model (not a test).

    .venv/bin/python benchmarks/models_table.py                # all models, ~5 min on 2 cores
    .venv/bin/python benchmarks/models_table.py --repeats 1 --backbone mobilenet_v3_large

Multiply-adds come from torch's FLOP counter on the meta device (as `seg models`), at 513x513
(the DeepLabV3+ paper's Tables 3 and 5, shown alongside) and 1024x2048 (a Cityscapes frame),
output stride 16 and 8. Forward time: eval mode, batch 1, 512x1024, inference_mode, random weights, best of --repeats.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from pipeline.models import ARCHS, BACKBONES, build_model
from pipeline.models.complexity import measure

SIZES = ((513, 513), (1024, 2048))
STRIDES = (16, 8)


def forward_seconds(
    model: torch.nn.Module, size: tuple[int, int], warmup: int, repeats: int
) -> float:
    x = torch.randn(1, 3, *size)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return min(times)  # best of `repeats`: the cores are shared, so the minimum is the least noisy


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", action="append", choices=ARCHS)
    parser.add_argument("--backbone", action="append", choices=BACKBONES)
    parser.add_argument("--num-classes", type=int, default=19)
    parser.add_argument("--time-size", default="512x1024", help="HxW of the timed forward pass")
    parser.add_argument("--time-output-stride", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-time", action="store_true", help="only params and multiply-adds")
    args = parser.parse_args()
    archs = args.arch or list(ARCHS)
    backbones = args.backbone or list(BACKBONES)
    th, tw = (int(s) for s in args.time_size.split("x"))

    print(
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, {args.num_classes} classes"
    )
    print(
        "# MACs in G multiply-adds (batch 1); paper = DeepLabV3+ paper Tables 3/5 (513x513, 21 classes)"
    )
    cols = [f"{h}x{w} OS{s}" for h, w in SIZES for s in STRIDES]
    timed = f"CPU s {th}x{tw} OS{args.time_output_stride}"
    header = ["arch", "backbone", "params M", *cols, "paper OS16", "paper OS8"]
    if not args.no_time:
        header.append(timed)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for backbone in backbones:
        for arch in archs:
            row = [arch, backbone]
            paper = {}
            macs = []
            params = 0
            for size in SIZES:
                for os_ in STRIDES:
                    c = measure(
                        arch,
                        backbone,
                        input_size=size,
                        output_stride=os_,
                        num_classes=args.num_classes,
                    )
                    params = c.params
                    macs.append(f"{c.macs / 1e9:.2f}")
                    if c.paper_macs:
                        paper[os_] = f"{c.paper_macs / 1e9:.2f}"
            row += [f"{params / 1e6:.2f}", *macs, paper.get(16, "-"), paper.get(8, "-")]
            if not args.no_time:
                model = build_model(
                    arch,
                    backbone,
                    num_classes=args.num_classes,
                    output_stride=args.time_output_stride,
                ).eval()
                row.append(f"{forward_seconds(model, (th, tw), args.warmup, args.repeats):.2f}")
                del model
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()

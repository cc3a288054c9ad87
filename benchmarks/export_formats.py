"""Export a checkpoint to every format; agreement with PyTorch and CPU time (not a test).

    .venv/bin/python benchmarks/export_formats.py CHECKPOINT [--size 1024x2048] [--repeats 3]

For each format: `export_checkpoint` with the real Cityscapes frame (shared/data/
cityscapes_sample, 128x256, bilinearly upscaled to --size) as the check image, so the max
|logit diff| and argmax agreement are those of the exported file at that size; export time
(writing, without the check); then the forward time of eager PyTorch and of each exported
model on that frame, batch 1, best of --repeats after one warm-up, the models taking turns
(the cores are shared: the minimum is the least noisy). Exported files go to a temporary folder.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from pipeline.data.transforms import normalize, resize_image
from pipeline.engine.checkpoint import build_from_checkpoint
from pipeline.engine.export import FORMATS, SUFFIXES, export_checkpoint, load_exported, read_image

FRAME = (
    Path(__file__).resolve().parents[2]
    / "shared/data/cityscapes_sample/leftImg8bit/val/frankfurt"
    / "frankfurt_000000_000294_leftImg8bit.png"
)


def best_seconds(models: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Best forward time of each model, taking turns (round-robin): on shared cores a burst
    of load then hits every model alike rather than one."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for i in range(1 + repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)["out"]
                if i:
                    times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--image", type=Path, default=FRAME)
    parser.add_argument("--size", default="1024x2048", help="HxW the frame is resized to")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--format", action="append", choices=FORMATS)
    args = parser.parse_args()
    size = tuple(int(s) for s in args.size.split("x"))
    image = resize_image(read_image(args.image)[0], size)[None]
    x = normalize(image)
    model, ckpt = build_from_checkpoint(args.checkpoint)
    cfg = ckpt["model_config"]
    print(
        f"# {args.checkpoint}: {cfg['arch']} {cfg['backbone']} OS{model.output_stride}, "
        f"{cfg['num_classes']} classes; {args.image.name} at {size[0]}x{size[1]}"
    )
    print(f"# torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads")
    models, rows = {"eager PyTorch": model}, {"eager PyTorch": "| - | - | - | - |"}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.format or FORMATS:
            out = Path(tmp) / f"model{SUFFIXES[fmt]}"
            report = export_checkpoint(
                args.checkpoint, fmt, out, check_image=args.image, check_size=size
            )
            c = report.checks["image"]
            rows[fmt] = (
                f"| {report.export_seconds:.1f} | {c['max_abs_diff']:.2e} | "
                f"{c['max_abs_logit']:.3f} | {100 * c['argmax_agreement']:.4f} % |"
            )
            models[fmt] = load_exported(out)
        seconds = best_seconds(models, x, args.repeats)
    print(
        "| format | export s | max abs logit diff | max abs logit | argmax agreement | forward s |"
    )
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} {row} {seconds[name]:.3f} |")


if __name__ == "__main__":
    main()

"""Full-resolution evaluation throughput: the plain path vs ours (not a test).

    python benchmarks/eval_throughput.py --checkpoint outputs/train/best.pt --shards data/shards/val
    python benchmarks/eval_throughput.py ... --batch 8 --workers 14      # a GPU node

Plain: frames read and decoded in the evaluating process, one at a time, fp32 (what
`seg eval` did before). Ours: `pipeline.engine.evaluate.evaluate` as `seg eval` runs it:
DataLoader workers read, verify (sha256 against the manifest) and decode; batches of
full-resolution frames under autocast (bf16 on GPUs that have it); the confusion matrix on
the device. Both score the same frames; the script checks they agree (mIoU within 0.1 point)
and prints images/s, the speedup, and the peak GPU memory. `--no-verify-cost` skips the
extra run that measures what the sha256 check costs.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pipeline.data.labels import get_spec
from pipeline.data.readers import EvalReader, eval_loader
from pipeline.data.shards import manifest_info
from pipeline.engine.checkpoint import build_from_checkpoint
from pipeline.engine.device import precision
from pipeline.engine.evaluate import (
    InferenceOptions,
    evaluate,
    predict_batch,
    prepare_for_inference,
)
from pipeline.metrics import SegMetrics


def plain(model, shards, spec, device) -> dict:
    metrics = SegMetrics.from_spec(spec, device=device)
    t0 = time.perf_counter()
    for s in EvalReader(shards):  # decode in this process, one frame at a time
        pred = predict_batch(
            model, s["image"][None].to(device), spec.num_classes, InferenceOptions()
        )
        inst = s["instance"][None].to(device) if s["instance"] is not None else None
        metrics.update(pred, s["label"][None].to(device), inst)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    out = metrics.compute()
    return {
        "miou": out["miou"],
        "images": out["num_images"],
        "images_per_s": out["num_images"] / seconds,
    }


def decode_only(shards, batch: int, verify: bool) -> float:
    """Images/s of reading (+ sha256 check) + decoding alone, in this process (no worker start-up
    in the figure: what each decode worker spends per frame)."""
    loader = eval_loader(shards, batch, 0, verify=verify)
    t0, n = time.perf_counter(), 0
    for batches in loader:
        n += sum(len(b["key"]) for b in batches)
    return n / (time.perf_counter() - t0)


def verify_cost(shards, batch: int, rounds: int = 3) -> tuple[float, float]:
    """Best of `rounds` alternating runs with and without the sha256 check (page cache warm)."""
    checked = unchecked = 0.0
    for _ in range(rounds):
        checked = max(checked, decode_only(shards, batch, True))
        unchecked = max(unchecked, decode_only(shards, batch, False))
    return checked, unchecked


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-verify-cost", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)  # fmt: skip
    model, _ = build_from_checkpoint(args.checkpoint)
    model = prepare_for_inference(model, device)
    spec = get_spec(manifest_info(args.shards)["dataset"])
    print(f"# {device}, torch {torch.__version__}, {args.shards}")
    base = plain(model, args.shards, spec, device)
    opts = InferenceOptions(amp=precision(args.amp, device).dtype)
    ours, _ = evaluate(model, args.shards, spec, device, opts, args.batch, args.workers)
    print(
        f"  plain (decode here, batch 1, fp32)   {base['images_per_s']:8.2f} img/s  mIoU {100 * base['miou']:.2f}"
    )
    print(f"  ours ({args.workers} workers, batch {args.batch}, amp {args.amp})  "
          f"{ours['images_per_s']:8.2f} img/s  mIoU {100 * ours['miou']:.2f}  "
          f"peak {ours.get('peak_memory_gib', 0):.1f} GiB")  # fmt: skip
    print(f"  speedup {ours['images_per_s'] / base['images_per_s']:.2f}x; mIoU difference "
          f"{100 * abs(ours['miou'] - base['miou']):.3f} points")  # fmt: skip
    rows = {"plain": base, "ours": {k: ours[k] for k in ("miou", "images", "images_per_s")}}
    if not args.no_verify_cost:
        checked, unchecked = verify_cost(args.shards, args.batch)
        print(f"  read+decode alone, one process: {checked:.1f} img/s with the sha256 check, "
              f"{unchecked:.1f} without (+{100 * (unchecked / checked - 1):.1f} % time per frame "
              f"for the check)")  # fmt: skip
        rows["decode"] = {"checked": checked, "unchecked": unchecked}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()

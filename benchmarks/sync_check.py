"""Does the training loop wait for the GPU between reports? (not a test; needs CUDA)

    python benchmarks/sync_check.py --params params.yaml -S train.model.backbone=mobilenet_v3_large

Runs `stages.steps.train` twice, for N and for 2N steps, each with one report, one validation
and one checkpoint at the end, under torch.cuda.set_sync_debug_mode("warn"): every operation
that makes the host wait for the GPU (a .item(), a copy to the host, a data-dependent shape)
warns. The extra N steps of the second run must add no warning; the script prints the count
per step and where the extra ones come from. (On CPU the same check is
tests/test_train_loop.py, counting Python-level conversions.)
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import warnings

import torch

from stages import steps


def count_syncs(params: str, overrides: list[str], n: int) -> collections.Counter:
    out = tempfile.mkdtemp(prefix="sync-check-")
    over = [*overrides, f"data.outputs={out}", f"train.iterations={n}", f"train.log_every={n}"]
    over += [f"train.val_interval={n}", f"train.checkpoint_interval={n}"]
    p = steps.load(params, over)
    where: collections.Counter = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            steps.train(p)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" in str(w.message):
            where[f"{w.filename}:{w.lineno}"] += 1
    return where


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", help="write the result here too")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sync_check needs CUDA (on CPU: pytest tests/test_train_loop.py)")
    short = count_syncs(args.params, args.overrides, args.steps)
    long = count_syncs(args.params, args.overrides, 2 * args.steps)
    extra = long - short
    per_step = sum(extra.values()) / args.steps
    print(f"syncs: {sum(short.values())} in {args.steps} steps, {sum(long.values())} in "
          f"{2 * args.steps}: {per_step:.2f} per step between reports")  # fmt: skip
    for place, count in extra.most_common(10):
        print(f"  +{count:4d}  {place}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"per_step": per_step, "extra": dict(extra)}, f)


if __name__ == "__main__":
    main()

"""OHEM's threshold: the k-th smallest true-class probability of a batch, three ways (not a test).

    python benchmarks/ohem_threshold.py                       # CUDA: batch 8 of 512x1024
    python benchmarks/ohem_threshold.py --device cpu --shape 2 64 128 --k 1000

`pipeline.engine.losses.kth_smallest` picks kthvalue on CPU and sort on CUDA, where kthvalue
is reported to run one block's radix select over the whole batch. This times kthvalue, sort
and topk (k smallest, their max) on the device, best of --repeats, waiting for the device
after each, and checks that all three give the same value (mmseg's min_kept 100000 by default).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pipeline.engine.losses import kth_smallest

METHODS = ("kthvalue", "sort", "topk")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", type=int, nargs=3, default=(8, 512, 1024), metavar=("B", "H", "W"))
    ap.add_argument("--k", type=int, default=100000, help="ohem_min_kept")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(0)
    prob = torch.rand(*args.shape, device=device, generator=g)
    prob[:, :, :16] = 1.0  # ignored pixels count as 1.0: many ties, as in real crops
    values = prob.flatten()
    k = min(args.k, values.numel())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows, results = [], {}
    for method in METHODS:
        results[method] = kth_smallest(values, k, method)  # warm-up (and the value)
        best = float("inf")
        for _ in range(args.repeats):
            sync()
            t = time.perf_counter()
            kth_smallest(values, k, method)
            sync()
            best = min(best, time.perf_counter() - t)
        rows.append({"method": method, "ms": 1000 * best})
    same = all(torch.equal(results[m], results["kthvalue"]) for m in METHODS)
    default = "kthvalue" if device.type == "cpu" else "sort"  # kth_smallest(method=None)
    fastest = min(rows, key=lambda r: r["ms"])["method"]
    print(f"OHEM threshold, {values.numel():,} pixels, k={k:,} on {device}:")
    for r in rows:
        print(f"  {r['method']:9s} {r['ms']:8.3f} ms")
    print(f"  same value: {same}; default here: {default}; fastest: {fastest}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": str(device), "pixels": values.numel(), "k": k, "rows": rows,
                 "same": same, "default": default, "fastest": fastest}, f, indent=2,
            )  # fmt: skip


if __name__ == "__main__":
    main()

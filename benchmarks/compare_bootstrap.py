"""`seg compare`'s paired bootstrap measured: speed, and coverage on a known population.

    python benchmarks/compare_bootstrap.py speed                 # 2,000 resamples, 500 x 19
    python benchmarks/compare_bootstrap.py coverage --frames 500 --repeats 1000

speed: `pipeline.compare.paired_bootstrap_counts` (the default, studentized: one (R, N) x
(N, 6K) product for the resampled sums, a chunked jackknife for each resample's standard
error) against a plain loop that sums each resample's frames and scores it with SegMetrics
(no standard errors at all), on the same resamples; and the percentile and BCa variants. Run it on one core (`taskset -c 0`, OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1).

coverage: a population of POOL frames is drawn once from a generative model of street scenes
(below), two models scored on every frame of it; the true ΔmIoU is the dataset-level metric of
the whole population. Each repeat draws --frames frames from it (with replacement: frames
i.i.d. from the population), computes the 95 % interval by each method (studentized, BCa,
percentile) on the same resamples, and checks whether it covers the true Δ (and each class's
true Δ).

The population: K = 19 classes with Cityscapes-like frame presence (road in almost every
frame, train in 4 %); a present class covers a log-normal number of pixels (sigma 1.2: a few
frames hold most of a rare class's pixels, which makes IoU a skewed ratio of sums); model A's
recall on a class in a frame is logistic around the class's mean with a per-frame difficulty
that model B shares (the pairing), B's is A's plus a per-class gain (some classes worse); the
misses go to other classes by a fixed confusion profile (their false positives) and a little to
void. Seeded: the same command gives the same figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import compare  # noqa: E402

K = 19
# share of frames where the class is present (roughly Cityscapes val: road, building,
# vegetation, sky, car in nearly all; bus, train, motorcycle rare)
PRESENCE = np.array(
    [0.98, 0.85, 0.97, 0.25, 0.35, 0.95, 0.55, 0.85, 0.95, 0.45, 0.80, 0.70, 0.25, 0.92, 0.10,
     0.08, 0.04, 0.12, 0.40]
)  # fmt: skip
MEDIAN_PIXELS = np.array(
    [3e5, 5e4, 2e5, 1e4, 1e4, 8e3, 1.5e3, 3e3, 1.5e5, 1e4, 4e4, 6e3, 2e3, 3e4, 2e4, 3e4, 3e4,
     3e3, 3e3]
)  # fmt: skip
MEAN_RECALL_A = np.array(
    [0.97, 0.80, 0.91, 0.45, 0.50, 0.55, 0.60, 0.70, 0.91, 0.60, 0.93, 0.75, 0.50, 0.93, 0.55,
     0.65, 0.50, 0.50, 0.70]
)  # fmt: skip
GAIN_B = np.array(  # logit change of B's recall: a small net gain, some classes worse
    [0.02, 0.05, 0.0, 0.15, -0.05, 0.1, 0.0, 0.05, 0.0, -0.1, 0.0, 0.05, 0.1, 0.0, 0.2, 0.1,
     -0.2, 0.1, 0.05]
)  # fmt: skip
VOID_SHARE = 0.02


def _logit(p):
    return np.log(p / (1 - p))


def population(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(size, K, K + 1) counts of model A and of model B on the same frames."""
    rng = np.random.default_rng(seed)
    confuse = rng.dirichlet(np.full(K - 1, 0.3), size=K)  # where class c's misses go
    present = rng.random((size, K)) < PRESENCE
    pixels = np.where(
        present, np.rint(MEDIAN_PIXELS * np.exp(1.2 * rng.standard_normal((size, K)))), 0
    ).astype(np.int64)
    hard = 0.8 * rng.standard_normal((size, 1))  # a frame hard for both models
    base = _logit(MEAN_RECALL_A) - hard + 0.5 * rng.standard_normal((size, K))
    out = []
    for recall_logit in (base, base + GAIN_B + 0.3 * rng.standard_normal((size, K))):
        recall = 1 / (1 + np.exp(-recall_logit))
        tp = rng.binomial(pixels, recall)
        miss = pixels - tp
        void = rng.binomial(miss, VOID_SHARE)
        counts = np.zeros((size, K, K + 1), np.int64)
        counts[:, np.arange(K), np.arange(K)] = tp
        counts[:, :, K] = void
        for c in range(K):
            others = [j for j in range(K) if j != c]
            counts[:, c, others] = rng.multinomial(miss[:, c] - void[:, c], confuse[c])
        out.append(counts)
    return out[0], out[1]


def _truth(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray]:
    ia = compare.class_iou(compare.class_stats(a).sum(0))
    ib = compare.class_iou(compare.class_stats(b).sum(0))
    return float(compare.mean_iou(ib) - compare.mean_iou(ia)), ib - ia


def coverage(args) -> None:
    a, b = population(args.pool, seed=args.seed)
    true_delta, true_class = _truth(a, b)
    print(f"population: {args.pool} frames, true ΔmIoU {100 * true_delta:+.3f} points")
    rng = np.random.default_rng(args.seed + 1)
    hits = {m: 0 for m in compare.METHODS}
    class_hits = {m: np.zeros(K) for m in compare.METHODS}
    class_n = {m: np.zeros(K) for m in compare.METHODS}
    widths = {m: [] for m in compare.METHODS}
    misses = {m: [0, 0] for m in compare.METHODS}  # truth below / above the interval
    t0 = time.perf_counter()
    for r in range(args.repeats):
        pick = rng.integers(0, args.pool, size=args.frames)
        for m in compare.METHODS:
            res = compare.paired_bootstrap_counts(
                a[pick], b[pick], resamples=args.resamples, seed=r, method=m
            )
            d = res.delta
            hits[m] += d.lo <= true_delta <= d.hi
            misses[m][0] += true_delta < d.lo
            misses[m][1] += true_delta > d.hi
            widths[m].append(d.hi - d.lo)
            for c, cd in enumerate(res.class_delta):
                if cd.lo is not None:
                    class_n[m][c] += 1
                    class_hits[m][c] += cd.lo <= true_class[c] <= cd.hi
    took = time.perf_counter() - t0
    print(
        f"{args.repeats} repeats of {args.frames} frames, {args.resamples} resamples, "
        f"level 0.95, {took:.0f} s"
    )
    print(
        "| method | ΔmIoU coverage | truth below / above | median width (points) | per-class coverage, min .. max |"
    )
    print("|---|---|---|---|---|")
    for m in compare.METHODS:
        per_class = class_hits[m] / np.maximum(class_n[m], 1)
        print(
            f"| {m} | {100 * hits[m] / args.repeats:.1f} % | {misses[m][0]} / {misses[m][1]} | "
            f"{100 * np.median(widths[m]):.2f} | {100 * per_class.min():.1f} .. "
            f"{100 * per_class.max():.1f} % (lowest: class {int(per_class.argmin())}) |"
        )


def _plain(a: np.ndarray, b: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The obvious loop: per resample, sum the drawn frames' counts and score each model with
    SegMetrics (the dataset-level metric); percentiles then come from these values."""
    import torch

    from pipeline.metrics import SegMetrics

    out = np.empty(len(weights))
    for r, w in enumerate(weights):
        scores = []
        for counts in (a, b):
            total = torch.from_numpy(np.tensordot(w.astype(np.int64), counts, axes=1))
            m = SegMetrics(K)
            m.confusion.copy_(total[:, :K])
            m.void_pred.copy_(total[:, K])
            scores.append(m.compute()["miou"])
        out[r] = scores[1] - scores[0]
    return out


def speed(args) -> None:
    a, b = population(args.frames, seed=args.seed)
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        res = compare.paired_bootstrap_counts(a, b, resamples=args.resamples, seed=0)
        times.append(time.perf_counter() - t0)
    weights = compare.resample_weights(args.frames, args.plain_resamples, seed=0)
    t0 = time.perf_counter()
    plain = _plain(a, b, weights)
    plain_s = (time.perf_counter() - t0) * args.resamples / args.plain_resamples
    agree = np.max(np.abs(plain - res.samples[: args.plain_resamples]))
    print(
        f"paired {res.method} bootstrap (the default), {args.resamples} resamples of "
        f"{args.frames} frames x {K} classes: best {min(times):.3f} s, median "
        f"{np.median(times):.3f} s of {args.runs} runs"
    )
    print(
        f"plain loop (sum per resample + SegMetrics.compute): {plain_s:.1f} s for "
        f"{args.resamples} (timed on {args.plain_resamples}); max |difference| of the resampled "
        f"ΔmIoU {agree:.1e}; speedup {plain_s / min(times):.0f}x"
    )
    for m in compare.METHODS[1:]:
        t0 = time.perf_counter()
        compare.paired_bootstrap_counts(a, b, resamples=args.resamples, seed=0, method=m)
        print(f"{m}: {time.perf_counter() - t0:.3f} s")
    print(res.line())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--frames", type=int, default=500)
    s.add_argument("--resamples", type=int, default=2000)
    s.add_argument("--runs", type=int, default=10)
    s.add_argument("--plain-resamples", type=int, default=100)
    s.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("coverage")
    c.add_argument("--frames", type=int, default=500)
    c.add_argument("--repeats", type=int, default=1000)
    c.add_argument("--resamples", type=int, default=2000)
    c.add_argument("--pool", type=int, default=20000)
    c.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"numpy {np.__version__}, torch {torch.__version__}, "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}, "
        f"affinity {sorted(os.sched_getaffinity(0))}"
    )
    {"speed": speed, "coverage": coverage}[args.what](args)


if __name__ == "__main__":
    main()

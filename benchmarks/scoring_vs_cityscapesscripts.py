"""Time score_prediction_folder against cityscapesscripts' evalPixelLevelSemanticLabeling.

Generates N ground-truth (labelIds + instanceIds) / prediction pairs at full Cityscapes size
in a temporary folder, scores them with both, and prints wall times, images/s, the speedup
and whether the two agree. Run by hand:

    .venv/bin/python benchmarks/scoring_vs_cityscapesscripts.py --n 20
    .venv/bin/python benchmarks/scoring_vs_cityscapesscripts.py --n 500   # the full val split

The official script is run as installed (pure-Python path unless its Cython extension was
built), with np.in1d restored for numpy >= 2.4, which removed it.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.labels import get_spec
from pipeline.data.pngio import read_png
from pipeline.engine.scoring import find_pairs, load_pair, score_prediction_folder
from pipeline.metrics import SegMetrics

STUFF = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 0, 4, 5, 9)
THINGS = (24, 25, 26, 26, 26, 27, 28, 32, 33)  # cars most often, as in Cityscapes
PRED_NOISE = (7, 8, 11, 13, 21, 23, 24, 26, 0)


def make_pair(rng: np.random.Generator, h: int, w: int):
    """A street-like labelIds/instanceIds frame and a prediction that gets ~80 % of it right."""
    label = np.full((h, w), 23, np.uint8)
    label[h // 3 :] = 11
    label[2 * h // 3 :] = 7
    for _ in range(40):
        y, x = rng.integers(0, h - 32), rng.integers(0, w - 32)
        label[y : y + rng.integers(16, h // 4), x : x + rng.integers(16, w // 6)] = rng.choice(
            STUFF
        )
    inst = label.astype(np.uint16)
    count: dict[int, int] = {}
    for _ in range(25):  # Cityscapes val averages ~20 instances a frame
        lid = int(rng.choice(THINGS))
        y, x = rng.integers(h // 3, h - 24), rng.integers(0, w - 24)
        box = (slice(y, y + rng.integers(12, h // 5)), slice(x, x + rng.integers(12, w // 8)))
        count[lid] = count.get(lid, 0) + 1
        label[box] = lid
        inst[box] = lid * 1000 + count[lid]

    pred = np.roll(label, (int(rng.integers(-8, 9)), int(rng.integers(-16, 17))), axis=(0, 1))
    for _ in range(30):
        y, x = rng.integers(0, h - 16), rng.integers(0, w - 16)
        pred[y : y + rng.integers(8, h // 8), x : x + rng.integers(8, w // 8)] = rng.choice(
            PRED_NOISE
        )
    return label, inst, pred


def generate(root: Path, n: int, h: int, w: int, seed: int) -> tuple[Path, Path]:
    gt_root, pred_dir = root / "cityscapes", root / "results"
    rng = np.random.default_rng(seed)
    for i in range(n):
        city = ("frankfurt", "lindau", "munster")[i % 3]
        frame = f"{city}_{i:06d}_000019"
        gt = gt_root / "gtFine" / "val" / city
        gt.mkdir(parents=True, exist_ok=True)
        (pred_dir / city).mkdir(parents=True, exist_ok=True)
        label, inst, pred = make_pair(rng, h, w)
        Image.fromarray(label).save(gt / f"{frame}_gtFine_labelIds.png")
        Image.fromarray(inst).save(gt / f"{frame}_gtFine_instanceIds.png")
        Image.fromarray(pred).save(pred_dir / city / f"{frame}_leftImg8bit.png")
    return gt_root, pred_dir


def run_official(gt_root: Path, pred_dir: Path, export: Path) -> dict:
    if not hasattr(np, "in1d"):
        np.in1d = lambda a, b, invert=False: np.isin(a, b, invert=invert).ravel()
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev

    args = ev.args
    args.cityscapesPath = str(gt_root)
    args.predictionPath, args.predictionWalk = str(pred_dir), None
    args.exportFile, args.JSONOutput, args.quiet = str(export), False, True
    gts = sorted(str(p) for p in (gt_root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    preds = [ev.getPrediction(args, gt) for gt in gts]
    return ev.evaluateImgLists(preds, gts, args)


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="number of image pairs (val has 500)")
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    opts = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="scoring_bench_") as tmp:
        t0 = time.perf_counter()
        gt_root, pred_dir = generate(Path(tmp), opts.n, opts.height, opts.width, opts.seed)
        print(
            f"generated {opts.n} pairs at {opts.height}x{opts.width} in {time.perf_counter() - t0:.1f} s"
        )

        # The floor for both: decoding the three PNGs of every frame, one after another.
        t0 = time.perf_counter()
        for pair in find_pairs(pred_dir, gt_root):
            for path in (pair.gt, pair.instance, pair.pred):
                read_png(path)
        t_decode = time.perf_counter() - t0

        t_ours = {}
        for workers in (0, 2):  # reading in the calling thread, and on 2 reader threads
            t0 = time.perf_counter()
            ours = score_prediction_folder(pred_dir, gt_root, num_workers=workers)
            t_ours[workers] = time.perf_counter() - t0

        # The metric alone, on one decoded frame: what an evaluation loop pays per image.
        pair = find_pairs(pred_dir, gt_root)[0]
        tensors = load_pair(pair, get_spec("cityscapes"))
        metrics = SegMetrics.from_spec(get_spec("cityscapes"))
        torch.set_num_threads(1)
        t_update = min(_timed(metrics.update, *tensors) for _ in range(20))

        t0 = time.perf_counter()
        theirs = run_official(gt_root, pred_dir, Path(tmp) / "official.json")
        t_theirs = time.perf_counter() - t0

    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev

    n = opts.n
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores")
    print(
        f"official path: {'Cython' if ev.CSUPPORT else 'pure Python (no Cython extension)'}, "
        f"numpy {np.__version__}, torch {torch.__version__}"
    )
    print(f"{'':28}{'wall s':>10}{'images/s':>10}")
    for workers, t in t_ours.items():
        label = f"pipeline, num_workers={workers}"
        print(f"{label:28}{t:10.2f}{n / t:10.2f}")
    print(f"{'cityscapesscripts':28}{t_theirs:10.2f}{n / t_theirs:10.2f}")
    print(f"{'(decode 3 PNGs/frame only)':28}{t_decode:10.2f}{n / t_decode:10.2f}")
    best = min(t_ours.values())
    print(f"speedup (best pipeline run): {t_theirs / best:.2f}x")
    print(f"SegMetrics.update alone, one frame with instances, 1 thread: {1000 * t_update:.1f} ms")
    if n < 500:
        print(
            f"extrapolated to 500 images (linear, from {n}): pipeline {500 * best / n:.0f} s, "
            f"cityscapesscripts {500 * t_theirs / n:.0f} s"
        )
    else:
        print("measured on the full 500 images, no extrapolation")
    for key, official in (
        ("miou", "averageScoreClasses"),
        ("iiou", "averageScoreInstClasses"),
        ("miou_category", "averageScoreCategories"),
        ("iiou_category", "averageScoreInstCategories"),
    ):
        print(f"{key:14} pipeline {ours[key]:.6f}  official {theirs[official]:.6f}")


if __name__ == "__main__":
    main()

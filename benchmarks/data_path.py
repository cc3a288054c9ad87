"""The data path at 1024x2048 on real photos, side by side: codecs, preprocess, the training
loader, official scoring (not a test; issue "The data path at GPU speed").

    .venv/bin/python benchmarks/data_path.py --out benchmarks/results/DATE-cpu-data-path.md
    .venv/bin/python benchmarks/data_path.py --frames 8 --score-frames 10   # a quick look

The data: Cityscapes-layout mosaics of real street photos, 1024x2048, each tiled from 15
CamVid frames (../shared/data/camvid, 360x480, 3 x 5 tiles, cropped), their labels mapped to
Cityscapes label ids (Sky -> sky, Road -> road, Car -> car, ...), instanceIds numbering each
tile's things. Not synthetic scenes: their flat colours compress unlike photos.

"today" rows run the code of another revision (`--baseline main`, extracted with `git archive`
into a temporary folder and run in a subprocess with it first on PYTHONPATH), in the same run,
on the same files: the plain baseline every figure is compared with.

1. Codecs, one thread, on the mosaics' pixels: bytes (and x PNG's), decode frames/s, encode
   ms, bit-exact round trip. Images and labels; and the checksums a reader can check per
   member (sha256, crc32, xxh3).
2. Preprocess (`write_shards`: decode + check + labelIds -> trainIds + encode + tar + hashes):
   pairs/s with 1 worker (= per core) and 2, today's code (png: the source's bytes) against
   ours (png; zstd, the Cityscapes recipe's), and the shards' MB.
3. The loader end to end: a DataLoader over TrainStream (the project's reader, with the
   checks training makes: xxh3 of every member against the pinned manifest; today's code
   checks nothing), batch 4 at 1024x2048: decode only (a GPU node augments on the GPU), and
   decode + BatchAugment on this CPU (scale 0.5-2, crop 512x1024, flip, photometric), with
   1 and 2 workers. frames/s, and per core (frames/s / workers) for decode only.
   And the reader alone in one process (TrainStream, decode + checks, no DataLoader): the
   issue's "training read" per core.
5. Official scoring (`seg eval --predictions`, score_prediction_folder) on --score-frames
   label mosaics with predictions (the ground truth shifted and blotted), against
   cityscapesscripts' evalPixelLevelSemanticLabeling and today's code; the scores must agree
   with the official ones to 1e-6.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CAMVID = REPO.parent / "shared" / "data" / "camvid"
# CamVid (SegNet's 11 classes) -> Cityscapes label ids
CAMVID_TO_CITYSCAPES = np.array([23, 11, 17, 7, 8, 21, 20, 13, 26, 24, 25, 0] + [0] * 244, np.uint8)
THINGS = (24, 25, 26)  # person, rider, car: numbered per tile in instanceIds
H, W = 1024, 2048


# ----------------------------------------------------------------------------- the data


def _camvid_frames(camvid: Path) -> list[tuple[Path, Path]]:
    pairs = []
    for split in ("train", "val"):
        for image in sorted((camvid / split).glob("*.*")):
            pairs.append((image, camvid / f"{split}annot" / f"{image.stem}.png"))
    if not pairs:
        raise SystemExit(f"{camvid}: no CamVid frames (train/, trainannot/, val/, valannot/)")
    return pairs


def mosaic(pairs: list[tuple[Path, Path]], i: int, with_image: bool = True):
    """(image uint8 (H, W, 3) or None, labelIds uint8 (H, W), instanceIds uint16 (H, W)) of
    mosaic i: 3 x 5 CamVid frames from frame 15 i on, cropped at an offset that moves with i."""
    rows_img, rows_lab, rows_inst = [], [], []
    for r in range(3):
        imgs, labs, insts = [], [], []
        for c in range(5):
            tile = r * 5 + c
            image, label = pairs[(i * 15 + tile) % len(pairs)]
            lab = CAMVID_TO_CITYSCAPES[np.asarray(Image.open(label))]
            inst = lab.astype(np.uint16)
            thing = np.isin(lab, THINGS)
            inst[thing] = lab[thing].astype(np.uint16) * 1000 + tile
            labs.append(lab)
            insts.append(inst)
            if with_image:
                imgs.append(np.asarray(Image.open(image).convert("RGB")))
        rows_lab.append(np.concatenate(labs, 1))
        rows_inst.append(np.concatenate(insts, 1))
        if with_image:
            rows_img.append(np.concatenate(imgs, 1))
    y, x = (i * 7) % (3 * 360 - H), (i * 53) % (5 * 480 - W)

    def crop(a):
        return np.ascontiguousarray(a[y : y + H, x : x + W])

    image = crop(np.concatenate(rows_img, 0)) if with_image else None
    return image, crop(np.concatenate(rows_lab, 0)), crop(np.concatenate(rows_inst, 0))


def make_root(root: Path, n: int, camvid: Path = CAMVID, split: str = "train") -> Path:
    """A Cityscapes-layout root of n mosaics (PNG level 6, as Pillow saves by default)."""
    pairs = _camvid_frames(camvid)
    for i in range(n):
        image, label, inst = mosaic(pairs, i)
        key = f"camvid_{i:06d}_000019"
        img_dir, gt_dir = (
            root / "leftImg8bit" / split / "camvid",
            root / "gtFine" / split / "camvid",
        )
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(img_dir / f"{key}_leftImg8bit.png", compress_level=6)
        Image.fromarray(label).save(gt_dir / f"{key}_gtFine_labelIds.png", compress_level=6)
        Image.fromarray(inst).save(gt_dir / f"{key}_gtFine_instanceIds.png", compress_level=6)
    return root


def make_scoring(root: Path, n: int, camvid: Path = CAMVID) -> tuple[Path, Path]:
    """(gt root, prediction folder) of n label mosaics; each prediction is its ground truth
    shifted a few pixels with blotches of other classes (~85 % right)."""
    pairs = _camvid_frames(camvid)
    rng = np.random.default_rng(0)
    gt_root, pred_dir = root / "cityscapes", root / "results"
    for i in range(n):
        _, label, inst = mosaic(pairs, i + 1000, with_image=False)
        frame = f"camvid_{i:06d}_000019"
        gt = gt_root / "gtFine" / "val" / "camvid"
        gt.mkdir(parents=True, exist_ok=True)
        (pred_dir / "camvid").mkdir(parents=True, exist_ok=True)
        Image.fromarray(label).save(gt / f"{frame}_gtFine_labelIds.png")
        Image.fromarray(inst).save(gt / f"{frame}_gtFine_instanceIds.png")
        pred = np.roll(label, (int(rng.integers(-8, 9)), int(rng.integers(-16, 17))), (0, 1))
        for _ in range(30):
            y, x = rng.integers(0, H - 16), rng.integers(0, W - 16)
            lid = rng.choice((7, 8, 11, 17, 21, 23, 24, 26))
            pred[y : y + rng.integers(8, H // 8), x : x + rng.integers(8, W // 8)] = lid
        Image.fromarray(pred).save(pred_dir / "camvid" / f"{frame}_leftImg8bit.png")
    return gt_root, pred_dir


# ----------------------------------------------------------------------------- 1. codecs


def _best(fn, repeat: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def codec_table(root: Path, frames: int) -> dict:
    """Per codec: mean bytes, decode frames/s (one thread), encode ms, bit-exact."""
    import lz4.frame
    import pyspng
    import qoi

    from pipeline.data import codecs

    images = sorted((root / "leftImg8bit").rglob("*.png"))[:frames]
    labels = sorted((root / "gtFine").rglob("*_labelIds.png"))[:frames]

    def pillow(data):
        with Image.open(io.BytesIO(data)) as im:
            return np.array(im)

    def lz4_encode(a):
        return lz4.frame.compress(codecs.npy_bytes(a))

    def lz4_decode(data):
        raw = lz4.frame.decompress(data)
        return np.load(io.BytesIO(raw), allow_pickle=False)

    def png6(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG", compress_level=6)
        return buf.getvalue()

    candidates = {
        "image": [
            ("PNG level 6, Pillow (today)", png6, pillow),
            ("PNG level 6, libspng (pyspng)", png6, pyspng.load),
            ("QOI", qoi.encode, qoi.decode),
            ("raw + zstd level 3", codecs.encode_zstd, codecs.decode_zstd),
            ("Up filter + zstd level 1 (ours: zstd)", codecs.encode_up_zstd, codecs.decode_up_zstd),
            ("raw + lz4", lz4_encode, lz4_decode),
        ],
        "label": [
            ("PNG level 6, Pillow (today)", png6, pillow),
            ("PNG level 6, libspng (pyspng)", png6, pyspng.load),
            ("raw + zstd level 3 (ours)", codecs.encode_zstd, codecs.decode_zstd),
            ("raw + lz4", lz4_encode, lz4_decode),
        ],
    }
    out: dict = {}
    for kind, files in (("image", images), ("label", labels)):
        arrays = [pillow(p.read_bytes()) for p in files]
        rows = []
        for name, enc, dec in candidates[kind]:
            size, t_dec, t_enc, exact = 0, 0.0, 0.0, True
            for a in arrays:
                data = enc(a)
                size += len(data)
                t_enc += _best(lambda a=a, enc=enc: enc(a), 1)
                t_dec += _best(lambda data=data, dec=dec: dec(data))
                exact &= bool(np.array_equal(dec(data), a))
            n = len(arrays)
            rows.append({"codec": name, "mb": size / n / 1e6, "decode_fps": n / t_dec,
                         "encode_ms": 1e3 * t_enc / n, "exact": exact})  # fmt: skip
        png = rows[0]["mb"]
        for r in rows:
            r["x_png"] = r["mb"] / png
        out[kind] = rows
    import hashlib
    import zlib

    data = codecs.encode_up_zstd(pillow(images[0].read_bytes()))
    out["checksum_mb"] = len(data) / 1e6
    out["checksums_ms"] = {
        "sha256": 1e3 * _best(lambda: hashlib.sha256(data).digest(), 5),
        "crc32 (zlib)": 1e3 * _best(lambda: zlib.crc32(data), 5),
        "xxh3 (xxhash)": 1e3 * _best(lambda: codecs.xxh3(data), 5),
    }
    return out


# ----------------------------------------------------------------------------- 2-4, measured in a subprocess


def measure_preprocess(
    root: str, out: str, image_format: str, workers: int, repeat: int = 1
) -> dict:
    """pairs/s of write_shards, the best of `repeat` runs, after one sample converted first
    (the decoders' and encoders' imports and first calls are not what is measured)."""
    from pipeline.data import shards
    from pipeline.data.sources import get_adapter

    adapter = get_adapter("cityscapes")
    first = adapter.samples(Path(root), "train")[0]
    shards._convert((adapter, first, image_format, root))  # both trees have it
    kw = {"image_format": image_format} if image_format != "png" else {}
    n = len(list(Path(root, "leftImg8bit", "train").rglob("*.png")))
    best = float("inf")
    for i in range(repeat):
        t0 = time.perf_counter()
        s = shards.write_shards(root, "train", f"{out}-{i}" if i else out, samples_per_shard=4,
                                workers=workers, **kw)  # fmt: skip
        best = min(best, time.perf_counter() - t0)
    return {"pairs_per_s": n / best, "mb": s.bytes / 1e6, "samples": s.samples}


def measure_loader(shards: str, workers: int, augment: bool, samples: int, batch: int) -> dict:
    import torch

    from pipeline.data.readers import TrainStream, collate_train
    from pipeline.data.transforms import BatchAugment, step_generator

    torch.set_num_threads(1)
    loader = torch.utils.data.DataLoader(
        TrainStream(shards, seed=0, shuffle_buffer=4), batch_size=batch, num_workers=workers,
        collate_fn=collate_train, prefetch_factor=4 if workers else None,
    )  # fmt: skip
    aug = BatchAugment((512, 1024)) if augment else None
    it = iter(loader)
    next(it)  # workers started, the first batch in
    t0, seen, step = time.perf_counter(), 0, 0
    while seen < samples:
        b = next(it)
        if aug is not None:
            aug(b["image"], b["label"], b["size"], step_generator(0, step))
            step += 1
        seen += b["image"].shape[0]
    return {"frames_per_s": seen / (time.perf_counter() - t0)}


def measure_reader(shards: str, samples: int) -> dict:
    """The reader alone, in this process: TrainStream's samples (decoded, checked), no
    DataLoader: the issue's "training read" figure, per core."""
    import torch

    from pipeline.data.readers import TrainStream

    torch.set_num_threads(1)
    it = iter(TrainStream(shards, seed=0, shuffle_buffer=4))
    for _ in range(4):
        next(it)
    t0 = time.perf_counter()
    for _ in range(samples):
        next(it)
    return {"frames_per_s": samples / (time.perf_counter() - t0)}


def measure_scoring(gt_root: str, pred_dir: str, workers: int) -> dict:
    from pipeline.engine.scoring import score_prediction_folder

    t0 = time.perf_counter()
    m = score_prediction_folder(pred_dir, gt_root, num_workers=workers)
    dt = time.perf_counter() - t0
    keys = ("miou", "iiou", "miou_category", "iiou_category")
    return {"s": dt, "scores": {k: m[k] for k in keys}}


MEASURES = {"preprocess": measure_preprocess, "loader": measure_loader,
            "reader": measure_reader, "scoring": measure_scoring}  # fmt: skip


def run(tree: Path | None, what: str, **kw) -> dict:
    """One measurement in a fresh process, with `tree`'s pipeline first on the path (None:
    this checkout's)."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", what, json.dumps(kw)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{what} {kw} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def baseline_tree(rev: str, into: Path) -> Path | None:
    """`rev`'s pipeline/ extracted into `into` (None when git or the revision is missing)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "pipeline"],
                             capture_output=True)  # fmt: skip
    if archive.returncode != 0:
        print(f"no baseline: git archive {rev}: {archive.stderr.decode().strip()}")
        return None
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


# ----------------------------------------------------------------------------- the report


def machine() -> str:
    import torch

    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in text.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("Flags:"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "sha_ni", "vpclmulqdq") if f in flags]
    return (f"{model}, {os.cpu_count()} cores, flags: {' '.join(shown)} (no "
            f"{', '.join(f for f in ('avx512f', 'sha_ni') if f not in flags) or '-'}); "
            f"torch {torch.__version__}, numpy {np.__version__}, python {platform.python_version()}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("kwargs", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument("--frames", type=int, default=24, help="mosaics to preprocess and read")
    ap.add_argument("--codec-frames", type=int, default=6, help="mosaics the codec table uses")
    ap.add_argument("--score-frames", type=int, default=100)
    ap.add_argument("--read-samples", type=int, default=48, help="frames each loader row reads")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2, help="preprocess: best of N runs")
    ap.add_argument("--only", choices=("preprocess", "scoring"), help="only section 2 or 5")
    ap.add_argument("--baseline", default="main", help="the revision of the 'today' rows")
    ap.add_argument("--camvid", type=Path, default=CAMVID)
    ap.add_argument("--out", type=Path, help="also write the report (markdown) here")
    ap.add_argument("--make-root", type=Path, help="only write N=--frames mosaics there")
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(MEASURES[args.measure](**json.loads(args.kwargs))))
        return
    if args.make_root:
        make_root(args.make_root, args.frames, args.camvid)
        return
    lines: list[str] = []

    def say(text: str = "") -> None:
        if text.startswith("\n## "):  # a shared machine: each section says how busy it was
            load = f" (load average {os.getloadavg()[0]:.1f} at its start)"
            text = text.rstrip("\n") + load + "\n"
        print(text, flush=True)
        lines.append(text)

    say(f"machine: {machine()}")
    say(f"command: python benchmarks/data_path.py {' '.join(sys.argv[1:])}")
    with tempfile.TemporaryDirectory(prefix="data_path_") as tmp:
        tmp = Path(tmp)
        base = baseline_tree(args.baseline, tmp / "baseline")
        t0 = time.perf_counter()
        root = make_root(tmp / "mosaic", args.frames, args.camvid)
        say(f"data: {args.frames} mosaics of {H}x{W} from {args.camvid} "
            f"({time.perf_counter() - t0:.0f} s to make); baseline: {args.baseline}")  # fmt: skip

        if args.only:
            table = {"image": [], "label": [], "checksum_mb": 0, "checksums_ms": {}}
        else:
            say("\n## 1. Codecs, one thread (decode frames/s = per core)\n")
            table = codec_table(root, args.codec_frames)
        for kind in ("image", "label") if not args.only else ():
            say(f"| {kind} codec | MB | x PNG | decode frames/s | encode ms | bit-exact |")
            say("|---|---|---|---|---|---|")
            for r in table[kind]:
                say(f"| {r['codec']} | {r['mb']:.3f} | {r['x_png']:.2f} | {r['decode_fps']:.1f} "
                    f"| {r['encode_ms']:.0f} | {'yes' if r['exact'] else 'NO'} |")  # fmt: skip
            say()
        if not args.only:
            say(f"checksum of one {table['checksum_mb']:.1f} MB zstd image member: "
                + ", ".join(f"{k} {v:.2f} ms" for k, v in table["checksums_ms"].items()))  # fmt: skip

        say("\n## 2. Preprocess (write_shards), pairs/s\n")
        say("| code | image_format | workers | pairs/s | per core | shards MB |")
        say("|---|---|---|---|---|---|")
        configs = [("today", "png")] if base else []
        configs += [("ours", "png"), ("ours", "zstd")]
        if args.only == "scoring":
            configs = []
        shards: dict[tuple[str, str], str] = {}
        pre: dict = {}
        for code, fmt in configs:
            for workers in (1, 2):
                out = tmp / f"shards-{code}-{fmt}-{workers}"
                r = run(base if code == "today" else None, "preprocess", root=str(root),
                        out=str(out), image_format=fmt, workers=workers,
                        repeat=args.repeat)  # fmt: skip
                pre[(code, fmt, workers)] = r["pairs_per_s"]
                shards[(code, fmt)] = str(out)
                say(f"| {code} | {fmt} | {workers} | {r['pairs_per_s']:.2f} | "
                    f"{r['pairs_per_s'] / workers:.2f} | {r['mb']:.1f} |")  # fmt: skip
        if base and configs:
            say(f"\nours zstd / today png, per core (1 worker): "
                f"{pre[('ours', 'zstd', 1)] / pre[('today', 'png', 1)]:.2f}x")  # fmt: skip
        if args.only == "preprocess":
            if args.out:
                args.out.write_text("\n".join(lines) + "\n")
            return

        say(f"\n## 3. Training read: the reader alone, one process, {args.read_samples} frames\n")
        say("| code | shards | frames/s (= per core) |")
        say("|---|---|---|")
        reader: dict = {}
        for code, fmt in configs:
            r = run(base if code == "today" else None, "reader", shards=shards[(code, fmt)],
                    samples=args.read_samples)  # fmt: skip
            reader[(code, fmt)] = r["frames_per_s"]
            say(f"| {code} | {fmt} | {r['frames_per_s']:.1f} |")
        if base and configs:
            say(
                f"\nours zstd / today png: {reader[('ours', 'zstd')] / reader[('today', 'png')]:.2f}x"
            )

        say(
            f"\n## 4. The loader end to end, batch {args.batch}, {args.read_samples} frames a row\n"
        )
        say(
            "| code | shards | workers | decode only frames/s | per core | + augmentation frames/s |"
        )
        say("|---|---|---|---|---|---|")
        loader: dict = {}
        for code, fmt in configs:
            for workers in (1, 2):
                rates = [
                    run(base if code == "today" else None, "loader", shards=shards[(code, fmt)],
                        workers=workers, augment=augment, samples=args.read_samples,
                        batch=args.batch)["frames_per_s"]
                    for augment in (False, True)
                ]  # fmt: skip
                loader[(code, fmt, workers)] = rates[0]
                say(f"| {code} | {fmt} | {workers} | {rates[0]:.1f} | {rates[0] / workers:.1f} "
                    f"| {rates[1]:.1f} |")  # fmt: skip
        if base and configs:
            say(f"\nours zstd / today png, decode only per core (1 worker): "
                f"{loader[('ours', 'zstd', 1)] / loader[('today', 'png', 1)]:.2f}x")  # fmt: skip
        shutil.rmtree(root)

        say(f"\n## 5. Official scoring, {args.score_frames} frames of {H}x{W}\n")
        gt_root, pred_dir = make_scoring(tmp / "scoring", args.score_frames, args.camvid)
        sys.path.insert(0, str(HERE))
        from scoring_vs_cityscapesscripts import run_official

        t0 = time.perf_counter()
        official = run_official(gt_root, pred_dir, tmp / "official.json")
        t_official = time.perf_counter() - t0
        from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev

        say(f"cityscapesscripts' path: {'Cython' if ev.CSUPPORT else 'pure Python'}\n")
        say("| scorer | s | frames/s | vs cityscapesscripts |")
        say("|---|---|---|---|")
        say(
            f"| cityscapesscripts | {t_official:.1f} | {args.score_frames / t_official:.2f} | 1.00x |"
        )
        names = {"miou": "averageScoreClasses", "iiou": "averageScoreInstClasses",
                 "miou_category": "averageScoreCategories",
                 "iiou_category": "averageScoreInstCategories"}  # fmt: skip
        diffs = {}
        for code in (["today"] if base else []) + ["ours"]:
            for workers in (0, 2):
                r = run(base if code == "today" else None, "scoring", gt_root=str(gt_root),
                        pred_dir=str(pred_dir), workers=workers)  # fmt: skip
                readers = "reader threads" if code == "today" else "worker processes"
                say(f"| {code}, {workers} {readers} | {r['s']:.1f} | "
                    f"{args.score_frames / r['s']:.2f} | {t_official / r['s']:.2f}x |")  # fmt: skip
                diff = max(abs(r["scores"][k] - official[v]) for k, v in names.items())
                diffs[code] = max(diffs.get(code, 0.0), diff)
        say("\nlargest difference from the official scores (mIoU, iIoU, categories): "
            + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))  # fmt: skip
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

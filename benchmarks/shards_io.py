"""Data-stage throughput: preprocess, shard size, and training reads (shards vs a PNG folder).

    python benchmarks/shards_io.py --n 32 --height 1024 --width 2048 --workers 2

1. Generates N synthetic Cityscapes-format pairs at the given size (`seg synth`).
2. Preprocess: pairs/s with 1 worker (per core) and with --workers, for each image format
   (png = the source bytes, npy = raw); shard bytes against the raw folder's bytes.
3. Training read: samples/s of decode + random scale/crop/flip. Ours: DataLoader workers only
   decode the shards (TrainStream), the batch is augmented at once where training runs
   (BatchAugment; here the CPU, on a GPU node the GPU). The usual baseline: a map-style
   Dataset opening the PNG files with PIL and augmenting each frame in the workers (the same
   augmentation, one frame at a time). Same DataLoader settings, in the same run.
4. With --s3: the same training read from an object store against local disk, the same
   shards (uploaded by `write_shards` to the bucket), in the same run: raw MB/s (tar members
   read, nothing decoded) and training-read samples/s. `--s3 local` starts moto's S3 server
   on 127.0.0.1 (the dev extra); `--s3 s3://bucket/prefix` uses a real bucket, with the
   endpoint and credentials from the AWS_* variables or a profile.

    python benchmarks/shards_io.py --n 16 --s3 local --skip-preprocess --workers 2
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.labels import get_spec
from pipeline.data.readers import TrainStream, collate_train
from pipeline.data.shards import write_shards
from pipeline.data.sources import CityscapesAdapter
from pipeline.data.synth import generate_cityscapes
from pipeline.data.transforms import BatchAugment, step_generator


def folder_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


class PILFolder(torch.utils.data.Dataset):
    """The plain baseline: open image and labelIds PNGs with PIL, map ids, same augmentation."""

    def __init__(self, root: Path, split: str, augment: BatchAugment) -> None:
        self.samples = CityscapesAdapter().samples(root, split)
        self.spec = get_spec("cityscapes")
        self.augment = augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        image = np.array(Image.open(s.image).convert("RGB"))  # writable, as torch wants
        label = self.spec.label_to_train[np.asarray(Image.open(s.label))]
        image = torch.from_numpy(image).permute(2, 0, 1)[None]
        label = torch.from_numpy(label)[None]
        size = torch.tensor([label.shape[-2:]])
        x, y = self.augment(image, label, size, step_generator(0, i))  # one frame, here
        return x[0], y[0]


def collate(batch):
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])


def time_loader(loader, n_samples: int, augment=None) -> float:
    """samples/s; with `augment`, each batch is augmented after the loader (ours)."""
    it = iter(loader)
    next(it)  # workers started, first batch in
    t0 = time.perf_counter()
    seen, step = 0, 0
    while seen < n_samples:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        if augment is not None:
            batch = augment(batch["image"], batch["label"], batch["size"], step_generator(0, step))
            step += 1
        seen += batch[0].shape[0]
    return seen / (time.perf_counter() - t0)


def raw_read(url_or_dir, n_samples: int) -> tuple[float, float]:
    """(MB/s, samples/s) of reading tar members straight through, one process, no decode."""
    from pipeline.data.readers import iter_raw, shard_urls

    urls = shard_urls(url_or_dir)
    t0, size, seen = time.perf_counter(), 0, 0
    while seen < n_samples:
        for url in urls:
            for _key, members in iter_raw(url):
                size += sum(len(b) for b in members.values())
                seen += 1
    dt = time.perf_counter() - t0
    return size / dt / 1e6, seen / dt


def store_vs_disk(tmp: Path, root: Path, args, aug: BatchAugment) -> None:
    """Section 4: the same shards on local disk and in an object store, read the same way."""
    import sys

    server = None
    if args.s3 == "local":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import s3server  # moto's server mode, auth on, on a free loopback port

        server, s3 = s3server.start(tmp / "moto")
        (tmp / "aws-empty").write_text("")  # no profile or config file of the user's
        os.environ.update(s3.env(AWS_CONFIG_FILE=str(tmp / "aws-empty"),
                                 AWS_SHARED_CREDENTIALS_FILE=str(tmp / "aws-empty")))  # fmt: skip
        s3.make_bucket("bench")
        url, where = "s3://bench/shards/train", f"moto S3 server at {s3.endpoint}"
    else:
        url, where = args.s3.rstrip("/") + "/train", args.s3
    try:
        local = tmp / "shards-store-local"
        kw = {"samples_per_shard": 8, "image_format": "png", "workers": args.workers}
        write_shards(root, "train", local, **kw)
        t0 = time.perf_counter()
        write_shards(root, "train", url, overwrite=True, **kw)
        up = time.perf_counter() - t0
        size = folder_bytes(local, "shard-*.tar")
        print(
            f"\nobject store ({where}) against local disk, the same {size / 1e6:.1f} MB of shards:"
        )
        print(
            f"  preprocess into the store: {args.n / up:6.2f} pairs/s ({size / up / 1e6:.1f} MB/s with encoding)"
        )
        for name, src in (("local disk", local), ("object store", url)):
            mbs, sps = raw_read(src, args.read_samples)
            print(
                f"  raw read, {name:12s}: {mbs:7.1f} MB/s  {sps:7.1f} samples/s (tar members, no decode)"
            )
        for workers in sorted({0, args.workers}):
            rates = {}
            for name, src in (("local disk", local), ("object store", url)):
                stream = torch.utils.data.DataLoader(
                    TrainStream(src, seed=0, shuffle_buffer=8), batch_size=args.batch,
                    num_workers=workers, collate_fn=collate_train,
                )  # fmt: skip
                rates[name] = time_loader(stream, args.read_samples, aug)
            ratio = rates["object store"] / rates["local disk"]
            print(f"  training read, workers={workers}: local disk {rates['local disk']:6.2f} samples/s"
                  f" | object store {rates['object store']:6.2f} samples/s ({ratio:.2f}x)")  # fmt: skip
    finally:
        if server is not None:
            s3server.stop(server)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--crop", type=int, nargs=2, default=(512, 1024))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--read-samples", type=int, default=64)
    ap.add_argument("--s3", default=None,
                    help="also read from an object store: 'local' (moto on 127.0.0.1) or s3://bucket/prefix")  # fmt: skip
    ap.add_argument("--skip-preprocess", action="store_true",
                    help="only section 4: no preprocess table, no PIL folder baseline")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}; torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "cityscapes"
        t0 = time.perf_counter()
        generate_cityscapes(
            root, {"train": args.n}, args.height, args.width, seed=0, workers=args.workers
        )
        print(
            f"generated {args.n} pairs at {args.height}x{args.width} in {time.perf_counter() - t0:.1f}s"
        )
        raw = (
            folder_bytes(root / "leftImg8bit")
            + folder_bytes(root / "gtFine", "*_labelIds.png")
            + folder_bytes(root / "gtFine", "*_instanceIds.png")
        )
        print(f"raw folder (images + labelIds + instanceIds): {raw / 1e6:.1f} MB")
        if args.skip_preprocess:
            if args.s3:
                store_vs_disk(tmp, root, args, BatchAugment(tuple(args.crop)))
            shutil.rmtree(root)
            return
        print("\npreprocess (decode + validate + labelIds->trainIds + encode + tar + sha256):")
        for fmt in ("png", "npy"):
            for workers in sorted({1, args.workers}):
                out = tmp / f"shards-{fmt}-{workers}"
                t0 = time.perf_counter()
                s = write_shards(
                    root, "train", out, samples_per_shard=8, image_format=fmt, workers=workers
                )
                dt = time.perf_counter() - t0
                print(
                    f"  {fmt:3s} workers={workers}: {args.n / dt:6.2f} pairs/s ({args.n / dt / workers:5.2f} per core),"
                    f" shards {s.bytes / 1e6:7.1f} MB = {s.bytes / raw:.2f}x raw"
                )
        aug = BatchAugment(tuple(args.crop))
        print(
            f"\ntraining read (decode + scale 0.5-2 + crop {args.crop[0]}x{args.crop[1]} + flip), batch {args.batch}:"
        )
        for workers in sorted({0, args.workers}):
            folder = torch.utils.data.DataLoader(
                PILFolder(root, "train", aug), batch_size=args.batch, num_workers=workers,
                collate_fn=collate,
            )  # fmt: skip
            base = time_loader(folder, args.read_samples)
            for fmt in ("png", "npy"):
                stream = torch.utils.data.DataLoader(
                    TrainStream(tmp / f"shards-{fmt}-1", seed=0, shuffle_buffer=8),
                    batch_size=args.batch, num_workers=workers, collate_fn=collate_train,
                )  # fmt: skip
                ours = time_loader(stream, args.read_samples, aug)
                print(
                    f"  workers={workers}: PIL folder {base:6.2f} samples/s | shards ({fmt}) {ours:6.2f} samples/s"
                    f" ({ours / base:.2f}x)"
                )
        if args.s3:
            store_vs_disk(tmp, root, args, aug)
        shutil.rmtree(root)


if __name__ == "__main__":
    main()

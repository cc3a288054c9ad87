"""WebDataset tar shards: the only thing training and evaluation read.

Writer: one split in, `shard-000000.tar ...` plus `manifest.parquet` out. Each sample is a
group of tar members sharing the key (the frame id):

    {key}.image.png     the RGB image: the source PNG's own bytes (see `IMAGE_FORMATS`);
                        `image.jpg` for a JPEG source: the source JPEG's own bytes
    {key}.label.png     train ids, 8-bit single channel, 255 = ignore
    {key}.instance.png  16-bit instanceIds, where the dataset has them (Cityscapes iIoU)
    {key}.json          city, size, source paths and their sha256

Shards are byte-identical for identical input: samples in sorted key order, shard i holds
samples [i*n, (i+1)*n), and every tar header has fixed metadata (mtime 0, uid/gid 0, no
user names, mode 0644). A local split is written into a temporary sibling folder and renamed
at the end, so a failure leaves no partial shards or manifest behind.

The output may also be a folder in an object store (`s3://bucket/prefix/train`,
pipeline.store): each shard is uploaded as soon as it is closed, and the manifest last, as
the commit marker. A store has no atomic rename, so a killed upload leaves shards without a
manifest, which no reader accepts; the next run replaces them. An earlier manifest there is
removed before the first new shard is uploaded, so a manifest never describes other shards.

The manifest records every member's size and sha256: the readers (pipeline.data.readers)
check evaluation samples against it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import store
from pipeline.atomic import atomic_dir
from pipeline.data.labels import DatasetSpec
from pipeline.data.pngio import decode_png_bytes, encode_png, read_png
from pipeline.data.sources import Adapter, SourceSample, get_adapter
from pipeline.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
SHARD_PATTERN = "shard-{:06d}.tar"
_SHARD_NAME = re.compile(r"shard-\d{6}\.tar")
# "png": the source file's bytes, unchanged: smallest, traceable to the source hash, and
#        fast enough to decode (see benchmarks/shards_io.py for the measurement).
# "npy": raw uint8 (H, W, 3) in .npy: ~2x the bytes, decode is a memcpy. For CPU-starved GPUs.
IMAGE_FORMATS = ("png", "npy")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ShardSummary:
    split: str
    out_dir: Path | str  # a folder, or an object-store URL
    samples: int
    shards: int
    bytes: int
    skipped: list[tuple[str, str]]  # (key, reason)


# ----------------------------------------------------------------------------- writing


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _convert(args: tuple[Adapter, SourceSample, str, str | None]) -> dict:
    """Read, validate and encode one sample (runs in a worker process).

    Returns {"key", "members": {ext: bytes}, "row": manifest fields} or {"key", "error"}.
    """
    adapter, sample, image_format, root = args
    try:
        image_bytes = sample.image.read_bytes()
    except OSError as exc:
        return {"key": sample.key, "error": f"{sample.image}: cannot read ({exc})"}
    try:
        source_sha = _sha256(image_bytes)
        image = decode_png_bytes(image_bytes, str(sample.image))
        if image.ndim == 2 or image.shape[2] not in (3, 4):
            raise DataError(f"{sample.image}: expected an RGB image, got shape {image.shape}")
        h, w = image.shape[:2]
        ext = image_format
        if image_format == "png" and image.shape[2] == 3 and _is_jpeg(image_bytes):
            # a JPEG source (CamVid, VOC, VKITTI2) keeps its own bytes: a PNG of the decoded
            # pixels is 3.6x larger (CamVid val) and its hash no longer traces to the source
            ext = "jpg"
        elif (
            image_format == "npy"
            or image.shape[2] == 4
            or image.dtype != np.uint8
            or _not_png(image_bytes)
        ):
            # re-encode anything that is not a plain RGB PNG so readers see one format
            rgb = np.ascontiguousarray(image[..., :3].astype(np.uint8))
            if image_format == "npy":
                buf = io.BytesIO()
                np.save(buf, rgb, allow_pickle=False)
                image_bytes = buf.getvalue()
            else:
                image_bytes = encode_png(rgb, compress_level=6)
        members: dict[str, bytes] = {"image." + ext: image_bytes}
        spec = adapter.spec
        counts = np.zeros(spec.num_classes, dtype=np.int64)
        ignored = 0
        meta = {"key": sample.key, "height": h, "width": w, **sample.meta}
        source = {"image": _rel(sample.image, root)}
        if sample.label is not None:
            if not sample.label.is_file():
                raise DataError(f"{sample.label}: missing label for image {sample.image}")
            train_ids = adapter.read_label(sample)
            if train_ids.shape != (h, w):
                raise DataError(
                    f"{sample.label}: label size {train_ids.shape[1]}x{train_ids.shape[0]} "
                    f"does not match image {sample.image} size {w}x{h}"
                )
            members["label.png"] = encode_png(train_ids, compress_level=6)
            hist = np.bincount(train_ids.ravel(), minlength=256)
            counts = hist[: spec.num_classes].astype(np.int64)
            ignored = int(hist[spec.ignore_index])
            source["label"] = _rel(sample.label, root)
            source["label_sha256"] = _sha256(sample.label.read_bytes())
        if sample.instance is not None:
            inst = read_png(sample.instance)
            if inst.shape != (h, w):
                raise DataError(
                    f"{sample.instance}: instance size {inst.shape[1]}x{inst.shape[0]} "
                    f"does not match image {sample.image} size {w}x{h}"
                )
            members["instance.png"] = encode_png(inst.astype(np.uint16), compress_level=6)
            source["instance"] = _rel(sample.instance, root)
        source["image_sha256"] = source_sha
        meta["source"] = source
        members["json"] = json.dumps(meta, sort_keys=True).encode()
    except DataError as exc:
        return {"key": sample.key, "error": str(exc)}
    row = {
        "key": sample.key,
        "group": sample.group,  # city / sequence / scene: what grouped k-fold keeps together
        "height": h,
        "width": w,
        "class_pixels": counts.tolist(),
        "ignore_pixels": ignored,
    }
    return {"key": sample.key, "members": members, "row": row}


def _not_png(data: bytes) -> bool:
    return not data.startswith(b"\x89PNG\r\n\x1a\n")


def _is_jpeg(data: bytes) -> bool:
    return data.startswith(b"\xff\xd8\xff")


def _rel(path: Path, root: str | None) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve())) if root else str(path)
    except ValueError:
        return str(path)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    root: Path | str,
    split: str,
    out_dir: Path | str,
    dataset: str = "cityscapes",
    samples_per_shard: int = 100,
    image_format: str = "png",
    workers: int = 1,
    skip_bad: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ShardSummary:
    """Convert one split of a dataset root into tar shards and a Parquet manifest.

    Memory is bounded: samples stream through a process pool in order and are written one
    at a time, so a split is never held in memory.
    """
    if samples_per_shard < 1:
        raise ConfigError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if image_format not in IMAGE_FORMATS:
        raise ConfigError(
            f"unknown image_format {image_format!r}; valid: {', '.join(IMAGE_FORMATS)}"
        )
    # checked before any work: a bad destination (or bucket, or credentials) writes nothing
    dest = (
        _Bucket(str(out_dir), overwrite) if store.is_url(out_dir) else _Folder(out_dir, overwrite)
    )
    adapter = get_adapter(dataset)
    samples = adapter.samples(Path(root), split)  # sorted by key; DataError if empty
    total = len(samples)
    with dest as tmp:
        rows, skipped, n_written = [], [], 0
        tar: tarfile.TarFile | None = None
        shard_name = ""
        jobs = ((adapter, s, image_format, str(root)) for s in samples)
        with _pool(workers) as pool:
            for done, result in enumerate(pool.map(_convert, jobs, chunksize=1), start=1):
                if "error" in result:
                    if not skip_bad:
                        raise DataError(result["error"])
                    log.warning("skipping %s: %s", result["key"], result["error"])
                    skipped.append((result["key"], result["error"]))
                    rows.append({"key": result["key"], "shard": None, "error": result["error"]})
                else:
                    if n_written % samples_per_shard == 0:
                        if tar is not None:
                            tar.close()
                            dest.closed(shard_name)
                        shard_name = SHARD_PATTERN.format(n_written // samples_per_shard)
                        tar = tarfile.open(tmp / shard_name, "w", format=tarfile.USTAR_FORMAT)
                    assert tar is not None
                    row = dict(result["row"], shard=shard_name, error=None)
                    for ext, data in sorted(result["members"].items()):
                        _add_member(tar, f"{result['key']}.{ext}", data)
                        row[f"{ext.split('.')[0]}_bytes"] = len(data)
                        row[f"{ext.split('.')[0]}_sha256"] = _sha256(data)
                    rows.append(row)
                    n_written += 1
                if progress:
                    progress(done, total)
        if tar is not None:
            tar.close()
            dest.closed(shard_name)
        if n_written == 0:
            raise DataError(
                f"{root}: split {split!r} produced no valid samples ({len(skipped)} skipped)"
            )
        _write_manifest(tmp / MANIFEST, rows, adapter.spec, split, image_format)
    n_shards = math.ceil(n_written / samples_per_shard)
    return ShardSummary(split, dest.out_dir, n_written, n_shards, dest.bytes, skipped)


class _Folder:
    """A local output folder: written whole in a temporary sibling, renamed at the end."""

    def __init__(self, out_dir: Path | str, overwrite: bool) -> None:
        out_dir = self.out_dir = store.local(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise DataError(f"{out_dir}: output path is a file, not a folder")
        if out_dir.exists() and any(out_dir.iterdir()):
            if not overwrite:
                raise DataError(
                    f"{out_dir}: output folder exists and is not empty (remove it, or use "
                    "--overwrite)"
                )
            if not (out_dir / MANIFEST).is_file():
                raise DataError(
                    f"{out_dir}: not a shard folder (no {MANIFEST}); --overwrite only replaces "
                    "shards it made"
                )
        self.bytes = 0

    def __enter__(self) -> Path:
        self._atomic = atomic_dir(self.out_dir)
        self.tmp = self._atomic.__enter__()
        return self.tmp

    def closed(self, shard: str) -> None:
        self.bytes += (self.tmp / shard).stat().st_size

    def __exit__(self, *exc) -> bool | None:
        return self._atomic.__exit__(*exc)


class _Bucket:
    """A folder in an object store: shards go up one by one as they close (staged in a local
    temporary folder, one at a time), the manifest last, as the commit marker."""

    def __init__(self, url: str, overwrite: bool) -> None:
        self.out_dir, self.bytes = url.rstrip("/"), 0
        where = store.display(self.out_dir)
        names = store.list_names(self.out_dir)  # the bucket and the credentials, checked
        self.committed = MANIFEST in names
        if self.committed and not overwrite:
            raise DataError(f"{where}: shards exist there (use --overwrite to replace them)")
        foreign = [n for n in names if n != MANIFEST and not _SHARD_NAME.fullmatch(n)]
        if foreign:
            raise DataError(
                f"{where}: not a shard folder ({store.display(store.join(url, foreign[0]))} "
                "is not a shard); the shards need a prefix of their own"
            )
        self.old = {n for n in names if _SHARD_NAME.fullmatch(n)}
        if self.old and not self.committed:
            log.warning("%s: %d shard(s) without a manifest (an upload that was cut short): "
                        "replacing them", where, len(self.old))  # fmt: skip
        self.uploaded: set[str] = set()

    def __enter__(self) -> Path:
        self.tmp = Path(tempfile.mkdtemp(prefix="seg-shards-"))
        return self.tmp

    def closed(self, shard: str) -> None:
        if self.committed:  # the old manifest goes before the first shard it describes
            store.remove([store.join(self.out_dir, MANIFEST)])
            self.committed = False
        local = self.tmp / shard
        self.bytes += local.stat().st_size
        store.put_file(local, store.join(self.out_dir, shard))
        local.unlink()
        self.uploaded.add(shard)

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is None:
                stale = sorted(self.old - self.uploaded)  # an earlier, longer split's tail
                store.remove([store.join(self.out_dir, n) for n in stale])
                store.put_file(self.tmp / MANIFEST, store.join(self.out_dir, MANIFEST))
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


class _SerialPool:
    def map(self, fn, it, chunksize=1):
        return map(fn, it)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _pool(workers: int):
    if workers <= 1:
        return _SerialPool()
    return ProcessPoolExecutor(max_workers=workers)


_MANIFEST_FIELDS = (
    ("key", "string"),
    ("group", "string"),
    ("shard", "string"),
    ("error", "string"),
    ("height", "int32"),
    ("width", "int32"),
    ("image_bytes", "int64"),
    ("image_sha256", "string"),
    ("label_bytes", "int64"),
    ("label_sha256", "string"),
    ("instance_bytes", "int64"),
    ("instance_sha256", "string"),
    ("json_bytes", "int64"),
    ("json_sha256", "string"),
    ("ignore_pixels", "int64"),
)


def _write_manifest(path: Path, rows: list[dict], spec: DatasetSpec, split: str, fmt: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {
        name: pa.array([r.get(name) for r in rows], type=getattr(pa, typ)())
        for name, typ in _MANIFEST_FIELDS
    }
    columns["class_pixels"] = pa.array(
        [r.get("class_pixels") for r in rows], type=pa.list_(pa.int64())
    )
    meta = {
        "dataset": spec.name,
        "split": split,
        "image_format": fmt,
        "class_names": json.dumps(list(spec.class_names)),
        "ignore_index": str(spec.ignore_index),
    }
    table = pa.table(columns).replace_schema_metadata(meta)
    pq.write_table(table, path, compression="zstd")


def manifest_bytes(shard_dir: Path | str) -> bytes:
    """The manifest file's bytes (its sha256 identifies the split: see provenance)."""
    path = store.join(shard_dir, MANIFEST)
    where = store.display(shard_dir)
    return store.read_bytes(
        path,
        missing=f"{store.display(path)}: no manifest (is {where} a shard folder made by "
        "`seg preprocess`?)",
    )


def read_manifest(shard_dir: Path | str):
    """The split's manifest as a pyarrow Table (schema metadata holds dataset and classes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not store.is_url(shard_dir):
        path = store.local(shard_dir) / MANIFEST
        if not path.is_file():
            raise DataError(
                f"{path}: no manifest (is {shard_dir} a shard folder made by `seg preprocess`?)"
            )
        return pq.read_table(path)
    return pq.read_table(pa.BufferReader(manifest_bytes(shard_dir)))


def manifest_info(shard_dir: Path | str) -> dict:
    """Dataset name, split, class names and image format recorded in a manifest."""
    meta = {
        k.decode(): v.decode() for k, v in (read_manifest(shard_dir).schema.metadata or {}).items()
    }
    meta["class_names"] = json.loads(meta["class_names"])
    return meta


def class_pixel_counts(shard_dir: Path | str, keys: frozenset[str] | None = None) -> np.ndarray:
    """(num_classes,) int64 pixel counts over the split's written samples, or over those of
    `keys` (a fold's training part)."""
    rows = read_manifest(shard_dir).select(["key", "class_pixels"]).to_pylist()
    counts = [
        r["class_pixels"]
        for r in rows
        if r["class_pixels"] is not None and (keys is None or r["key"] in keys)
    ]
    return np.asarray(counts, dtype=np.int64).sum(axis=0)

"""WebDataset tar shards: the only thing training and evaluation read.

Writer: one split in, `shard-000000.tar ...` plus `manifest.parquet` out. Each sample is a
group of tar members sharing the key (the frame id); each member's codec is its extension
(pipeline.data.codecs):

    {key}.image.png       the RGB image, `image_format: png`: the source PNG's own bytes;
                          `image.jpg` for a JPEG source (the source JPEG's own bytes)
    {key}.image.up.npy.zst  the RGB image, `image_format: zstd` (the Cityscapes recipe's)
    {key}.image.npy       the RGB image, `image_format: npy` (raw)
    {key}.label.npy.zst   train ids, uint8 (H, W), 255 = ignore
    {key}.instance.png    instanceIds where the dataset has them (Cityscapes iIoU): the source's
                          16-bit PNG bytes (`instance.npy.zst` for other sources)
    {key}.json            city, size, source paths and their sha256

Shards written before the codecs (format 1: `label.png`, `instance.png`) read as ever.

Shards are byte-identical for identical input: samples in sorted key order, shard i holds
samples [i*n, (i+1)*n), every tar header has fixed metadata (mtime 0, uid/gid 0, no user
names, mode 0644), and the codecs are deterministic. A local split is written into a
temporary sibling folder and renamed at the end, so a failure leaves no partial shards or
manifest behind.

The manifest records every member's size, sha256 (what evaluation checks, and what names the
content) and xxh3 (what training checks: pipeline.data.codecs.xxh3).

Shards in an object store (`store_url`, params.yaml `data.store`): nothing stored is
rewritten in place. The shards go to a prefix named after what the stage consumed,
`{store}/{split}/{content id}/` (`content_id`: the source files' bytes, the dataset, split,
format and shard size, the writer's and the codec libraries' versions), each object written
with conditional creation (or found byte-identical), the manifest last as the commit marker.
A prefix whose manifest is there is complete and is never written again: a second host that
preprocesses the same data finds it and uploads nothing. The local `out_dir` then holds a
pointer (`store.json`: the prefix, the manifest's sha256) and a copy of the manifest; that is
what DVC tracks, so DVC removing the stage's outputs before a rerun never touches the bucket.
A prefix given directly as `out_dir` (`seg preprocess ... s3://bucket/p/val` by hand) is
written once the same way: shards exist there, and nothing is replaced.

Readers pin a split (`pin`): its manifest's bytes are read once, and every shard they open
is checked against them (readers.py).
"""

from __future__ import annotations

import dataclasses
import functools
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
from pipeline.data import codecs
from pipeline.data.codecs import IMAGE_FORMATS, NPY_ZST, UP_NPY_ZST
from pipeline.data.labels import DatasetSpec, count_ids
from pipeline.data.pngio import decode_png_bytes, encode_png, is_png
from pipeline.data.sources import Adapter, SourceSample, get_adapter
from pipeline.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
POINTER = "store.json"  # in a local split folder whose shards are in a store
SHARD_PATTERN = "shard-{:06d}.tar"
_SHARD_NAME = re.compile(r"shard-\d{6}\.tar")
# 2: members in codecs (label/instance .npy.zst, image per image_format), an xxh3 per member.
# Bump it whenever the writer's output changes for the same input: it is part of the
# content id, so new shards go to a new prefix instead of over the old ones.
FORMAT_VERSION = 2
__all__ = ["IMAGE_FORMATS", "MANIFEST", "POINTER", "Pinned", "pin", "write_shards"]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ShardSummary:
    split: str
    out_dir: Path | str  # a folder, or an object-store URL
    samples: int
    shards: int
    bytes: int
    skipped: list[tuple[str, str]]  # (key, reason)
    location: str | None = None  # the store prefix that holds the shards (data.store)
    uploaded: bool = True  # False: the prefix was complete already, nothing was written


# ----------------------------------------------------------------------------- writing


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
        source_sha = codecs.sha256(image_bytes)
        # decoded once in any case, to check it (and to transcode it): libspng where it can
        image = decode_png_bytes(image_bytes, str(sample.image))
        if image.ndim == 2 or image.shape[2] not in (3, 4):
            raise DataError(f"{sample.image}: expected an RGB image, got shape {image.shape}")
        h, w = image.shape[:2]
        plain = image.shape[2] == 3 and image.dtype == np.uint8
        if image_format == "png" and plain and _is_jpeg(image_bytes):
            # a JPEG source (CamVid, VOC, VKITTI2) keeps its own bytes: a PNG of the decoded
            # pixels is 3.6x larger (CamVid val) and its hash no longer traces to the source
            members: dict[str, bytes] = {"image.jpg": image_bytes}
        elif image_format == "png" and plain and is_png(image_bytes):
            members = {"image.png": image_bytes}
        else:
            # transcoded: zstd / npy, or a PNG of anything that is not a plain RGB PNG
            rgb = image if plain else np.ascontiguousarray(image[..., :3].astype(np.uint8))
            if image_format == "zstd":
                members = {f"image.{UP_NPY_ZST}": codecs.encode_up_zstd(rgb)}
            elif image_format == "npy":
                members = {"image.npy": codecs.npy_bytes(rgb)}
            else:
                members = {"image.png": encode_png(rgb, compress_level=6)}
        del image
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
            # labels decode ~10x faster from zstd than from PNG at the same bytes (codecs)
            members[f"label.{NPY_ZST}"] = codecs.encode_zstd(train_ids.astype(np.uint8, copy=False))
            hist = count_ids(train_ids)
            counts = hist[: spec.num_classes].astype(np.int64)
            ignored = int(hist[spec.ignore_index])
            source["label"] = _rel(sample.label, root)
            source["label_sha256"] = codecs.sha256(sample.label.read_bytes())
        if sample.instance is not None:
            members.update(_instance_member(sample, h, w))
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


def _instance_member(sample: SourceSample, h: int, w: int) -> dict[str, bytes]:
    """The instanceIds member. A 16-bit gray PNG (Cityscapes') keeps its own bytes, checked
    by its header: only evaluation reads it (iIoU), and decoding and re-encoding it here cost
    a sixth of a 1024x2048 pair's preprocess (16-bit rows unfilter slowly: 13 ms a frame);
    evaluation decodes it in its workers, where a damaged one stops it in one line. Anything
    else is decoded and stored as uint16 zstd."""
    assert sample.instance is not None
    try:
        data = sample.instance.read_bytes()
    except OSError as exc:
        raise DataError(f"{sample.instance}: cannot read ({exc})") from None
    header = _png_header(data)
    if header is not None and header[2:] == (16, 0):
        size = header[:2]
        inst = None
    else:
        inst = decode_png_bytes(data, str(sample.instance))
        size = inst.shape
    if size != (h, w):
        raise DataError(
            f"{sample.instance}: instance size {size[1]}x{size[0]} does not match image "
            f"{sample.image} size {w}x{h}"
        )
    if inst is None:
        return {"instance.png": data}
    return {f"instance.{NPY_ZST}": codecs.encode_zstd(inst.astype(np.uint16, copy=False))}


def _png_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(height, width, bit depth, colour type) from a PNG's IHDR, None if not a PNG."""
    if len(data) < 33 or not is_png(data) or data[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return height, width, data[24], data[25]


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
    store_url: str | None = None,
) -> ShardSummary:
    """Convert one split of a dataset root into tar shards and a Parquet manifest.

    `out_dir`: a local folder, or (written once) a folder in an object store. With
    `store_url`, the shards go to `{store_url}/{split}/{content id}/` and `out_dir` (local)
    gets the pointer to them (see the module doc).

    Memory is bounded: samples stream through a process pool in order and are written one
    at a time, so a split is never held in memory.
    """
    if samples_per_shard < 1:
        raise ConfigError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if image_format not in IMAGE_FORMATS:
        raise ConfigError(
            f"unknown image_format {image_format!r}; valid: {', '.join(IMAGE_FORMATS)}"
        )
    if store_url is not None and not store.is_url(store_url):
        raise ConfigError(
            f"data.store: {store_url!r} is not an object-store URL (s3://bucket/prefix)"
        )
    if store_url is not None and store.is_url(out_dir):
        raise ConfigError(
            f"{store.display(out_dir)}: with a store ({store.display(store_url)}) the output "
            "is the local folder that points to the shards (data.shards is a local folder)"
        )
    # checked before any work: a bad destination (or bucket, or credentials) writes nothing
    pointer = _Folder(out_dir, overwrite) if store_url is not None else None
    adapter = get_adapter(dataset)
    samples = adapter.samples(Path(root), split)  # sorted by key; DataError if empty
    total = len(samples)
    with _pool(workers) as pool:
        if pointer is not None:
            assert store_url is not None
            cid = content_id(
                pool, samples, str(root), adapter.spec.name, split, image_format,
                samples_per_shard, skip_bad,
            )  # fmt: skip
            prefix = str(store.join(store_url.rstrip("/"), split, cid))
            found = _committed(prefix)
            if found is not None:  # complete: nothing to convert, nothing to upload
                manifest, size = found
                if progress:
                    progress(total, total)
                return _point(pointer, prefix, manifest, split, size, uploaded=False)
            dest = _Bucket(prefix, named_by_content=True)
        elif store.is_url(out_dir):
            dest = _Bucket(str(out_dir), named_by_content=False)
        else:
            dest = _Folder(out_dir, overwrite)
        with dest as tmp:
            rows, skipped, n_written = [], [], 0
            tar: tarfile.TarFile | None = None
            shard_name = ""
            jobs = ((adapter, s, image_format, str(root)) for s in samples)
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
                        prefix_ = ext.split(".")[0]
                        row[f"{prefix_}_bytes"] = len(data)
                        row[f"{prefix_}_sha256"] = codecs.sha256(data)
                        row[f"{prefix_}_xxh3"] = codecs.xxh3(data)
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
            manifest = (tmp / MANIFEST).read_bytes()
    n_shards = math.ceil(n_written / samples_per_shard)
    if pointer is not None:
        summary = _point(pointer, dest.out_dir, manifest, split, dest.bytes, uploaded=True)
        return dataclasses.replace(summary, skipped=skipped)
    return ShardSummary(split, dest.out_dir, n_written, n_shards, dest.bytes, skipped)


def content_id(
    pool, samples: list[SourceSample], root: str, dataset: str, split: str, image_format: str,
    samples_per_shard: int, skip_bad: bool,
) -> str:  # fmt: skip
    """The name of a split's prefix in a store: a hash of what the preprocess stage consumes.

    Every source file's bytes (sha256, with its path relative to the root, the key, group and
    the adapter's metadata, in key order), the dataset, split, image format and samples per
    shard; `skip_bad` (with a bad sample it changes which samples each shard holds); and what
    decides the written bytes for the same input: FORMAT_VERSION, the codec libraries'
    versions (codecs.codec_signature), pyarrow's (the manifest's writer) and Pillow's (PNGs
    re-encoded from other sources). Computed before any conversion, so a host that finds the
    prefix complete converts nothing. The files are hashed in the worker pool: 1-2 s per GB.
    """
    import hashlib

    import PIL
    import pyarrow

    head = {
        "format": FORMAT_VERSION, "codec": codecs.codec_signature(), "pyarrow": pyarrow.__version__,
        "pillow": PIL.__version__, "dataset": dataset, "split": split,
        "image_format": image_format, "samples_per_shard": samples_per_shard,
        "skip_bad": skip_bad,
    }  # fmt: skip
    h = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
    jobs = ((s, root) for s in samples)
    for line in pool.map(_source_digest, jobs, chunksize=4):
        h.update(line.encode())
    return h.hexdigest()[:32]  # 128 bits


def _source_digest(args: tuple[SourceSample, str]) -> str:
    """One sample's line in the content id (runs in a worker process)."""
    sample, root = args
    files = {}
    for name in ("image", "label", "instance"):
        path = getattr(sample, name)
        if path is None:
            continue
        try:
            digest = codecs.sha256(Path(path).read_bytes())
        except OSError:  # missing or unreadable: the conversion names it
            digest = None
        files[name] = [_rel(path, root), digest]
    line = {"key": sample.key, "group": sample.group, "meta": sample.meta, "files": files}
    return json.dumps(line, sort_keys=True, default=str) + "\n"


def _committed(prefix: str) -> tuple[bytes, int] | None:
    """(manifest bytes, shard bytes) of a complete prefix in a store, None if there is no
    manifest there. A manifest whose shards are not all there is an error: the prefix is
    someone else's, or was damaged after it was written."""
    sizes = store.list_sizes(prefix)  # the bucket and the credentials, checked
    if MANIFEST not in sizes:
        return None
    manifest = store.read_bytes(store.join(prefix, MANIFEST))
    names = {s for s in _table(manifest).column("shard").to_pylist() if s}
    missing = sorted(names - set(sizes))
    if missing:
        raise DataError(
            f"{store.display(store.join(prefix, missing[0]))}: missing, though the prefix's "
            f"manifest lists it ({len(missing)} shard(s) missing): the prefix was damaged; it "
            "is never rewritten, so remove it by hand and run `seg preprocess` again"
        )
    return manifest, sum(sizes[n] for n in names)


def _point(
    pointer: _Folder, prefix: str, manifest: bytes, split: str, size: int, uploaded: bool
) -> ShardSummary:
    """Write the local pointer folder: store.json and a copy of the manifest."""
    doc = {
        "url": store.display(prefix),  # never user info or a query (store.display)
        "manifest_sha256": codecs.sha256(manifest),
        "format": FORMAT_VERSION,
    }
    with pointer as tmp:
        (tmp / MANIFEST).write_bytes(manifest)
        (tmp / POINTER).write_text(json.dumps(doc, indent=2) + "\n")
    written = [s for s in _table(manifest).column("shard").to_pylist() if s]
    return ShardSummary(
        split, pointer.out_dir, len(written), len(set(written)), size, [], doc["url"], uploaded
    )


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
    """A folder in an object store, written once: shards go up one by one as they close
    (staged in a local temporary folder, one at a time), the manifest last, as the commit
    marker. Each object is created only where none is (S3's conditional PUT); one that is
    there already (a cut-short upload of the same content, another host writing the same
    prefix right now) must hold the very same bytes, else the write stops, having changed
    nothing. No key is ever given a second version."""

    def __init__(self, url: str, named_by_content: bool) -> None:
        self.out_dir, self.bytes = url.rstrip("/"), 0
        where = store.display(self.out_dir)
        names = store.list_sizes(self.out_dir)  # the bucket and the credentials, checked
        if MANIFEST in names:  # a prefix named after its content would have been found
            raise DataError(
                f"{where}: shards exist there, and a bucket prefix is written once (set "
                "data.store, which names each prefix after its content, or choose another "
                "prefix)"
            )
        foreign = [n for n in names if n != MANIFEST and not _SHARD_NAME.fullmatch(n)]
        if foreign:
            raise DataError(
                f"{where}: not a shard folder ({store.display(store.join(url, foreign[0]))} "
                "is not a shard); the shards need a prefix of their own"
            )
        if names:
            log.warning("%s: %d shard(s) without a manifest (an upload that was cut short): "
                        "checking they are the same bytes", where, len(names))  # fmt: skip

    def __enter__(self) -> Path:
        self.tmp = Path(tempfile.mkdtemp(prefix="seg-shards-"))
        return self.tmp

    def closed(self, shard: str) -> None:
        local = self.tmp / shard
        self.bytes += local.stat().st_size
        store.put_once(local, str(store.join(self.out_dir, shard)))
        local.unlink()

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is None:
                store.put_once(self.tmp / MANIFEST, str(store.join(self.out_dir, MANIFEST)))
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


_MEMBER_PREFIXES = ("image", "label", "instance", "json")
_MANIFEST_FIELDS = (
    ("key", "string"),
    ("group", "string"),
    ("shard", "string"),
    ("error", "string"),
    ("height", "int32"),
    ("width", "int32"),
    *((f"{m}_{f}", t) for m in _MEMBER_PREFIXES
      for f, t in (("bytes", "int64"), ("sha256", "string"), ("xxh3", "string"))),
    ("ignore_pixels", "int64"),
)  # fmt: skip


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
        "format_version": str(FORMAT_VERSION),
        "codec": codecs.codec_signature(),  # labels, instances, zstd images
        "class_names": json.dumps(list(spec.class_names)),
        "ignore_index": str(spec.ignore_index),
    }
    table = pa.table(columns).replace_schema_metadata(meta)
    pq.write_table(table, path, compression="zstd")


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Pinned:
    """A split as a reader found it when it started: its manifest's bytes, read once, and
    where its shards are. Every reader takes one wherever it takes a shard folder, and checks
    each sample it reads against this manifest, never a newer one: a `seg preprocess
    --overwrite` of the split while a run reads it either leaves the run reading the data it
    started with (a store's prefixes are never rewritten) or stops it in one line (a local
    folder's shards replaced under it), never a mix."""

    folder: str  # the shard folder (or URL) as named: messages, provenance
    base: str  # where the shards are: the folder, or its pointer's store prefix
    manifest: bytes
    in_store: bool = False  # a local folder that points to a store prefix (data.store)

    def __str__(self) -> str:
        return self.folder

    @property
    def sha256(self) -> str:
        return _sha256_of(self.manifest)

    def table(self):
        return _table(self.manifest)

    def shard(self, name: str) -> str:
        return str(store.join(self.base, name))


@functools.lru_cache(maxsize=16)
def _table(manifest: bytes):
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(manifest))


@functools.lru_cache(maxsize=16)
def _sha256_of(data: bytes) -> str:
    return codecs.sha256(data)


def pin(shard_dir: Path | str | Pinned) -> Pinned:
    """A shard folder (local, a local pointer to a store, or an object-store URL), pinned:
    its manifest read once. A Pinned is returned as it is."""
    if isinstance(shard_dir, Pinned):
        return shard_dir
    if store.is_url(shard_dir):
        url = str(shard_dir).rstrip("/")
        return Pinned(store.display(url), url, manifest_bytes(url))
    folder = store.local(shard_dir)
    data = manifest_bytes(folder)
    pointer = folder / POINTER
    if not pointer.is_file():
        return Pinned(str(folder), str(folder), data)
    try:
        doc = json.loads(pointer.read_text())
        url, sha = str(doc["url"]), str(doc["manifest_sha256"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{pointer}: not a store pointer ({exc}); rerun `seg preprocess`") from None
    if _sha256_of(data) != sha:
        raise DataError(
            f"{folder / MANIFEST}: not the manifest {pointer.name} names (sha256 "
            f"{_sha256_of(data)[:12]}..., not {sha[:12]}...): rerun `seg preprocess`"
        )
    return Pinned(str(folder), url, data, in_store=True)


def manifest_bytes(shard_dir: Path | str | Pinned) -> bytes:
    """The manifest file's bytes (its sha256 identifies the split: see provenance). A local
    folder that points to a store holds a copy of it."""
    if isinstance(shard_dir, Pinned):
        return shard_dir.manifest
    path = store.join(shard_dir, MANIFEST)
    where = store.display(shard_dir)
    return store.read_bytes(
        path,
        missing=f"{store.display(path)}: no manifest (is {where} a shard folder made by "
        "`seg preprocess`?)",
    )


def read_manifest(shard_dir: Path | str | Pinned):
    """The split's manifest as a pyarrow Table (schema metadata holds dataset and classes)."""
    return pin(shard_dir).table()


def manifest_info(shard_dir: Path | str | Pinned) -> dict:
    """Dataset name, split, class names, image format and codec recorded in a manifest
    (format_version "1" for shards written before the codecs)."""
    meta = {
        k.decode(): v.decode() for k, v in (read_manifest(shard_dir).schema.metadata or {}).items()
    }
    meta["class_names"] = json.loads(meta["class_names"])
    meta.setdefault("format_version", "1")
    return meta


def class_pixel_counts(
    shard_dir: Path | str | Pinned, keys: frozenset[str] | None = None
) -> np.ndarray:
    """(num_classes,) int64 pixel counts over the split's written samples, or over those of
    `keys` (a fold's training part)."""
    rows = read_manifest(shard_dir).select(["key", "class_pixels"]).to_pylist()
    counts = [
        r["class_pixels"]
        for r in rows
        if r["class_pixels"] is not None and (keys is None or r["key"] in keys)
    ]
    return np.asarray(counts, dtype=np.int64).sum(axis=0)

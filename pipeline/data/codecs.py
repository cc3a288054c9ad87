"""The bytes of shard members: lossless image and label codecs, and the checksums readers check.

A member's codec is named by its extension in the tar (`{key}.image.up.npy.zst`), so a reader
needs nothing else to decode it, and old shards keep decoding:

    image.png         a source PNG's own bytes (`image_format: png`, the demo's)
    image.jpg         a source JPEG's own bytes (CamVid, VOC: `png` keeps them as they are)
    image.up.npy.zst  `image_format: zstd` (the Cityscapes recipe's): uint8 (H, W, 3) with
                      PNG's Up filter (each row minus the row above, mod 256), as .npy, in
                      one zstd frame, level 1
    image.npy         raw uint8 (H, W, 3) in .npy (`npy`)
    label.npy.zst     train ids, uint8 (H, W), .npy in one zstd frame, level 3 (every format;
                      `label.png` in shards before the codecs)
    instance.png      instanceIds: the source's 16-bit PNG bytes (only evaluation reads them;
                      shards.py says why); `instance.npy.zst`, uint16, for other sources

Why (benchmarks/data_path.py on 24 1024x2048 mosaics of real CamVid photos, one AVX2 core:
benchmarks/results/2026-12-06-cpu-data-path.md): the Up filter + zstd level 1 decodes 6.5x
faster than Pillow's PNG and 3.9x faster than libspng's, at 1.06x PNG's bytes, and encodes 27x
faster than PNG level 6. Raw zstd level 3 decodes about as fast (-2 % to +8 % over three runs)
but takes 1.31x PNG's bytes (1.41x on single frames: at the issue's 1.4x limit) and encodes
2.3x slower, which preprocess cannot afford (its 2x over PNG); levels 1-2 raw take 1.5x and
1.35-1.45x; lz4 decodes 2.5x faster but takes 1.8x PNG's bytes; QOI decodes 1.4x slower at
1.15x. The filter turns a photo's rows into small differences that zstd's entropy stage packs
about as well as PNG's deflate, and undoing it is one vectorised add per row (2 ms a frame).
Labels compress ~40x either way, and zstd decodes them 7.6x faster than libspng: labels are
zstd in every format.

`zstd -d x.npy.zst` gives a plain .npy (`np.load`); for images, `np.cumsum(a, axis=0,
dtype=np.uint8)` undoes the filter.

Shard bytes feed DVC's hashes: the compressor is deterministic for a given libzstd and level
(one thread, content size written, no dictionary), and pyproject pins `zstandard`, which
bundles libzstd; `codec_signature()` goes into the manifest and into the content id of
shards in a store, so a new library writes under a new name instead of over the old one.
"""

from __future__ import annotations

import ast
import functools
import io
import threading

import numpy as np

from pipeline.data.pngio import decode_png_bytes
from pipeline.errors import DataError

IMAGE_FORMATS = ("png", "npy", "zstd")
ZSTD_LEVEL = 3  # labels, instanceIds: zstd's own default (higher levels: 2x the encode time)
UP_LEVEL = 1  # Up-filtered images: level 3 saves 7 % of the bytes for 2x the encode time
NPY_ZST = "npy.zst"
UP_NPY_ZST = "up.npy.zst"
_local = threading.local()  # one (de)compressor per thread: they are not thread-safe


def codec_signature() -> str:
    """What decides the encoded bytes: codec, level, library versions (in the manifest)."""
    import zstandard

    lib = ".".join(map(str, zstandard.ZSTD_VERSION))
    return (
        f"images: Up filter + zstd-{UP_LEVEL}, labels: zstd-{ZSTD_LEVEL} (zstandard "
        f"{zstandard.__version__}, libzstd {lib})"
    )


# ----------------------------------------------------------------------------- encoding


def _compressor(level: int = ZSTD_LEVEL):
    cache = _local.__dict__.setdefault("cctx", {})
    c = cache.get(level)
    if c is None:
        import zstandard

        c = cache[level] = zstandard.ZstdCompressor(
            level=level, write_checksum=False, write_content_size=True, threads=0
        )
    return c


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_up_zstd(array: np.ndarray) -> bytes:
    """PNG's Up filter (each row minus the row above, mod 256), then zstd level 1; the
    filtered rows are written straight into the .npy buffer zstd reads."""
    buf, body = _npy_buffer(array.shape, array.dtype)
    body[0] = array[0]
    np.subtract(array[1:], array[:-1], out=body[1:])
    return _compressor(UP_LEVEL).compress(buf)


def _npy_buffer(shape: tuple[int, ...], dtype: np.dtype) -> tuple[memoryview, np.ndarray]:
    """(a .npy file's bytes, to be filled: the array `body` is a view of its data part), in
    this thread's scratch buffer, reused from call to call: a fresh 6 MB buffer costs its
    page faults and zeroing every frame. Valid until the thread's next call."""
    head = io.BytesIO()
    meta = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
            "shape": tuple(shape)}  # fmt: skip
    np.lib.format.write_array_header_1_0(head, meta)
    header = head.getvalue()
    count = int(np.prod(shape, dtype=np.int64))
    size = len(header) + count * np.dtype(dtype).itemsize
    scratch = getattr(_local, "scratch", None)
    if scratch is None or len(scratch) < size:
        scratch = _local.scratch = bytearray(size)
    buf = memoryview(scratch)[:size]
    buf[: len(header)] = header
    return buf, np.frombuffer(scratch, dtype, count, len(header)).reshape(shape)


def decode_up_zstd(data: bytes, where: str = "<bytes>") -> np.ndarray:
    """An `.up.npy.zst` member -> the array (the filter undone in place)."""
    out = decode_zstd(data, where)
    if out.ndim == 0 or out.shape[0] < 2:
        return out
    rows = out.reshape(out.shape[0], -1)
    for y in range(1, rows.shape[0]):  # row by row: numpy's cumsum along axis 0 is 30x slower
        np.add(rows[y], rows[y - 1], out=rows[y])
    return out


def encode_zstd(array: np.ndarray, level: int = ZSTD_LEVEL) -> bytes:
    """An array as a zstd frame of its .npy bytes (deterministic: see the module doc), the
    .npy assembled with one copy of the pixels (np.save into a BytesIO makes two)."""
    buf, body = _npy_buffer(array.shape, array.dtype)
    body[...] = array
    return _compressor(level).compress(buf)


# ----------------------------------------------------------------------------- decoding


def _decompressor():
    d = getattr(_local, "dctx", None)
    if d is None:
        import zstandard

        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def decode_zstd(data: bytes, where: str = "<bytes>") -> np.ndarray:
    """A `.npy.zst` member -> a writable array, decompressed straight into it (one pass, no
    copy of the 6 MB a 1024x2048 frame has)."""
    import zstandard

    try:
        with _decompressor().stream_reader(data, read_across_frames=False) as r:
            pre = r.read(10)  # magic, version, header length (v1: 2 bytes, v2/v3: 4)
            if len(pre) < 10 or pre[:6] != b"\x93NUMPY":
                raise ValueError("not an .npy inside")
            if pre[6] == 1:
                size = int.from_bytes(pre[8:10], "little")
            else:
                size = int.from_bytes(pre[8:10] + r.read(2), "little")
            shape, dtype = _npy_header(r.read(size))
            out = np.empty(shape, dtype)
            view = memoryview(out).cast("B")
            got = 0
            while got < view.nbytes:
                n = r.readinto(view[got:])
                if n == 0:
                    raise ValueError(f"cut short at {got} of {view.nbytes} bytes")
                got += n
    except (zstandard.ZstdError, ValueError, SyntaxError, TypeError, KeyError) as exc:
        raise DataError(f"{where}: cannot decode zstd array ({exc})") from None
    return out


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of an .npy header dict; the frames of a split share a few headers, so
    each is parsed once (literal_eval costs 60 us, a tenth of a label's decode)."""
    d = ast.literal_eval(header.decode("latin1"))
    dtype = np.dtype(d["descr"])
    if d["fortran_order"] or dtype.hasobject:
        raise ValueError("not a C-ordered plain array")
    shape = tuple(int(n) for n in d["shape"])
    return shape, dtype


def decode_member(ext: str, data: bytes, where: str) -> np.ndarray:
    """One image-like member by its extension ("image.png", "label.npy.zst", ...)."""
    codec = ext.split(".", 1)[1] if "." in ext else ""
    if codec == UP_NPY_ZST:
        return decode_up_zstd(data, where)
    if codec == NPY_ZST:
        return decode_zstd(data, where)
    if codec == "npy":
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{where}: cannot decode npy ({exc})") from None
    if codec in ("png", "jpg"):
        return decode_png_bytes(data, where)
    raise DataError(f"{where}: member {ext!r} has an unknown codec")


# ----------------------------------------------------------------------------- checksums


def sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def xxh3(data: bytes) -> str:
    """The checksum training checks each member against (the manifest's `*_xxh3` columns):
    0.3 ms for a 6 MB frame where sha256 takes 5 ms, as long as a zstd decode of it. It
    finds damage and shards swapped under a running reader; sha256 (which evaluation checks)
    is the one that names content."""
    import xxhash

    return xxhash.xxh3_64_hexdigest(data)

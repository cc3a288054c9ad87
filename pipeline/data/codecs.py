"""The bytes of shard members: lossless image and label codecs, and the checksums readers check.

A member's codec is named by its extension in the tar (`{key}.image.npy.zst`), so a reader
needs nothing else to decode it, and old shards keep decoding:

    image.png       a source PNG's own bytes (`image_format: png`, the demo's)
    image.jpg       a source JPEG's own bytes (CamVid, VOC: `png` keeps them as they are)
    image.npy       raw uint8 (H, W, 3) in .npy (`npy`)
    image.npy.zst   the same .npy, zstd level 3 (`zstd`): the Cityscapes recipe's
    label.npy.zst   train ids, uint8 (H, W) (every format; `label.png` in shards before it)
    instance.npy.zst  instanceIds, uint16 (H, W) (`instance.png` before)

Why zstd level 3 (benchmarks/data_path.py, on 1024x2048 mosaics of real CamVid photos, on
the AVX2 floor: benchmarks/results/*-cpu-data-path.md): it decodes 5-7x faster than Pillow's
PNG and 3x faster than libspng's, at 1.3x PNG's bytes (1.38x at most, within the issue's
1.4x). lz4 decodes faster still but takes 1.7-2x PNG's bytes; QOI decodes slower than zstd;
levels 1-2 exceed 1.4x on some frames, levels above 3 encode slower for a few percent. Labels
compress ~40x either way, and zstd decodes them ~10x faster than PNG: labels are zstd in every
format. A `.npy.zst` is a plain zstd frame of a plain `.npy` file (`zstd -d` then `np.load`).

Shard bytes feed DVC's hashes: the compressor is deterministic for a given libzstd and level
(one thread, content size written, no dictionary), and pyproject pins `zstandard`, which
bundles libzstd; `codec_signature()` goes into the manifest and into the content id of
shards in a store, so a new library writes under a new name instead of over the old one.
"""

from __future__ import annotations

import io
import struct
import threading

import numpy as np

from pipeline.data.pngio import decode_png_bytes
from pipeline.errors import DataError

IMAGE_FORMATS = ("png", "npy", "zstd", "zstd-up")
ZSTD_LEVEL = 3  # zstd's own default: the fastest level within 1.4x PNG's bytes (see above)
NPY_ZST = "npy.zst"
_local = threading.local()  # one (de)compressor per thread: they are not thread-safe


def codec_signature() -> str:
    """What decides the encoded bytes: codec, level, library versions (in the manifest)."""
    import zstandard

    lib = ".".join(map(str, zstandard.ZSTD_VERSION))
    return f"zstd-{ZSTD_LEVEL} (zstandard {zstandard.__version__}, libzstd {lib})"


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


UP_LEVEL = 1


def encode_up_zstd(array: np.ndarray) -> bytes:
    """PNG's Up filter (each row minus the row above, mod 256), then zstd level 1."""
    res = array.copy()
    np.subtract(array[1:], array[:-1], out=res[1:])
    return encode_zstd(res, UP_LEVEL)


def decode_up_zstd(data: bytes, where: str = "<bytes>") -> np.ndarray:
    out = decode_zstd(data, where)
    rows = out.reshape(out.shape[0], -1)
    for y in range(1, rows.shape[0]):  # row by row: numpy's cumsum along axis 0 is 30x slower
        np.add(rows[y], rows[y - 1], out=rows[y])
    return out


def encode_zstd(array: np.ndarray, level: int = ZSTD_LEVEL) -> bytes:
    """An array as a zstd frame of its .npy bytes (deterministic: see the module doc), the
    .npy assembled with one copy of the pixels (np.save into a BytesIO makes two)."""
    array = np.ascontiguousarray(array)
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(array))
    header = head.getvalue()
    buf = bytearray(len(header) + array.nbytes)
    buf[: len(header)] = header
    np.frombuffer(buf, np.uint8, array.nbytes, len(header))[:] = array.reshape(-1).view(np.uint8)
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
            version = np.lib.format.read_magic(r)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(r)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(r)
            if fortran or dtype.hasobject:
                raise ValueError("not a C-ordered plain array")
            out = np.empty(shape, dtype)
            view = memoryview(out).cast("B")
            got = 0
            while got < view.nbytes:
                n = r.readinto(view[got:])
                if n == 0:
                    raise ValueError(f"cut short at {got} of {view.nbytes} bytes")
                got += n
    except (zstandard.ZstdError, ValueError, struct.error, EOFError) as exc:
        raise DataError(f"{where}: cannot decode zstd array ({exc})") from None
    return out


def decode_member(ext: str, data: bytes, where: str) -> np.ndarray:
    """One image-like member by its extension ("image.png", "label.npy.zst", ...)."""
    codec = ext.split(".", 1)[1] if "." in ext else ""
    if codec == "up.npy.zst":
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

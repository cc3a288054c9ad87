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

IMAGE_FORMATS = ("png", "npy", "zstd")
ZSTD_LEVEL = 3  # zstd's own default: the fastest level within 1.4x PNG's bytes (see above)
NPY_ZST = "npy.zst"
_local = threading.local()  # one (de)compressor per thread: they are not thread-safe


def codec_signature() -> str:
    """What decides the encoded bytes: codec, level, library versions (in the manifest)."""
    import zstandard

    lib = ".".join(map(str, zstandard.ZSTD_VERSION))
    return f"zstd-{ZSTD_LEVEL} (zstandard {zstandard.__version__}, libzstd {lib})"


# ----------------------------------------------------------------------------- encoding


def _compressor():
    c = getattr(_local, "cctx", None)
    if c is None:
        import zstandard

        c = _local.cctx = zstandard.ZstdCompressor(
            level=ZSTD_LEVEL, write_checksum=False, write_content_size=True, threads=0
        )
    return c


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_zstd(array: np.ndarray) -> bytes:
    """An array as a zstd frame of its .npy bytes (deterministic: see the module doc)."""
    return _compressor().compress(npy_bytes(array))


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

"""PNG (and JPEG) reading with errors that name the file, with the fastest decoder that gives
the same pixels."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import DataError

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_png(path: Path | str, mode: str | None = None) -> np.ndarray:
    """Decode an image file fully (truncated files fail here, not later).

    `mode` converts (e.g. "RGB"); None keeps the stored mode (palette indices stay indices,
    16-bit stays 16-bit).
    """
    if mode is None:
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise DataError(f"{path}: file not found") from None
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc})") from None
        return decode_png_bytes(data, str(path))
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != mode:
                im = im.convert(mode)
            return np.asarray(im).copy()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from None


def is_png(data: bytes) -> bool:
    return data.startswith(_PNG_MAGIC)


def _spng_can(data: bytes) -> bool:
    """PNGs libspng decodes exactly as Pillow does (tests/test_codecs.py checks): 8-bit gray,
    RGB and RGBA, and 16-bit gray (Cityscapes' instanceIds), not interlaced. Palette PNGs (VOC
    labels: the indices are the class ids) and the rest go to Pillow, which keeps indices as
    indices."""
    if len(data) < 33 or not is_png(data) or data[12:16] != b"IHDR":
        return False
    depth, colour, interlace = data[24], data[25], data[28]
    return interlace == 0 and ((depth == 8 and colour in (0, 2, 6)) or (depth, colour) == (16, 0))


def decode_png_bytes(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """A PNG or JPEG file's bytes -> its array as stored (gray, RGB, RGBA, 16-bit, palette
    indices), writable. Plain PNGs with libspng (pyspng: 1.9x Pillow's speed on 1024x2048
    photos, benchmarks/data_path.py), the rest with Pillow. Without pyspng (a platform it has
    no wheel for), Pillow decodes everything. pyspng holds the GIL while it decodes: several
    threads of it decode no faster than one (scoring reads in processes)."""
    if _spng_can(data) and _pyspng() is not None:
        try:
            out = _pyspng().load(data)
        except Exception as exc:  # libspng's errors share no class
            raise DataError(f"{source}: cannot decode image ({exc})") from None
        if out.dtype == np.uint16 and out.ndim == 3:  # pyspng 0.1.4: 16-bit gray as (gray,
            out = np.ascontiguousarray(out[..., 0])  # alpha 65535); the gray is Pillow's
        return out
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.array(im)  # one copy, writable
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{source}: cannot decode image ({exc})") from None


@functools.cache
def _pyspng():
    try:
        import pyspng
    except ImportError:
        return None
    return pyspng


def encode_png(array: np.ndarray, compress_level: int = 1) -> bytes:
    """Encode (H, W) uint8/uint16 or (H, W, 3) uint8 as PNG bytes, deterministically."""
    buf = io.BytesIO()
    im = Image.fromarray(array)  # uint16 (H, W) -> "I;16", uint8 (H, W, 3) -> "RGB"
    im.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()

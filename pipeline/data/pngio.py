"""PNG reading with errors that name the file."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import DataError


def read_png(path: Path | str, mode: str | None = None) -> np.ndarray:
    """Decode an image file fully (truncated files fail here, not later).

    `mode` converts (e.g. "RGB"); None keeps the stored mode (palette indices stay indices,
    16-bit stays 16-bit).
    """
    try:
        with Image.open(path) as im:
            im.load()
            if mode is not None and im.mode != mode:
                im = im.convert(mode)
            return np.asarray(im).copy()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from None


def decode_png_bytes(data: bytes, source: str = "<bytes>") -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.array(im)  # one copy, writable
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{source}: cannot decode image ({exc})") from None


def encode_png(array: np.ndarray, compress_level: int = 1) -> bytes:
    """Encode (H, W) uint8/uint16 or (H, W, 3) uint8 as PNG bytes, deterministically."""
    buf = io.BytesIO()
    im = Image.fromarray(array)  # uint16 (H, W) -> "I;16", uint8 (H, W, 3) -> "RGB"
    im.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()

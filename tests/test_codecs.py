"""Shard member codecs: bit-exact round trips on real pixels, the fast PNG decoder against
Pillow, byte-stable output, damaged members named."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from conftest import SAMPLE_ROOT, SHARED_DATA, needs_sample
from PIL import Image

from pipeline.data import codecs
from pipeline.data.pngio import _spng_can, decode_png_bytes, read_png
from pipeline.errors import DataError

FRAME = "frankfurt/frankfurt_000000_000294"
CAMVID = SHARED_DATA / "camvid"
needs_camvid = pytest.mark.skipif(not CAMVID.is_dir(), reason=f"no CamVid at {CAMVID}")


def _pillow(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im)


def _real() -> dict[str, bytes]:
    """The real Cityscapes frame's files: RGB photo, 8-bit labelIds, 16-bit instanceIds."""
    return {
        "image": (SAMPLE_ROOT / f"leftImg8bit/val/{FRAME}_leftImg8bit.png").read_bytes(),
        "label": (SAMPLE_ROOT / f"gtFine/val/{FRAME}_gtFine_labelIds.png").read_bytes(),
        "instance": (SAMPLE_ROOT / f"gtFine/val/{FRAME}_gtFine_instanceIds.png").read_bytes(),
    }


@needs_sample
def test_every_codec_round_trips_real_pixels_bit_exact():
    files = _real()
    image, label, instance = (_pillow(files[k]) for k in ("image", "label", "instance"))
    assert image.shape[2] == 3 and label.dtype == np.uint8 and instance.dtype == np.uint16
    crop = np.ascontiguousarray(image[40:104, 17:145])  # odd offsets: no alignment luck
    for array in (image, crop, label, instance, label[5:37, 3:70]):
        for ext, data in (
            ("image.up.npy.zst", codecs.encode_up_zstd(array)),  # image_format zstd
            ("label.npy.zst", codecs.encode_zstd(array)),  # labels, instanceIds
            ("image.npy", codecs.npy_bytes(array)),
        ):
            out = codecs.decode_member(ext, data, "test")
            assert out.dtype == array.dtype and np.array_equal(out, array), ext
            assert out.flags.writeable and out.flags.c_contiguous
    # png: the source's own bytes, decoded by the fast decoder as Pillow decodes them
    for name, data in files.items():
        assert np.array_equal(codecs.decode_member(f"{name}.png", data, "test"), _pillow(data))


@needs_sample
@needs_camvid
def test_the_fast_png_decoder_gives_pillows_pixels_or_leaves_the_png_to_pillow(tmp_path):
    files = _real()
    assert all(_spng_can(data) for data in files.values())  # RGB, 8-bit and 16-bit gray
    for data in files.values():
        assert np.array_equal(decode_png_bytes(data), _pillow(data))
    camvid_label = next(iter(sorted((CAMVID / "trainannot").glob("*.png"))))
    data = camvid_label.read_bytes()
    assert np.array_equal(decode_png_bytes(data), _pillow(data))
    # a palette PNG (VOC's labels): the indices are the class ids, never expanded to RGB
    indices = np.zeros((8, 8), np.uint8)
    indices[2:5, 3:7] = 15
    im = Image.fromarray(indices, mode="P")
    im.putpalette([0, 0, 0, 128, 0, 0] * 128)
    im.save(tmp_path / "p.png")
    assert not _spng_can((tmp_path / "p.png").read_bytes())
    assert np.array_equal(read_png(tmp_path / "p.png"), indices)
    # a JPEG source (CamVid's frames) decodes as Pillow decodes it
    jpeg = next(iter(sorted((CAMVID / "train").glob("*.jpg")))).read_bytes()
    assert np.array_equal(decode_png_bytes(jpeg), _pillow(jpeg))


def test_zstd_bytes_are_those_recorded_for_this_library_and_levels():
    """Shard bytes feed DVC's hashes and store prefixes: the bytes of a fixed array are those
    recorded with zstandard 0.25.0 (libzstd 1.5.7), labels at level 3, Up-filtered images at
    level 1. If this fails, the library or its settings changed the output: bump
    shards.FORMAT_VERSION (new content ids) and say so."""
    rng = np.random.default_rng(0)
    array = (rng.integers(0, 8, (64, 96, 3)) * 31).astype(np.uint8)  # compressible, not flat
    label, image = codecs.encode_zstd(array), codecs.encode_up_zstd(array)
    assert label == codecs.encode_zstd(array) and image == codecs.encode_up_zstd(array)
    assert codecs.codec_signature() == (
        "images: Up filter + zstd-1, labels: zstd-3 (zstandard 0.25.0, libzstd 1.5.7)"
    )
    assert hashlib.sha256(label).hexdigest() == RECORDED["label"]
    assert hashlib.sha256(image).hexdigest() == RECORDED["image"]


RECORDED = {
    "label": "5c9517cd3ce9169f69dc969549a211f33722a338b47260c41324da0487055a34",
    "image": "f71b56968cbb51317ca44186d92a6919470d28fe5d94032483961a1ae3d77ee1",
}


def test_a_damaged_member_fails_in_one_line_naming_it():
    label = np.arange(64 * 32, dtype=np.uint16).reshape(32, 64)
    data = bytearray(codecs.encode_zstd(label))
    for cut in (data[:-20], data[:12]):
        with pytest.raises(DataError, match=r"^shard-000003.tar:k: cannot decode zstd array"):
            codecs.decode_member("instance.npy.zst", bytes(cut), "shard-000003.tar:k")
    with pytest.raises(DataError, match="unknown codec"):
        codecs.decode_member("image.webp", b"RIFF", "x")
    # a flipped byte the decoder does not notice is what the manifest's checksums are for
    data[-5] ^= 0xFF
    assert codecs.xxh3(bytes(data)) != codecs.xxh3(codecs.encode_zstd(label))

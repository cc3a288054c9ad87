"""CamVid in the SegNet layout: `{split}/` frames, `{split}annot/` label PNGs of the same stem.

    {root}/train/0001TP_006690.png (or .jpg)   RGB frame
    {root}/trainannot/0001TP_006690.png        one uint8 channel: 0..10 class id, 11 void
    {root}/val/ valannot/ test/ testannot/     the same for the other splits

The frame name is `{sequence}_{frame}`; the sequence (0001TP, 0006R0, 0016E5, Seq05VD: four
drives through Cambridge) goes into the sample's meta, so the manifest can keep the frames of
one drive together (grouped k-fold: neighbouring video frames are near-duplicates).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.adapter import SourceSample, read_index_label
from pipeline.data.labels import get_spec
from pipeline.errors import DataError

# The SegNet tutorial ships PNG frames; a copy re-encoded to save space has JPEGs.
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")


class CamVidAdapter:
    """Samples of `{root}/{split}` with labels in `{root}/{split}annot`; key = the file stem."""

    splits = ("train", "val", "test")

    def __init__(self) -> None:
        self.spec = get_spec("camvid")

    def samples(self, root: Path, split: str) -> list[SourceSample]:
        root = Path(root)
        img_dir, ann_dir = root / split, root / f"{split}annot"
        for folder in (img_dir, ann_dir):
            if not folder.is_dir():
                raise DataError(
                    f"{folder}: no such folder (expected a CamVid root in the SegNet layout: "
                    f"{split}/ and {split}annot/)"
                )
        frames: dict[str, Path] = {}
        for image in sorted(img_dir.iterdir()):
            if image.suffix.lower() not in FRAME_SUFFIXES or not image.is_file():
                continue
            if image.stem in frames:
                raise DataError(
                    f"{image}: frame {image.stem!r} exists twice ({frames[image.stem].name}); "
                    "keep one of them"
                )
            frames[image.stem] = image
        if not frames:
            raise DataError(f"{img_dir}: split {split!r} has no .png or .jpg frames")
        out = []
        for key, image in sorted(frames.items()):
            sequence, sep, _ = key.partition("_")
            if not sep or not sequence:
                raise DataError(
                    f"{image}: cannot tell the sequence of this frame (expected a name like "
                    "0016E5_07959 or Seq05VD_f00000: {sequence}_{frame})"
                )
            # a missing label PNG is reported when the sample is converted (as for Cityscapes),
            # so `seg preprocess --skip-bad` can skip it
            label = ann_dir / f"{key}.png"
            out.append(SourceSample(key=key, image=image, label=label, meta={"sequence": sequence}))
        return out

    def read_label(self, sample: SourceSample) -> np.ndarray:
        assert sample.label is not None
        return read_index_label(
            sample.label, self.spec, "CamVid labels must be single-channel PNGs whose value is "
            "the class id (0-10, 11 void), got shape {shape}",
        )  # fmt: skip

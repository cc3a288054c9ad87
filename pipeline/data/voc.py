"""PASCAL VOC 2012 segmentation: `JPEGImages/`, `SegmentationClass/`, `ImageSets/Segmentation/`.

Label PNGs are palette ("P") images whose palette index is the class (0 background .. 20
tvmonitor, 255 boundary / ignore): they are read as indices, never converted to RGB (the
colour is only the devkit's display palette). Index ("L") PNGs, like the SBD-augmented
`SegmentationClassAug`, are read the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.adapter import SourceSample, read_index_label
from pipeline.data.labels import get_spec
from pipeline.errors import DataError


class VOCAdapter:
    """`ImageSets/Segmentation/{split}.txt` lists ids; `JPEGImages/{id}.jpg` + `{label_dir}/{id}.png`.

    `label_dir`: "SegmentationClass" (the devkit) or e.g. "SegmentationClassAug" (SBD, 10582
    `train_aug` ids). The VOC test split has no public labels: its samples get `label=None`.
    """

    splits = ("train", "val", "trainval", "test")

    def __init__(self, label_dir: str = "SegmentationClass") -> None:
        self.spec = get_spec("voc")
        self.label_dir = label_dir

    def samples(self, root: Path, split: str) -> list[SourceSample]:
        root = Path(root)
        listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not listing.is_file():
            raise DataError(
                f"{listing}: no such file (expected a VOC2012 root with ImageSets/Segmentation/{split}.txt)"
            )
        ids = sorted({line.split()[0] for line in listing.read_text().splitlines() if line.strip()})
        if not ids:
            raise DataError(f"{listing}: split {split!r} lists no image ids")
        out = []
        for key in ids:
            image = root / "JPEGImages" / f"{key}.jpg"
            if not image.is_file():
                raise DataError(f"{image}: missing image for id {key!r} listed in {listing}")
            label: Path | None = root / self.label_dir / f"{key}.png"
            if not label.is_file():
                if split != "test":
                    raise DataError(f"{label}: missing label for image {image}")
                label = None
            out.append(SourceSample(key=key, image=image, label=label))
        return out

    def read_label(self, sample: SourceSample) -> np.ndarray:
        assert sample.label is not None
        return read_index_label(
            sample.label, self.spec, "VOC labels must be palette (P) or index (L) PNGs whose "
            "pixel value is the class, got a colour image of shape {shape}; use the devkit's "
            "SegmentationClass PNGs or convert colours to class indices first",
        )  # fmt: skip

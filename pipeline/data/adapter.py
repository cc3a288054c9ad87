"""What every dataset adapter returns and shares: `SourceSample` (paths only, cheap), the
`Adapter` protocol, and the reader of index-valued label PNGs.

The adapters (sources.py's Cityscapes, camvid.py, voc.py, vkitti.py) import this module;
sources.get_adapter imports the adapters. Nothing here imports an adapter, so the imports
point one way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline.data.labels import DatasetSpec
from pipeline.data.pngio import read_png
from pipeline.errors import DataError


@dataclass(frozen=True)
class SourceSample:
    key: str  # frame id, e.g. "frankfurt_000000_000294"; the shard sample key
    image: Path
    label: Path | None  # None for splits without labels (Cityscapes test)
    instance: Path | None = None  # instanceIds PNG (Cityscapes: id*1000+n), for iIoU
    meta: dict = field(default_factory=dict)  # e.g. {"city": "frankfurt"}

    @property
    def group(self) -> str | None:
        """What grouped k-fold keeps in one fold: the frame's city (Cityscapes), sequence
        (CamVid) or scene (Virtual KITTI 2: every variation of a scene renders the same frames);
        None where frames are independent photos (VOC)."""
        return next((str(self.meta[k]) for k in GROUP_META if k in self.meta), None)


GROUP_META = ("city", "sequence", "scene")  # meta keys naming a sample's group, by dataset


class Adapter(Protocol):
    spec: DatasetSpec

    def samples(self, root: Path, split: str) -> list[SourceSample]:
        """Samples of `split` under `root`, sorted by key. Raises DataError if none."""
        ...

    def read_label(self, sample: SourceSample) -> np.ndarray:
        """(H, W) uint8 train ids of a sample; DataError names the file if it is bad."""
        ...


def read_index_label(path: Path, spec: DatasetSpec, bad_shape: str) -> np.ndarray:
    """(H, W) uint8 train ids of a label PNG whose pixel value is the dataset's label id
    ("L", "P" or "1"); a colour PNG is a DataError naming the file (`bad_shape`, with {shape})."""
    ids = read_png(path)  # "P" / "L" stay indices: no mode conversion
    if ids.ndim != 2:
        raise DataError(f"{path}: " + bad_shape.format(shape=ids.shape))
    if ids.dtype == bool:  # mode "1"
        ids = ids.astype(np.uint8)
    return spec.to_train_ids(ids, source=str(path))

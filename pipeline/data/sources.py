"""Dataset adapters: find the samples of a split on disk and read their labels.

An adapter knows one dataset's folder layout. It returns `SourceSample`s (paths only, cheap)
and turns a sample's label file into train ids. Everything after it (shards, training,
evaluation) sees only train ids and the adapter's `DatasetSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline.data.labels import DATASETS, DatasetSpec, get_spec
from pipeline.data.pngio import read_png
from pipeline.errors import ConfigError, DataError


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


class CityscapesAdapter:
    """`leftImg8bit/{split}/{city}/{key}_leftImg8bit.png` + `gtFine/.../{key}_gtFine_labelIds.png`."""

    splits = ("train", "val", "test", "train_extra")

    def __init__(self) -> None:
        self.spec = get_spec("cityscapes")

    def samples(self, root: Path, split: str) -> list[SourceSample]:
        root = Path(root)
        img_dir = root / "leftImg8bit" / split
        if not img_dir.is_dir():
            raise DataError(
                f"{img_dir}: no such folder (expected a Cityscapes root with leftImg8bit/{split}/)"
            )
        has_labels = split != "test"  # the test split's gtFine is a dummy: shard its images alone
        out = []
        for img in sorted(img_dir.glob("*/*_leftImg8bit.png")):
            key = img.name[: -len("_leftImg8bit.png")]
            city = img.parent.name
            gt = root / "gtFine" / split / city
            label = gt / f"{key}_gtFine_labelIds.png" if has_labels else None
            inst = gt / f"{key}_gtFine_instanceIds.png" if has_labels else None
            out.append(
                SourceSample(
                    key=key,
                    image=img,
                    label=label,
                    instance=inst if inst is not None and inst.is_file() else None,
                    meta={"city": city},
                )
            )
        if not out:
            raise DataError(f"{img_dir}: split {split!r} has no *_leftImg8bit.png images")
        return out

    def read_label(self, sample: SourceSample) -> np.ndarray:
        assert sample.label is not None
        return read_index_label(
            sample.label, self.spec, "labelIds must be a single-channel PNG, got shape {shape}"
        )


def read_index_label(path: Path, spec: DatasetSpec, bad_shape: str) -> np.ndarray:
    """(H, W) uint8 train ids of a label PNG whose pixel value is the dataset's label id
    ("L", "P" or "1"); a colour PNG is a DataError naming the file (`bad_shape`, with {shape})."""
    ids = read_png(path)  # "P" / "L" stay indices: no mode conversion
    if ids.ndim != 2:
        raise DataError(f"{path}: " + bad_shape.format(shape=ids.shape))
    if ids.dtype == bool:  # mode "1"
        ids = ids.astype(np.uint8)
    return spec.to_train_ids(ids, source=str(path))


def get_adapter(dataset: str) -> Adapter:
    """The adapter for a dataset name; unknown names list the valid ones."""
    match dataset:
        case "cityscapes":
            return CityscapesAdapter()
        case "voc":
            from pipeline.data.voc import VOCAdapter

            return VOCAdapter()
        case "vkitti2":
            from pipeline.data.vkitti import VKitti2Adapter

            return VKitti2Adapter()
        case "camvid":
            from pipeline.data.camvid import CamVidAdapter

            return CamVidAdapter()
    raise ConfigError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")

"""Dataset adapters: find the samples of a split on disk and read their labels.

An adapter knows one dataset's folder layout. It returns `SourceSample`s (paths only, cheap)
and turns a sample's label file into train ids. Everything after it (shards, training,
evaluation) sees only train ids and the adapter's `DatasetSpec`. The Cityscapes adapter is
here; the others (camvid.py, voc.py, vkitti.py) are loaded by `get_adapter` only for their
dataset, and import only adapter.py (the shared types), never this module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.adapter import Adapter, SourceSample, read_index_label
from pipeline.data.labels import DATASETS, get_spec
from pipeline.errors import ConfigError, DataError


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

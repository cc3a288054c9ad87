"""Label tables: each dataset owns its class names, palette and ignore handling.

Nothing downstream hard-codes Cityscapes: stages look a `DatasetSpec` up by name with
`get_spec` and use its `class_names`, `palette` and `to_train_ids`.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from pipeline.errors import ConfigError, DataError

IGNORE_INDEX = 255
_UNKNOWN = 254  # a label id outside a dataset's table, while mapping (no dataset has 254 classes)


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset's labels mean.

    `label_to_train` is a 256-entry lookup from the raw ids stored in label PNGs to train ids
    (`IGNORE_INDEX` for void / ignored); `valid_label_ids` says which raw ids the table knows,
    so an id outside it is an error rather than silently ignored.
    """

    name: str
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]  # colour per train id
    label_to_train: np.ndarray = field(repr=False)  # (256,) uint8
    valid_label_ids: np.ndarray = field(repr=False)  # (256,) bool
    train_to_label: tuple[int, ...] | None = None  # train id -> raw id (Cityscapes labelIds)
    class_categories: tuple[str, ...] | None = None  # category name per train id
    instance_classes: tuple[bool, ...] | None = None  # train id has instances (iIoU)
    ignore_index: int = IGNORE_INDEX

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_train_ids(self, label_ids: np.ndarray, source: str = "<array>") -> np.ndarray:
        """Map raw label ids (H, W) to train ids (H, W) uint8; unknown ids raise DataError."""
        if label_ids.dtype != np.uint8:
            if label_ids.min(initial=0) < 0 or label_ids.max(initial=0) > 255:
                raise DataError(f"{source}: label ids outside 0..255 for dataset {self.name}")
            label_ids = label_ids.astype(np.uint8)
        # unknown ids map to a marker no dataset uses, looked for after one pass (np.take:
        # 2x faster than fancy indexing), instead of counting every id first
        train_ids = np.take(self._checked_lut, label_ids)
        if (train_ids == _UNKNOWN).any():
            present = np.flatnonzero(count_ids(label_ids))
            unknown = present[~self.valid_label_ids[present]]
            raise DataError(
                f"{source}: label id(s) {unknown.tolist()} are not in the {self.name} label table"
            )
        return train_ids

    @functools.cached_property
    def _checked_lut(self) -> np.ndarray:
        lut = self.label_to_train.copy()
        lut[~self.valid_label_ids] = _UNKNOWN
        return lut

    def to_label_ids(self, train_ids: np.ndarray) -> np.ndarray:
        """Map train ids back to raw ids (the Cityscapes test-server format)."""
        if self.train_to_label is None:
            return train_ids.astype(np.uint8)
        lut = np.zeros(256, dtype=np.uint8)
        lut[: self.num_classes] = self.train_to_label
        return lut[train_ids]

    def colorize(self, train_ids: np.ndarray) -> np.ndarray:
        """(H, W) train ids -> (H, W, 3) uint8 colours; ignore is black."""
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[: self.num_classes] = np.asarray(self.palette, dtype=np.uint8)
        return lut[train_ids]


def count_ids(ids: np.ndarray) -> np.ndarray:
    """(256,) int64 pixel count of each value of a uint8 array. Where torch is loaded already
    (training, scoring), its uint8 bincount: 2.5 ms for a 1024x2048 label where numpy's (which
    widens to int64 first) takes 5; preprocess workers do not load torch for it (1-3 s each)."""
    flat = np.ascontiguousarray(ids).reshape(-1)
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.bincount(torch.from_numpy(flat), minlength=256).numpy()
    # numpy widens every element to int64 first: count pixel pairs (uint16, half the
    # elements), then fold the 256 x 256 table: 2.5 ms instead of 4.4
    even = flat[: flat.size // 2 * 2]
    pairs = np.bincount(even.view(np.uint16), minlength=65536).reshape(256, 256)
    counts = pairs.sum(0) + pairs.sum(1)
    if flat.size % 2:
        counts[flat[-1]] += 1
    return counts


class CityscapesLabel(NamedTuple):
    """One row of the official Cityscapes label table (cityscapesscripts.helpers.labels)."""

    name: str
    id: int  # the value in *_labelIds.png
    train_id: int  # 0..18 for the 19 evaluated classes; 255 or -1: not trained, not evaluated
    category: str
    category_id: int
    has_instances: bool
    ignore_in_eval: bool
    color: tuple[int, int, int]


# The official table, copied from cityscapesscripts 2.2 (helpers/labels.py) so that training,
# evaluation and prediction run where cityscapesscripts is not installed (a lean GPU node).
# tests/test_adapters.py checks it row for row against cityscapesscripts where it is.
CITYSCAPES_LABELS: tuple[CityscapesLabel, ...] = tuple(
    CityscapesLabel(*row)
    for row in (
        ("unlabeled", 0, 255, "void", 0, False, True, (0, 0, 0)),
        ("ego vehicle", 1, 255, "void", 0, False, True, (0, 0, 0)),
        ("rectification border", 2, 255, "void", 0, False, True, (0, 0, 0)),
        ("out of roi", 3, 255, "void", 0, False, True, (0, 0, 0)),
        ("static", 4, 255, "void", 0, False, True, (0, 0, 0)),
        ("dynamic", 5, 255, "void", 0, False, True, (111, 74, 0)),
        ("ground", 6, 255, "void", 0, False, True, (81, 0, 81)),
        ("road", 7, 0, "flat", 1, False, False, (128, 64, 128)),
        ("sidewalk", 8, 1, "flat", 1, False, False, (244, 35, 232)),
        ("parking", 9, 255, "flat", 1, False, True, (250, 170, 160)),
        ("rail track", 10, 255, "flat", 1, False, True, (230, 150, 140)),
        ("building", 11, 2, "construction", 2, False, False, (70, 70, 70)),
        ("wall", 12, 3, "construction", 2, False, False, (102, 102, 156)),
        ("fence", 13, 4, "construction", 2, False, False, (190, 153, 153)),
        ("guard rail", 14, 255, "construction", 2, False, True, (180, 165, 180)),
        ("bridge", 15, 255, "construction", 2, False, True, (150, 100, 100)),
        ("tunnel", 16, 255, "construction", 2, False, True, (150, 120, 90)),
        ("pole", 17, 5, "object", 3, False, False, (153, 153, 153)),
        ("polegroup", 18, 255, "object", 3, False, True, (153, 153, 153)),
        ("traffic light", 19, 6, "object", 3, False, False, (250, 170, 30)),
        ("traffic sign", 20, 7, "object", 3, False, False, (220, 220, 0)),
        ("vegetation", 21, 8, "nature", 4, False, False, (107, 142, 35)),
        ("terrain", 22, 9, "nature", 4, False, False, (152, 251, 152)),
        ("sky", 23, 10, "sky", 5, False, False, (70, 130, 180)),
        ("person", 24, 11, "human", 6, True, False, (220, 20, 60)),
        ("rider", 25, 12, "human", 6, True, False, (255, 0, 0)),
        ("car", 26, 13, "vehicle", 7, True, False, (0, 0, 142)),
        ("truck", 27, 14, "vehicle", 7, True, False, (0, 0, 70)),
        ("bus", 28, 15, "vehicle", 7, True, False, (0, 60, 100)),
        ("caravan", 29, 255, "vehicle", 7, True, True, (0, 0, 90)),
        ("trailer", 30, 255, "vehicle", 7, True, True, (0, 0, 110)),
        ("train", 31, 16, "vehicle", 7, True, False, (0, 80, 100)),
        ("motorcycle", 32, 17, "vehicle", 7, True, False, (0, 0, 230)),
        ("bicycle", 33, 18, "vehicle", 7, True, False, (119, 11, 32)),
        ("license plate", -1, -1, "vehicle", 7, False, True, (0, 0, 142)),
    )
)
CITYSCAPES_BY_NAME = {lab.name: lab for lab in CITYSCAPES_LABELS}


def _cityscapes() -> DatasetSpec:
    # 19 evaluated classes, everything else 255. License plate has id -1: it never appears in
    # labelIds PNGs (it is drawn as its parent, car), so it has no slot in the 0..255 lookup.
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    valid = np.zeros(256, dtype=bool)
    by_train: dict[int, CityscapesLabel] = {}
    for lab in CITYSCAPES_LABELS:
        if lab.id < 0:
            continue
        valid[lab.id] = True
        if lab.train_id not in (255, -1):
            lut[lab.id] = lab.train_id
            by_train[lab.train_id] = lab
    ordered = [by_train[t] for t in range(len(by_train))]
    return DatasetSpec(
        name="cityscapes",
        class_names=tuple(lab.name for lab in ordered),
        palette=tuple(lab.color for lab in ordered),
        label_to_train=lut,
        valid_label_ids=valid,
        train_to_label=tuple(lab.id for lab in ordered),
        class_categories=tuple(lab.category for lab in ordered),
        instance_classes=tuple(lab.has_instances for lab in ordered),
    )


VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def voc_palette(n: int = 256) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map (bit-interleaved class index), as in the devkit."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


def _voc() -> DatasetSpec:
    # SegmentationClass PNGs are palette images whose index is the class; 255 marks
    # object boundaries and "difficult" pixels and is ignored.
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[:21] = np.arange(21)
    valid = np.zeros(256, dtype=bool)
    valid[:21] = True
    valid[255] = True
    return DatasetSpec(
        name="voc",
        class_names=VOC_CLASSES,
        palette=tuple(voc_palette(21)),
        label_to_train=lut,
        valid_label_ids=valid,
    )


# Virtual KITTI 2 classes in the order of its colors.txt; colours are that file's.
VKITTI2_CLASSES = (
    ("Terrain", (210, 0, 200)), ("Sky", (90, 200, 255)), ("Tree", (0, 199, 0)),
    ("Vegetation", (90, 240, 0)), ("Building", (140, 140, 140)), ("Road", (100, 60, 100)),
    ("GuardRail", (250, 100, 255)), ("TrafficSign", (255, 255, 0)),
    ("TrafficLight", (200, 200, 0)), ("Pole", (255, 130, 0)), ("Misc", (80, 80, 80)),
    ("Truck", (160, 60, 60)), ("Car", (255, 127, 80)), ("Van", (0, 139, 139)),
)  # fmt: skip


def vkitti2_spec(
    classes: tuple[tuple[str, tuple[int, int, int]], ...] = VKITTI2_CLASSES,
) -> DatasetSpec:
    """Virtual KITTI 2: colour masks are mapped to class indices by the adapter through
    colors.txt, so the stored label PNG already holds train ids ("Undefined" -> 255)."""
    return _identity_spec("vkitti2", classes, (*range(len(classes)), IGNORE_INDEX))


def _identity_spec(name: str, classes: tuple, valid_ids) -> DatasetSpec:
    """A dataset whose label PNG value is the class index (0..n-1, anything else -> 255);
    `valid_ids` are the values a label may hold at all (the rest are a named error)."""
    n = len(classes)
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[:n] = np.arange(n)
    valid = np.zeros(256, dtype=bool)
    valid[list(valid_ids)] = True
    return DatasetSpec(
        name=name,
        class_names=tuple(c[0] for c in classes),
        palette=tuple(c[1] for c in classes),
        label_to_train=lut,
        valid_label_ids=valid,
    )


# CamVid in the 11-class split of SegNet (Badrinarayanan et al. 2017), the split every later
# paper reports: label PNG value = class id, 11 = "Unlabelled" (void). Colours are the SegNet
# tutorial's (Scripts/test_segmentation_camvid.py, `label_colours`), where Road_marking is
# already merged into Road.
CAMVID_CLASSES = (
    ("Sky", (128, 128, 128)), ("Building", (128, 0, 0)), ("Pole", (192, 192, 128)),
    ("Road", (128, 64, 128)), ("Pavement", (60, 40, 222)), ("Tree", (128, 128, 0)),
    ("SignSymbol", (192, 128, 128)), ("Fence", (64, 64, 128)), ("Car", (64, 0, 128)),
    ("Pedestrian", (64, 64, 0)), ("Bicyclist", (0, 128, 192)),
)  # fmt: skip
CAMVID_VOID = 11


def _camvid() -> DatasetSpec:
    # 0..10 classes, 11 void (-> 255); anything else is not CamVid
    return _identity_spec("camvid", CAMVID_CLASSES, range(CAMVID_VOID + 1))


_SPECS = {"cityscapes": _cityscapes, "voc": _voc, "vkitti2": vkitti2_spec, "camvid": _camvid}
DATASETS = tuple(_SPECS)  # the valid `data.dataset` names
_CACHE: dict[str, DatasetSpec] = {}


def get_spec(name: str) -> DatasetSpec:
    """The label table of a dataset by name; unknown names list the valid ones."""
    if name not in _SPECS:
        raise ConfigError(f"unknown dataset {name!r}; valid: {', '.join(sorted(_SPECS))}")
    if name not in _CACHE:
        _CACHE[name] = _SPECS[name]()
    return _CACHE[name]

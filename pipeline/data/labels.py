"""Label tables: each dataset owns its class names, palette and ignore handling.

Nothing downstream hard-codes Cityscapes: stages look a `DatasetSpec` up by name with
`get_spec` and use its `class_names`, `palette` and `to_train_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import ConfigError, DataError

IGNORE_INDEX = 255


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
        present = np.flatnonzero(np.bincount(label_ids.ravel(), minlength=256))
        unknown = present[~self.valid_label_ids[present]]
        if unknown.size:
            raise DataError(
                f"{source}: label id(s) {unknown.tolist()} are not in the {self.name} label table"
            )
        return self.label_to_train[label_ids]

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


def _cityscapes() -> DatasetSpec:
    # The official table (cityscapesscripts.helpers.labels): 19 evaluated classes,
    # everything else 255. License plate has id -1: it never appears in labelIds PNGs
    # (it is drawn as its parent, car), so it has no slot in the 0..255 lookup.
    from cityscapesscripts.helpers.labels import labels

    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    valid = np.zeros(256, dtype=bool)
    by_train: dict[int, object] = {}
    for lab in labels:
        if lab.id < 0:
            continue
        valid[lab.id] = True
        if lab.trainId not in (255, -1):
            lut[lab.id] = lab.trainId
            by_train[lab.trainId] = lab
    ordered = [by_train[t] for t in range(len(by_train))]
    return DatasetSpec(
        name="cityscapes",
        class_names=tuple(lab.name for lab in ordered),
        palette=tuple(tuple(lab.color) for lab in ordered),
        label_to_train=lut,
        valid_label_ids=valid,
        train_to_label=tuple(lab.id for lab in ordered),
        class_categories=tuple(lab.category for lab in ordered),
        instance_classes=tuple(bool(lab.hasInstances) for lab in ordered),
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
    n = len(classes)
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[:n] = np.arange(n)
    valid = np.zeros(256, dtype=bool)
    valid[:n] = True
    valid[IGNORE_INDEX] = True
    return DatasetSpec(
        name="vkitti2",
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
    n = len(CAMVID_CLASSES)
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[:n] = np.arange(n)
    valid = np.zeros(256, dtype=bool)
    valid[: CAMVID_VOID + 1] = True  # 0..10 classes, 11 void; anything else is not CamVid
    return DatasetSpec(
        name="camvid",
        class_names=tuple(c[0] for c in CAMVID_CLASSES),
        palette=tuple(c[1] for c in CAMVID_CLASSES),
        label_to_train=lut,
        valid_label_ids=valid,
    )


_SPECS = {"cityscapes": _cityscapes, "voc": _voc, "vkitti2": vkitti2_spec, "camvid": _camvid}
_CACHE: dict[str, DatasetSpec] = {}


def get_spec(name: str) -> DatasetSpec:
    """The label table of a dataset by name; unknown names list the valid ones."""
    if name not in _SPECS:
        raise ConfigError(f"unknown dataset {name!r}; valid: {', '.join(sorted(_SPECS))}")
    if name not in _CACHE:
        _CACHE[name] = _SPECS[name]()
    return _CACHE[name]

"""PASCAL VOC and Virtual KITTI 2 adapters on tiny fake roots in the real layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.labels import VKITTI2_CLASSES, voc_palette
from pipeline.data.sources import get_adapter
from pipeline.data.vkitti import VKitti2Adapter
from pipeline.data.voc import VOCAdapter
from pipeline.errors import ConfigError, DataError

H, W = 12, 20


def _jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, quality=90)


# ---- PASCAL VOC --------------------------------------------------------------------------


def _voc_label(path: Path, indices: np.ndarray, mode: str = "P") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(indices.astype(np.uint8))  # "L"
    if mode == "P":
        im = im.convert("P")  # keep values as indices ...
        im.putpalette([c for rgb in voc_palette(256) for c in rgb])  # ... under the devkit palette
        assert np.array_equal(np.asarray(im), indices)
    elif mode == "RGB":
        im = Image.fromarray(np.asarray(voc_palette(256), dtype=np.uint8)[indices])
    im.save(path)


def _voc_indices(seed: int) -> np.ndarray:
    ids = np.zeros((H, W), np.uint8)  # background
    ids[2:8, 3:10] = 15  # person
    ids[6:11, 12:18] = 7 + seed  # car / cat
    ids[2, :] = 255  # boundary
    return ids


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    root = tmp_path / "VOC2012"
    for i, key in enumerate(["2007_000033", "2007_000042", "2008_000001"]):
        _jpeg(root / "JPEGImages" / f"{key}.jpg", i)
        _voc_label(root / "SegmentationClass" / f"{key}.png", _voc_indices(i))
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("2008_000001\n2007_000033\n\n")
    (sets / "val.txt").write_text("2007_000042\n")
    return root


def test_voc_samples_and_palette_indices_are_train_ids(voc_root):
    adapter = get_adapter("voc")
    assert isinstance(adapter, VOCAdapter)
    train = adapter.samples(voc_root, "train")
    assert [s.key for s in train] == ["2007_000033", "2008_000001"]  # sorted, blank lines skipped
    assert train[0].image == voc_root / "JPEGImages" / "2007_000033.jpg"
    labels = adapter.read_label(train[1])
    assert labels.dtype == np.uint8 and np.array_equal(labels, _voc_indices(2))
    assert set(np.unique(labels).tolist()) == {0, 9, 15, 255}
    assert adapter.spec.class_names[15] == "person"
    assert [s.key for s in adapter.samples(voc_root, "val")] == ["2007_000042"]


def test_voc_index_png_accepted_rgb_png_rejected(voc_root):
    adapter = VOCAdapter()
    sample = adapter.samples(voc_root, "val")[0]
    _voc_label(sample.label, _voc_indices(1), mode="L")
    assert np.array_equal(adapter.read_label(sample), _voc_indices(1))
    _voc_label(sample.label, _voc_indices(1), mode="RGB")
    with pytest.raises(DataError, match=r"2007_000042\.png.*colour image"):
        adapter.read_label(sample)


def test_voc_unknown_index_names_the_file(voc_root):
    adapter = VOCAdapter()
    sample = adapter.samples(voc_root, "val")[0]
    bad = _voc_indices(1)
    bad[0, 0] = 21
    _voc_label(sample.label, bad)
    with pytest.raises(DataError, match=r"2007_000042\.png.*\[21\]"):
        adapter.read_label(sample)


def test_voc_missing_files_raise_data_error(voc_root):
    adapter = VOCAdapter()
    with pytest.raises(DataError, match=r"Segmentation/trainval\.txt"):
        adapter.samples(voc_root, "trainval")
    (voc_root / "ImageSets" / "Segmentation" / "trainval.txt").write_text("\n")
    with pytest.raises(DataError, match="lists no image ids"):
        adapter.samples(voc_root, "trainval")
    (voc_root / "SegmentationClass" / "2007_000042.png").unlink()
    with pytest.raises(DataError, match=r"SegmentationClass/2007_000042\.png: missing label"):
        adapter.samples(voc_root, "val")
    (voc_root / "JPEGImages" / "2007_000033.jpg").unlink()
    with pytest.raises(DataError, match=r"JPEGImages/2007_000033\.jpg: missing image"):
        adapter.samples(voc_root, "train")
    (voc_root / "ImageSets" / "Segmentation" / "test.txt").write_text("2007_000042\n")
    (test,) = adapter.samples(voc_root, "test")  # the test split has no public labels
    assert test.label is None


# ---- Virtual KITTI 2 ---------------------------------------------------------------------

COLORS_TXT = "Category r g b\n" + "".join(f"{n} {r} {g} {b}\n" for n, (r, g, b) in VKITTI2_CLASSES)
COLORS_TXT += "Undefined 0 0 0\n"


def _classgt(seed: int) -> np.ndarray:
    """(H, W) class indices: sky, terrain, road, a car, and Undefined (255) pixels."""
    ids = np.full((H, W), 1, np.uint8)  # Sky
    ids[5:, :] = 5  # Road
    ids[5:, :4] = 0  # Terrain
    ids[6:9, 8 + seed : 12 + seed] = 12  # Car
    ids[0, 0] = 255  # Undefined
    return ids


def _write_classgt(path: Path, ids: np.ndarray) -> None:
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(VKITTI2_CLASSES)] = [c for _, c in VKITTI2_CLASSES]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(lut[ids]).save(path)


@pytest.fixture
def vkitti_root(tmp_path: Path) -> Path:
    root = tmp_path / "vkitti2"
    for scene, variation in (("Scene01", "clone"), ("Scene01", "fog"), ("Scene20", "clone")):
        var = root / scene / variation
        var.mkdir(parents=True)
        (var / "colors.txt").write_text(COLORS_TXT)
        for camera in ("Camera_0", "Camera_1"):
            for frame in (0, 1):
                _jpeg(var / "frames" / "rgb" / camera / f"rgb_{frame:05d}.jpg", frame)
                gt = var / "frames" / "classSegmentation" / camera / f"classgt_{frame:05d}.png"
                _write_classgt(gt, _classgt(frame))
    return root


def test_vkitti_scene_split_and_keys(vkitti_root):
    adapter = get_adapter("vkitti2")
    assert isinstance(adapter, VKitti2Adapter)
    train = adapter.samples(vkitti_root, "train")
    assert [s.key for s in train] == [
        "Scene01_clone_Camera_0_00000", "Scene01_clone_Camera_0_00001",
        "Scene01_fog_Camera_0_00000", "Scene01_fog_Camera_0_00001",
    ]  # fmt: skip
    assert train[2].meta == {
        "scene": "Scene01", "variation": "fog", "camera": "Camera_0",
        "colors": str(vkitti_root / "Scene01" / "fog" / "colors.txt"),
    }  # fmt: skip
    val = adapter.samples(vkitti_root, "val")
    assert [s.key for s in val] == ["Scene20_clone_Camera_0_00000", "Scene20_clone_Camera_0_00001"]
    both = VKitti2Adapter(val_scenes=("Scene01",), variations=("clone",), cameras=None)
    assert [s.key for s in both.samples(vkitti_root, "val")] == [
        "Scene01_clone_Camera_0_00000", "Scene01_clone_Camera_0_00001",
        "Scene01_clone_Camera_1_00000", "Scene01_clone_Camera_1_00001",
    ]  # fmt: skip
    assert len(both.samples(vkitti_root, "train")) == 4  # Scene20 clone, both cameras


def test_vkitti_colours_map_to_class_indices(vkitti_root):
    adapter = VKitti2Adapter()
    sample = adapter.samples(vkitti_root, "val")[1]
    labels = adapter.read_label(sample)
    assert labels.dtype == np.uint8 and labels.shape == (H, W)
    assert np.array_equal(labels, _classgt(1))
    assert labels[0, 0] == 255 and adapter.spec.class_names[labels[7, 10]] == "Car"


def test_vkitti_unknown_colour_names_file_and_colour(vkitti_root):
    adapter = VKitti2Adapter()
    sample = adapter.samples(vkitti_root, "train")[0]
    rgb = np.asarray(Image.open(sample.label)).copy()
    rgb[3, 3] = (1, 2, 3)
    Image.fromarray(rgb).save(sample.label)
    with pytest.raises(
        DataError, match=r"classgt_00000\.png: colour \(1, 2, 3\) is not in .*colors\.txt"
    ):
        adapter.read_label(sample)


def test_vkitti_bad_roots_raise(vkitti_root):
    adapter = VKitti2Adapter()
    with pytest.raises(ConfigError, match="unknown split 'test'"):
        adapter.samples(vkitti_root, "test")
    with pytest.raises(DataError, match="no Scene"):
        adapter.samples(vkitti_root / "Scene01", "train")
    with pytest.raises(DataError, match="has no frames"):
        VKitti2Adapter(val_scenes=("Scene99",)).samples(vkitti_root, "val")
    colors = vkitti_root / "Scene20" / "clone" / "colors.txt"
    colors.write_text(COLORS_TXT + "Bridge 1 2 3\n")
    sample = adapter.samples(vkitti_root, "val")[0]
    with pytest.raises(DataError, match=r"colors\.txt:17: category 'Bridge'"):
        adapter.read_label(sample)
    colors.unlink()
    with pytest.raises(DataError, match=r"Scene20/clone/colors\.txt: missing"):
        adapter.samples(vkitti_root, "val")
    (
        vkitti_root
        / "Scene01"
        / "fog"
        / "frames"
        / "classSegmentation"
        / "Camera_0"
        / "classgt_00001.png"
    ).unlink()
    with pytest.raises(DataError, match=r"classgt_00001\.png: missing class mask"):
        adapter.samples(vkitti_root, "train")


def test_embedded_cityscapes_table_is_the_official_one():
    """The label table travels with the library (lean GPU nodes have no cityscapesscripts);
    it must be cityscapesscripts' own, row for row."""
    official = pytest.importorskip("cityscapesscripts.helpers.labels").labels
    from pipeline.data.labels import CITYSCAPES_LABELS

    assert [tuple(lab) for lab in CITYSCAPES_LABELS] == [tuple(lab) for lab in official]


@pytest.mark.parametrize("module", ["camvid", "voc", "vkitti"])
def test_an_adapter_module_does_not_import_the_dispatcher(module):
    """The imports point one way: sources.get_adapter loads an adapter, an adapter loads only
    the shared types (pipeline/data/adapter.py), never sources.py back (a fresh interpreter,
    so nothing this session imported hides a cycle)."""
    import subprocess
    import sys

    code = (
        f"import sys, pipeline.data.{module}\n"
        "print(sorted(m for m in sys.modules if m.startswith('pipeline.')))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert f"pipeline.data.{module}" in loaded and "pipeline.data.adapter" in loaded
    assert "pipeline.data.sources" not in loaded

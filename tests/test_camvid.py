"""CamVid (SegNet layout): adapter, label table, shards of .png and .jpg frames, bad input."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_params
from PIL import Image
from typer.testing import CliRunner

from pipeline.data.labels import IGNORE_INDEX, get_spec
from pipeline.data.readers import EvalReader
from pipeline.data.shards import class_pixel_counts, read_manifest, write_shards
from pipeline.data.sources import get_adapter
from pipeline.errors import DataError
from pipeline.metrics import SegMetrics
from stages.cli import app

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"
H, W = 24, 32

# The table, written out here rather than read from the code under test.
TABLE = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
    "Pedestrian", "Bicyclist",
)  # fmt: skip
VOID = 11

# (split, frame stem, suffix): both frame formats, two sequences in train.
FRAMES = (
    ("train", "0001TP_006690", ".png"),
    ("train", "0001TP_006720", ".jpg"),
    ("train", "0006R0_f00930", ".jpg"),
    ("train", "0006R0_f00960", ".png"),
    ("val", "0016E5_07959", ".jpg"),
    ("val", "0016E5_07961", ".png"),
)


def _ids(seed: int) -> np.ndarray:
    """(H, W) CamVid ids: every class 0..10 in a band, void (11) in the last rows."""
    ids = np.repeat(np.arange(12, dtype=np.uint8), -(-H // 12))[:H, None].repeat(W, 1)
    return np.roll(ids, seed, axis=0)


def write_camvid(root: Path, frames=FRAMES) -> Path:
    rng = np.random.default_rng(0)
    for i, (split, stem, suffix) in enumerate(frames):
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
        ids = _ids(i)
        image = rng.integers(0, 256, (12, 3), dtype=np.uint8)[ids]  # coloured by class
        Image.fromarray(image).save(root / split / f"{stem}{suffix}", quality=95)
        Image.fromarray(ids).save(root / f"{split}annot" / f"{stem}.png")
    return root


@pytest.fixture
def camvid_root(tmp_path: Path) -> Path:
    return write_camvid(tmp_path / "CamVid")


def test_spec_is_the_segnet_11_class_table():
    spec = get_spec("camvid")
    assert spec.class_names == TABLE and spec.num_classes == 11
    # SegNet tutorial colours (Scripts/test_segmentation_camvid.py)
    assert spec.palette[TABLE.index("Sky")] == (128, 128, 128)
    assert spec.palette[TABLE.index("Road")] == (128, 64, 128)
    assert spec.palette[TABLE.index("Bicyclist")] == (0, 128, 192)
    assert len(set(spec.palette)) == 11
    # no categories, no instances: nothing Cityscapes-specific is scored
    assert spec.class_categories is None and spec.instance_classes is None


def test_adapter_lists_png_and_jpg_frames_with_their_sequence(camvid_root):
    adapter = get_adapter("camvid")
    train = adapter.samples(camvid_root, "train")
    assert [s.key for s in train] == ["0001TP_006690", "0001TP_006720", "0006R0_f00930", "0006R0_f00960"]  # fmt: skip
    assert [s.image.suffix for s in train] == [".png", ".jpg", ".jpg", ".png"]
    assert train[2].label == camvid_root / "trainannot" / "0006R0_f00930.png"
    assert [s.meta["sequence"] for s in train] == ["0001TP", "0001TP", "0006R0", "0006R0"]
    assert [s.group for s in train] == ["0001TP", "0001TP", "0006R0", "0006R0"]
    assert [s.key for s in adapter.samples(camvid_root, "val")] == ["0016E5_07959", "0016E5_07961"]


def test_label_ids_map_to_the_table_and_void_is_ignored(camvid_root):
    adapter = get_adapter("camvid")
    sample = adapter.samples(camvid_root, "train")[0]
    raw = np.asarray(Image.open(sample.label))
    train_ids = adapter.read_label(sample)
    assert train_ids.dtype == np.uint8 and train_ids.shape == (H, W)
    for class_id, name in enumerate(TABLE):
        assert (raw == class_id).any()
        assert (train_ids[raw == class_id] == class_id).all(), name
    assert (train_ids[raw == VOID] == IGNORE_INDEX).all() and (raw == VOID).any()
    # a palette ("P") label PNG is read as indices too
    Image.fromarray(raw).convert("P").save(sample.label)
    assert np.array_equal(adapter.read_label(sample), train_ids)


def test_shards_keep_source_bytes_of_png_and_jpg_frames(camvid_root, tmp_path):
    out = tmp_path / "train"
    summary = write_shards(camvid_root, "train", out, dataset="camvid", samples_per_shard=3)
    assert summary.samples == 4 and summary.shards == 2
    members = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    for _, stem, suffix in FRAMES[:4]:
        source = (camvid_root / "train" / f"{stem}{suffix}").read_bytes()
        ext = "png" if suffix == ".png" else "jpg"
        assert members[f"{stem}.image.{ext}"] == source  # unchanged, hash-traceable
        assert f"{stem}.image.{'jpg' if ext == 'png' else 'png'}" not in members
    # the readers decode both to the source's pixels; labels are train ids
    for s in EvalReader(out):
        (path,) = (camvid_root / "train").glob(f"{s['key']}.*")
        assert torch.equal(s["image"].permute(1, 2, 0), torch.from_numpy(np.array(Image.open(path).convert("RGB"))))  # fmt: skip
        raw = np.asarray(Image.open(camvid_root / "trainannot" / f"{s['key']}.png"))
        assert torch.equal(s["label"], torch.from_numpy(np.where(raw == VOID, 255, raw)))
        assert s["instance"] is None
    table = read_manifest(out)
    assert table.column("group").to_pylist() == ["0001TP", "0001TP", "0006R0", "0006R0"]
    sha = {r["key"]: r["image_sha256"] for r in table.to_pylist()}
    assert sha["0006R0_f00930"] == hashlib.sha256(members["0006R0_f00930.image.jpg"]).hexdigest()
    # every labelled pixel counted once: 11 classes, void as ignore
    counts = class_pixel_counts(out)
    assert counts.shape == (11,) and (counts > 0).all()
    assert counts.sum() + sum(table.column("ignore_pixels").to_pylist()) == 4 * H * W


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] == []


@pytest.mark.parametrize("damage", ["unknown_id_12", "missing_annot", "rgb_annot"])
def test_bad_input_names_the_file_and_leaves_nothing(camvid_root, tmp_path, damage):
    annot = camvid_root / "trainannot" / "0006R0_f00930.png"
    match damage:
        case "unknown_id_12":
            ids = _ids(0)
            ids[3, 4] = 12
            Image.fromarray(ids).save(annot)
            message = r"0006R0_f00930\.png: label id\(s\) \[12\] are not in the camvid label table"
        case "missing_annot":
            annot.unlink()
            message = r"trainannot/0006R0_f00930\.png: missing label for image .*0006R0_f00930\.jpg"
        case "rgb_annot":
            Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(annot)
            message = r"0006R0_f00930\.png: CamVid labels must be single-channel"
    out = tmp_path / "shards" / "train"
    out.parent.mkdir()
    with pytest.raises(DataError, match=message):
        write_shards(camvid_root, "train", out, dataset="camvid", samples_per_shard=1)
    _assert_nothing_left(out)
    # the CLI: one line naming the file, exit 1, still nothing written
    result = CliRunner().invoke(
        app, ["preprocess", str(camvid_root), "train", str(out), "--dataset", "camvid", "--workers", "1"]
    )  # fmt: skip
    assert result.exit_code == 1
    (error,) = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert "0006R0_f00930.png" in error
    assert "Traceback" not in result.output
    _assert_nothing_left(out)


def test_bad_layouts_are_named(camvid_root, tmp_path):
    adapter = get_adapter("camvid")
    (camvid_root / "test").mkdir()
    with pytest.raises(DataError, match=r"CamVid/testannot: no such folder .*SegNet layout"):
        adapter.samples(camvid_root, "test")
    (camvid_root / "testannot").mkdir()
    with pytest.raises(DataError, match=r"CamVid/test: split 'test' has no \.png or \.jpg frames"):
        adapter.samples(camvid_root, "test")
    Image.new("RGB", (W, H)).save(camvid_root / "train" / "0001TP_006690.jpg")
    with pytest.raises(DataError, match=r"0001TP_006690\.png: frame '0001TP_006690' exists twice"):
        adapter.samples(camvid_root, "train")
    (camvid_root / "train" / "0001TP_006690.jpg").unlink()
    Image.new("RGB", (W, H)).save(camvid_root / "train" / "nosequence.png")
    with pytest.raises(DataError, match=r"nosequence\.png: cannot tell the sequence"):
        adapter.samples(camvid_root, "train")


def test_scores_cover_the_11_classes_without_iiou():
    spec = get_spec("camvid")
    metrics = SegMetrics.from_spec(spec)
    target = torch.from_numpy(get_spec("camvid").label_to_train[_ids(0)])
    pred = target.clone()
    pred[target == 255] = 0
    pred[target == TABLE.index("Fence")] = TABLE.index("Car")  # Fence missed entirely
    metrics.update(pred, target)
    scores = metrics.compute()
    assert list(scores["per_class_iou"]) == list(TABLE)
    assert scores["per_class_iou"]["Fence"] == 0.0
    assert scores["per_class_iou"]["Sky"] == 1.0
    # Car: its own band plus Fence's, of equal size: IoU 1/2
    assert scores["per_class_iou"]["Car"] == pytest.approx(0.5)
    assert scores["miou"] == pytest.approx((9 + 0.5) / 11)
    assert not {"iiou", "miou_category", "category_iou"} & set(scores)


def test_train_and_eval_on_camvid_through_the_stages(camvid_root, tmp_path):
    """`--dataset camvid` end to end on the fixture: preprocess, 2 steps, eval over 11 classes."""
    from stages import steps

    raw = tiny_params()
    raw["data"].update(dataset="camvid", root=str(camvid_root), shards=str(tmp_path / "s"))
    raw["data"]["outputs"] = str(tmp_path / "o")
    raw["train"].update(iterations=2, crop_size=[16, 16], val_interval=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        p = steps.load("params.yaml")
        for split in ("train", "val"):
            steps.preprocess(p.data.root, split, steps.shard_dir(p, split), "camvid", workers=1)
        steps.train(p)
        metrics = steps.evaluate(p)
    finally:
        os.chdir(cwd)
    assert list(metrics["per_class_iou"]) == list(TABLE)
    assert metrics["num_images"] == 2 and "iiou" not in metrics
    assert metrics["provenance"]["data"]["path"].endswith("s/val")


@pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} not present")
def test_real_camvid_train_and_val():
    adapter = get_adapter("camvid")
    train, val = adapter.samples(REAL, "train"), adapter.samples(REAL, "val")
    assert (len(train), len(val)) == (367, 101)
    sizes = {}
    for s in train:
        sizes[s.group] = sizes.get(s.group, 0) + 1
    assert sizes == {"0001TP": 62, "0006R0": 101, "0016E5": 204}
    assert {s.group for s in val} == {"0016E5"}
    for s in (train[0], train[-1], val[50]):
        ids = adapter.read_label(s)
        assert ids.shape == (360, 480)
        assert set(np.unique(ids).tolist()) <= set(range(11)) | {255}
        assert Image.open(io.BytesIO(s.image.read_bytes())).size == (480, 360)


@pytest.mark.parametrize("name", ["camvid", "camvid-cpu"])
def test_recipe_writes_camvid_params(camvid_root, tmp_path, name):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params()))
    result = CliRunner().invoke(app, ["recipe", name, "--root", str(camvid_root), "-p", str(params)])  # fmt: skip
    assert result.exit_code == 0, result.output
    from pipeline.params import load_params

    p = load_params(params).to_dict()
    assert (p["data"]["dataset"], p["data"]["root"]) == ("camvid", str(camvid_root))
    assert p["train"]["model"]["pretrained_backbone"] is None  # from scratch

    def leaves(d: dict, prefix: str = ""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "loss" else [(prefix + k, v)]  # fmt: skip

    recipe = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / f"recipes/{name}.yaml").read_text()
    )
    flat = dict(leaves(p))
    assert all(flat[k] == v for k, v in leaves(recipe)), "every recipe key lands in params.yaml"
    assert (tmp_path / "params.yaml.bak").is_file()


@pytest.mark.parametrize("name", ["cityscapes", "camvid", "camvid-cpu"])
def test_recipes_set_every_demo_only_choice(name):
    """The shipped params.yaml is the CPU demo: where it differs from the library's defaults
    (more iterations, class weights, a narrower scale range, test-time scales, ...), a recipe
    must say its own value, or the demo's choice leaks into a real dataset's run."""
    from pipeline.params import Params, yaml_load

    def leaves(d: dict, prefix: str = ""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "loss" else [(prefix + k, v)]  # fmt: skip

    repo = Path(__file__).resolve().parents[1]
    shipped = dict(leaves(yaml_load((repo / "params.yaml").read_text())))
    defaults = dict(leaves(Params().to_dict()))
    recipe = dict(leaves(yaml_load((repo / "recipes" / f"{name}.yaml").read_text())))
    where = ("train.", "evaluate.")  # data/synth/preprocess: paths and the demo's own data
    demo_only = {k for k, v in shipped.items() if k.startswith(where) and defaults.get(k) != v}
    assert {"train.iterations", "train.class_weights", "evaluate.scales"} <= demo_only
    left = sorted(demo_only - set(recipe))
    assert not left, f"recipes/{name}.yaml leaves the demo's values of {left} in place"

"""score_prediction_folder: the official Cityscapes numbers, and errors that name the file."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_ROOT
from PIL import Image

from pipeline.engine.scoring import find_pairs, score_prediction_folder
from pipeline.errors import DataError

SAMPLE = SAMPLE_ROOT
SAMPLE_FRAME = "frankfurt_000000_000294"

# labelIds used to paint generated frames. "train" (31) is never used, so its IoU is undefined
# on both sides; "bus" (28) is only ever predicted, so its IoU is 0.
STUFF = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 0, 4, 5, 9, 14)  # incl. void / ignored ids
THINGS = (24, 25, 26, 27, 32, 33, 29)  # person rider car truck motorcycle bicycle caravan
# Noise a prediction may contain: evaluated ids and void ids, but not caravan/trailer (29, 30),
# whose "vehicle" category credit in the official iIoU we deliberately do not reproduce.
PRED_NOISE = (7, 8, 11, 13, 21, 23, 24, 25, 26, 27, 28, 33, 0, 4)


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_frame(rng: np.random.Generator, h: int = 128, w: int = 256):
    """labelIds (uint8) and instanceIds (uint16: id * 1000 + n, or the plain id) of a toy scene."""
    label = np.full((h, w), 23, np.uint8)  # sky
    label[h // 3 :] = 11  # building
    label[2 * h // 3 :] = 7  # road
    for _ in range(12):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        label[y : y + rng.integers(4, 30), x : x + rng.integers(4, 60)] = rng.choice(STUFF)
    inst = label.astype(np.uint16)
    count: dict[int, int] = {}
    for _ in range(10):
        lid = int(rng.choice(THINGS))
        y, x = rng.integers(h // 3, h - 6), rng.integers(0, w - 6)
        box = (slice(y, y + rng.integers(3, 40)), slice(x, x + rng.integers(3, 50)))
        label[box] = lid
        if rng.random() < 0.2:  # a "group" region: class pixels without an instance
            inst[box] = lid
        else:
            count[lid] = count.get(lid, 0) + 1
            inst[box] = lid * 1000 + count[lid]
    return label, inst


def perturb(rng: np.random.Generator, label: np.ndarray) -> np.ndarray:
    """A prediction: the ground truth shifted a few pixels, with blocks and pixels of noise."""
    pred = np.roll(label, (int(rng.integers(-3, 4)), int(rng.integers(-6, 7))), axis=(0, 1))
    h, w = pred.shape
    for _ in range(8):
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        pred[y : y + rng.integers(2, 25), x : x + rng.integers(2, 40)] = rng.choice(PRED_NOISE)
    noise = rng.random(pred.shape) < 0.05
    pred[noise] = rng.choice(PRED_NOISE, size=int(noise.sum()))
    return pred


def without_ignored_vehicles(pred: np.ndarray) -> np.ndarray:
    """Predictions of caravan/trailer (ignored in evaluation) turned into car."""
    return np.where(np.isin(pred, (29, 30)), 26, pred).astype(np.uint8)


@pytest.fixture(scope="module")
def tree(scratch) -> tuple[Path, Path, Path]:
    """A gtFine tree (the real frame + 3 generated ones in two cities), a prediction folder with
    nested subfolders and names that only start with the frame id, and a copy of it whose
    predictions still hold the caravan/trailer ids that shifting the ground truth brought in."""
    if not SAMPLE.is_dir():
        pytest.skip(f"the real Cityscapes frame is not at {SAMPLE}")
    root = scratch("cs")
    gt_root, pred_dir, raw_dir = root / "cityscapes", root / "results", root / "raw"
    rng = np.random.default_rng(0)
    src = SAMPLE / "gtFine" / "val" / "frankfurt"
    dst = gt_root / "gtFine" / "val" / "frankfurt"
    dst.mkdir(parents=True)
    for kind in ("labelIds", "instanceIds"):
        shutil.copy(src / f"{SAMPLE_FRAME}_gtFine_{kind}.png", dst)
    labels = {SAMPLE_FRAME: np.asarray(Image.open(dst / f"{SAMPLE_FRAME}_gtFine_labelIds.png"))}

    for frame in ("frankfurt_000001_000019", "lindau_000000_000019", "lindau_000001_000019"):
        city = frame.split("_")[0]
        label, inst = make_frame(rng)
        write_png(gt_root / "gtFine" / "val" / city / f"{frame}_gtFine_labelIds.png", label)
        write_png(gt_root / "gtFine" / "val" / city / f"{frame}_gtFine_instanceIds.png", inst)
        labels[frame] = label
    for frame, label in labels.items():
        pred = perturb(rng, label)
        sub = Path("deep") / frame.split("_")[0] / f"{frame}_pred.png"
        write_png(pred_dir / sub, without_ignored_vehicles(pred))
        write_png(raw_dir / sub, pred)
    return gt_root, pred_dir, raw_dir


def official_scores(gt_root: Path, pred_dir: Path, tmp_path: Path, monkeypatch) -> dict:
    """cityscapesscripts' own evaluation of the same files, run in-process, writing nothing."""
    monkeypatch.delenv("CITYSCAPES_RESULTS", raising=False)
    monkeypatch.delenv("CITYSCAPES_DATASET", raising=False)
    # evaluatePair calls np.in1d, which numpy 2.4 removed; np.isin is its replacement.
    monkeypatch.setattr(
        np, "in1d", lambda a, b, invert=False: np.isin(a, b, invert=invert).ravel(), raising=False
    )
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev

    args = ev.CArgs()
    for k, v in vars(ev.args).items():  # the script's defaults (avgClassSize, ...)
        setattr(args, k, v)
    args.cityscapesPath = str(gt_root)
    args.predictionPath = str(pred_dir)
    args.predictionWalk = None
    args.exportFile = str(tmp_path / "official.json")
    args.JSONOutput = False
    args.quiet = True
    args.colorized = False
    args.evalInstLevelScore = True
    args.evalPixelAccuracy = False
    gts = sorted(str(p) for p in (gt_root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    preds = [ev.getPrediction(args, gt) for gt in gts]
    return ev.evaluateImgLists(preds, gts, args)


def same(ours: float | None, theirs: float) -> bool:
    if ours is None:
        return math.isnan(theirs)
    return abs(ours - theirs) <= 1e-6


def test_scores_match_cityscapesscripts(tree, tmp_path, monkeypatch):
    gt_root, pred_dir, _ = tree
    ours = score_prediction_folder(pred_dir, gt_root)
    theirs = official_scores(gt_root, pred_dir, tmp_path, monkeypatch)

    assert ours["num_images"] == 4
    assert 0.2 < ours["miou"] < 0.9 and 0.2 < ours["iiou"] < 0.9  # nontrivial
    assert ours["per_class_iou"]["train"] is None and ours["per_class_iou"]["bus"] == 0.0

    assert same(ours["miou"], theirs["averageScoreClasses"])
    for name, iou in ours["per_class_iou"].items():
        assert same(iou, theirs["classScores"][name]), name
    assert same(ours["iiou"], theirs["averageScoreInstClasses"])
    for name, iiou in ours["per_class_iiou"].items():
        assert same(iiou, theirs["classInstScores"][name]), name
    assert same(ours["miou_category"], theirs["averageScoreCategories"])
    for name, iou in ours["category_iou"].items():
        assert same(iou, theirs["categoryScores"][name]), name
    assert same(ours["iiou_category"], theirs["averageScoreInstCategories"])
    assert set(ours["category_iiou"]) == {"human", "vehicle"}
    for name, iiou in ours["category_iiou"].items():
        assert same(iiou, theirs["categoryInstScores"][name]), name


def test_known_difference_caravan_predictions(tree, tmp_path, monkeypatch):
    """Predicted caravan/trailer ids are void here; the official category iIoU alone credits
    them as "vehicle" (see pipeline.metrics). Everything else still agrees."""
    gt_root, _, raw_dir = tree
    ours = score_prediction_folder(raw_dir, gt_root)
    theirs = official_scores(gt_root, raw_dir, tmp_path, monkeypatch)
    assert same(ours["miou"], theirs["averageScoreClasses"])
    assert same(ours["iiou"], theirs["averageScoreInstClasses"])
    assert same(ours["miou_category"], theirs["averageScoreCategories"])
    assert same(ours["category_iiou"]["human"], theirs["categoryInstScores"]["human"])
    assert not same(ours["category_iiou"]["vehicle"], theirs["categoryInstScores"]["vehicle"])


def test_progress_and_no_instances(tree, tmp_path):
    gt_root, pred_dir, _ = tree
    calls = []
    score_prediction_folder(pred_dir, gt_root, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    # Scored in worker processes or in this one: the same numbers.
    assert score_prediction_folder(pred_dir, gt_root, num_workers=0) == score_prediction_folder(
        pred_dir, gt_root, num_workers=2
    )

    # Without instanceIds the pixel scores stay, iIoU is left out.
    copy = tmp_path / "gt"
    shutil.copytree(gt_root, copy)
    for f in copy.rglob("*_instanceIds.png"):
        f.unlink()
    r = score_prediction_folder(pred_dir, copy)
    assert "iiou" not in r
    assert r["miou"] == score_prediction_folder(pred_dir, gt_root)["miou"]


# -------------------------------------------------------------------------------- errors


@pytest.fixture
def one_frame(tmp_path) -> tuple[Path, Path, Path]:
    """A one-frame gt tree, its prediction folder and the prediction's path."""
    if not SAMPLE.is_dir():
        pytest.skip(f"the real Cityscapes frame is not at {SAMPLE}")
    gt_root, pred_dir = tmp_path / "gt", tmp_path / "pred"
    src = SAMPLE / "gtFine" / "val" / "frankfurt"
    dst = gt_root / "gtFine" / "val" / "frankfurt"
    dst.mkdir(parents=True)
    shutil.copy(src / f"{SAMPLE_FRAME}_gtFine_labelIds.png", dst)
    pred = pred_dir / f"{SAMPLE_FRAME}_leftImg8bit.png"
    pred_dir.mkdir()
    shutil.copy(dst / f"{SAMPLE_FRAME}_gtFine_labelIds.png", pred)
    return gt_root, pred_dir, pred


def test_perfect_prediction_scores_one(one_frame):
    gt_root, pred_dir, _ = one_frame
    assert score_prediction_folder(pred_dir, gt_root)["miou"] == 1.0


def test_missing_prediction_names_the_ground_truth(one_frame):
    gt_root, pred_dir, pred = one_frame
    pred.unlink()
    with pytest.raises(DataError, match=f"{SAMPLE_FRAME}_gtFine_labelIds.png: no prediction"):
        score_prediction_folder(pred_dir, gt_root)


def test_two_matching_predictions(one_frame):
    gt_root, pred_dir, pred = one_frame
    (pred_dir / "sub").mkdir()
    shutil.copy(pred, pred_dir / "sub" / f"{SAMPLE_FRAME}_other.png")
    with pytest.raises(DataError, match="2 predictions match") as err:
        find_pairs(pred_dir, gt_root)
    assert str(pred) in str(err.value) and "sub" in str(err.value)


def test_size_mismatch(one_frame):
    gt_root, pred_dir, pred = one_frame
    write_png(pred, np.zeros((64, 128), np.uint8))
    with pytest.raises(DataError, match=f"{pred}: size 128x64 differs"):
        score_prediction_folder(pred_dir, gt_root)


def test_rgb_prediction(one_frame):
    gt_root, pred_dir, pred = one_frame
    write_png(pred, np.zeros((128, 256, 3), np.uint8))
    with pytest.raises(DataError, match=f"{pred}: has 3 channels"):
        score_prediction_folder(pred_dir, gt_root)


def test_ids_outside_the_label_table(one_frame):
    gt_root, pred_dir, pred = one_frame
    ids = np.full((128, 256), 7, np.uint8)
    ids[0, 0] = 200
    write_png(pred, ids)
    with pytest.raises(DataError, match=rf"{pred}: label id\(s\) \[200\]"):
        score_prediction_folder(pred_dir, gt_root)


def test_corrupt_prediction(one_frame):
    gt_root, pred_dir, pred = one_frame
    pred.write_bytes(pred.read_bytes()[:100])
    with pytest.raises(DataError, match=str(pred)):
        score_prediction_folder(pred_dir, gt_root)


def test_empty_or_missing_gt_folder(tmp_path):
    (tmp_path / "gtFine" / "val" / "frankfurt").mkdir(parents=True)
    with pytest.raises(DataError, match=r"gtFine/val: no ground truth"):
        score_prediction_folder(tmp_path, tmp_path)
    with pytest.raises(DataError, match=r"gtFine/test: no such folder"):
        score_prediction_folder(tmp_path, tmp_path, split="test")

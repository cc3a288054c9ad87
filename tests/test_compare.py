"""`seg eval`'s per-image counts and the paired bootstrap of `seg compare` (pipeline/compare.py).

The statistics run on small synthetic count arrays (milliseconds); one test scores the shared
4-step project (`trained_project`) to check what `seg eval` writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import compare
from pipeline.compare import FrameCounts, paired_bootstrap, paired_bootstrap_counts
from pipeline.errors import DataError
from pipeline.metrics import SegMetrics

V = 255


def _counts(rng: np.random.Generator, n: int = 24, k: int = 4, void: bool = True) -> np.ndarray:
    """n frames of k classes: a strong diagonal, a few confusions and void predictions."""
    out = rng.integers(0, 6, size=(n, k, k + 1))
    out[:, np.arange(k), np.arange(k)] += rng.integers(20, 80, size=(n, k))
    if not void:
        out[:, :, k] = 0
    return out.astype(np.int64)


def _fc(counts: np.ndarray, **meta) -> FrameCounts:
    n, k = counts.shape[:2]
    base = {"dataset": "t", "data_sha256": "d" * 64, "eval": _settings()}
    return FrameCounts(
        [f"f{i:03d}" for i in range(n)], counts, [f"c{j}" for j in range(k)], {**base, **meta}
    )


def _settings(**changes) -> dict:
    s = {"mode": "whole", "scales": [1.0], "flip": False, "output_stride": 16}
    return {**s, **changes}


def _segmetrics_miou(counts: np.ndarray) -> float | None:
    """The dataset-level metric itself (SegMetrics.compute) on summed counts."""
    k = counts.shape[1]
    m = SegMetrics(k)
    total = torch.from_numpy(counts.sum(0))
    m.load_state(
        {
            "confusion": total[:, :k],
            "void_pred": total[:, k],
            "instance_stats": torch.zeros(4, k, dtype=torch.float64),
            "counts": torch.tensor([len(counts), 0]),
        }
    )
    return m.compute()["miou"]


# ----------------------------------------------------------------------------- statistics


def test_identical_models_give_zero_with_a_zero_width_interval():
    a = _counts(np.random.default_rng(0))
    c = paired_bootstrap(_fc(a), _fc(a.copy()))
    assert (c.delta.value, c.delta.lo, c.delta.hi) == (0.0, 0.0, 0.0)
    assert all((d.value, d.lo, d.hi) == (0.0, 0.0, 0.0) for d in c.class_delta)
    assert c.line() == "ΔmIoU +0.0 [+0.0, +0.0]"


def test_a_dominating_model_has_a_lower_bound_above_zero():
    """B has more true positives and fewer errors than A in every class of every frame."""
    rng = np.random.default_rng(1)
    a = _counts(rng, n=30, k=5)
    b = a.copy()
    k = a.shape[1]
    for i in range(len(a)):
        for c in range(k):
            off = [j for j in range(k + 1) if j != c and b[i, c, j] > 0]
            moved = rng.choice(off)  # one error pixel of class c becomes a hit
            b[i, c, moved] -= 1
            b[i, c, c] += 1
    for i in range(len(a)):  # and some more: never a worse class or frame
        b[i, np.arange(k), np.arange(k)] += 3
    result = paired_bootstrap_counts(a, b)
    assert result.delta.value > 0 and result.delta.lo > 0, result.line()
    assert all(d.lo > 0 for d in result.class_delta)


def test_resampled_miou_is_the_dataset_level_metric_of_the_resampled_frames():
    """Each resample's mIoU, for each model, is SegMetrics.compute on that resample's frames
    summed: the ΔmIoU of resample r equals the metric's B minus A, to the last bits."""
    rng = np.random.default_rng(2)
    a, b = _counts(rng, n=12), _counts(rng, n=12)
    result = paired_bootstrap_counts(a, b, resamples=50, seed=7)
    weights = compare.resample_weights(12, 50, seed=7).astype(np.int64)
    for r in range(0, 50, 7):
        picked = np.repeat(np.arange(12), weights[r])
        want = _segmetrics_miou(b[picked]) - _segmetrics_miou(a[picked])
        assert result.samples[r] == pytest.approx(want, abs=1e-12)
    assert result.miou_a == pytest.approx(_segmetrics_miou(a), abs=1e-12)


def test_a_class_absent_from_a_resample_is_left_out_of_its_mean_as_the_metric_does():
    """Class 3 is in the ground truth of frame 0 only, and neither model predicts it elsewhere:
    a resample without frame 0 leaves class 3 undefined (not 0) and averages the other three,
    as SegMetrics does for a class absent from the whole split. Class 2 is absent from every
    ground truth, but A predicts it on frame 5: it scores 0 for A and counts in A's mean;
    B never predicts it, so for B it is left out, and its own Δ is undefined."""
    rng = np.random.default_rng(3)
    a = _counts(rng, n=10, void=False)
    a[:, 3, :] = 0
    a[:, :, 3] = 0
    a[0, 3, 3] = 40  # class 3: frame 0 only
    a[:, 2, :] = 0
    a[:, :, 2] = 0
    b = a.copy()
    a[5, 0, 2] = 4  # A predicts class 2 (absent from every ground truth) on frame 5
    result = paired_bootstrap_counts(a, b, resamples=400, seed=0)
    weights = compare.resample_weights(10, 400, seed=0)
    without = np.flatnonzero(weights[:, 0] == 0)
    assert 0 < len(without) < 400  # some resamples miss frame 0, some have it
    r = int(without[0])
    picked = np.repeat(np.arange(10), weights[r].astype(np.int64))
    k = 4
    stats = compare.class_stats(b[picked]).sum(0)
    iou = compare.class_iou(stats)
    assert np.isnan(iou[3]) and np.isnan(iou[2])  # undefined, not zero
    miou_b = compare.mean_iou(iou)
    assert miou_b == pytest.approx(np.mean(iou[:2]))  # the mean of the defined two
    assert result.samples[r] == pytest.approx(miou_b - _segmetrics_miou(a[picked]), abs=1e-12)
    assert _segmetrics_miou(b[picked]) == pytest.approx(miou_b, abs=1e-12)
    # class 2: 0 for A, undefined for B -> its Δ is undefined everywhere
    assert result.iou_a[2] == 0.0 and result.iou_b[2] is None
    assert result.class_delta[2].value is None and result.class_delta[2].defined == 0.0
    # class 3: defined only in the resamples that drew frame 0
    assert result.class_delta[3].defined == pytest.approx(1 - len(without) / 400)
    assert k == a.shape[1]


def test_seeded_and_reproducible():
    rng = np.random.default_rng(4)
    a, b = _fc(_counts(rng)), _fc(_counts(rng))
    one, two = paired_bootstrap(a, b, seed=3), paired_bootstrap(a, b, seed=3)
    assert one.to_dict() == two.to_dict()
    assert paired_bootstrap(a, b, seed=4).delta != one.delta
    json.dumps(one.to_dict(), allow_nan=False)


def test_percentile_and_bca_agree_on_a_symmetric_case_and_bracket_the_estimate():
    rng = np.random.default_rng(5)
    a, b = _counts(rng, n=200), _counts(rng, n=200)
    bca = paired_bootstrap_counts(a, b)
    pct = paired_bootstrap_counts(a, b, method="percentile")
    width = pct.delta.hi - pct.delta.lo
    assert bca.delta.lo < bca.delta.value < bca.delta.hi
    assert abs(bca.delta.lo - pct.delta.lo) < 0.2 * width
    assert abs(bca.delta.hi - pct.delta.hi) < 0.2 * width


def test_one_models_miou_interval():
    fc = _fc(_counts(np.random.default_rng(6), n=40))
    iv = compare.miou_interval(fc)
    assert iv.lo < iv.value < iv.hi
    assert iv.value == pytest.approx(fc.miou())


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"data_sha256": "e" * 64}, "different val data (manifest sha256 dddddddddddd vs eeeeeeeeeeee)"),
        ({"eval": _settings(flip=True)}, "different eval settings: flip false vs true"),
        ({"eval": _settings(scales=[1.0, 1.25], output_stride=8)}, "scales [1.0] vs [1.0, 1.25], output_stride 16 vs 8"),
        ({"eval": _settings(mode="slide", crop_size=[8, 8], stride=[4, 4])}, "mode \"whole\" vs \"slide\""),
    ],
)  # fmt: skip
def test_refuses_other_data_or_settings_naming_the_difference(change, named):
    counts = _counts(np.random.default_rng(7))
    a, b = _fc(counts, source="A"), _fc(counts, source="B", **change)
    with pytest.raises(DataError) as exc:
        paired_bootstrap(a, b)
    msg = str(exc.value)
    assert msg.startswith("cannot compare A and B: ") and named in msg and "\n" not in msg


def test_refuses_other_frames():
    counts = _counts(np.random.default_rng(8))
    a = _fc(counts)
    b = FrameCounts(a.keys[:-1] + ["other"], counts, a.classes, a.meta)
    with pytest.raises(DataError, match="different frames"):
        paired_bootstrap(a, b)


# ----------------------------------------------------------------------------- the file


def test_file_round_trip_and_a_damaged_file(tmp_path: Path):
    fc = _fc(_counts(np.random.default_rng(9)))
    compare.write_frame_counts(tmp_path / "x.parquet", fc)
    back = compare.read_frame_counts(tmp_path / "x.parquet")
    assert back.keys == fc.keys and (back.counts == fc.counts).all()
    assert back.classes == fc.classes and back.meta["eval"] == fc.meta["eval"]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="bad.parquet: not a per-image counts file"):
        compare.read_frame_counts(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="missing.parquet: no per-image counts"):
        compare.read_frame_counts(tmp_path / "missing.parquet")


def test_seg_eval_writes_each_frames_counts(trained_project: Path, tmp_path: Path, monkeypatch):
    """The frames' counts add up to the confusion matrix and void predictions, and their mIoU
    recomputed is metrics.json's, with the data hash and settings the comparison checks."""
    from pipeline.data.shards import read_manifest
    from stages import steps

    monkeypatch.chdir(trained_project)
    p = steps.load("params.yaml")
    out = tmp_path / "eval"
    metrics = steps.evaluate(p, out=out, history=False)
    fc = compare.read_frame_counts(out / compare.FILE)
    confusion = json.loads((out / "confusion.json").read_text())["matrix"]
    assert fc.counts.sum(0)[:, :-1].tolist() == confusion
    assert fc.keys == sorted(read_manifest("data/shards/val")["key"].to_pylist())
    assert fc.miou() == pytest.approx(metrics["miou"], abs=1e-12)
    assert fc.meta["data_sha256"] == metrics["provenance"]["data"]["sha256"]
    assert fc.meta["eval"] == {
        "mode": "whole",
        "scales": [1.0, 1.25],
        "flip": True,
        "output_stride": 16,
    }
    assert fc.meta["checkpoint_sha256"] == metrics["provenance"]["checkpoint"]["sha256"]
    assert not any(n.startswith(".") for n in os.listdir(out))  # no temporary left

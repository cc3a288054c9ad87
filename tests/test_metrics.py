"""SegMetrics on matrices small enough to score by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SAMPLE_ROOT, needs_sample

from pipeline.data.labels import get_spec
from pipeline.errors import ConfigError
from pipeline.metrics import SegMetrics

V = 255  # ignore / void

# 3 classes, 8 pixels, 2 of them ignored in the ground truth.
TARGET = torch.tensor([[0, 0, 1, 1], [2, 2, V, V]])
PRED = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
# valid (gt, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,2) (2,0)
#   class 0: tp 1, fn 1, fp 1 -> IoU 1/3     class 1: tp 2, fn 0, fp 1 -> 2/3
#   class 2: tp 1, fn 1, fp 0 -> 1/2


def scored(pred, target, **kwargs):
    m = SegMetrics(kwargs.pop("num_classes", 3), **kwargs)
    m.update(pred, target)
    return m


def test_iou_by_hand():
    m = scored(PRED, TARGET, class_names=("a", "b", "c"))
    assert m.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    r = m.compute()
    assert r["per_class_iou"] == pytest.approx({"a": 1 / 3, "b": 2 / 3, "c": 1 / 2})
    assert r["miou"] == pytest.approx(0.5)
    assert r["pixel_accuracy"] == pytest.approx(4 / 6)
    assert r["mean_accuracy"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert r["fwiou"] == pytest.approx((2 / 6) * (1 / 3 + 2 / 3 + 1 / 2))
    assert r["per_class_precision"] == pytest.approx({"a": 1 / 2, "b": 2 / 3, "c": 1.0})
    assert r["per_class_recall"] == pytest.approx({"a": 1 / 2, "b": 1.0, "c": 1 / 2})
    assert r["per_class_f1"] == pytest.approx({"a": 1 / 2, "b": 4 / 5, "c": 2 / 3})
    assert r["num_pixels"] == 6 and r["num_images"] == 1
    json.dumps(r, allow_nan=False)  # straight into a metrics file


def test_predictions_on_ignored_pixels_do_not_count():
    other = PRED.clone()
    other[1, 2:] = torch.tensor([0, 0])  # only the two ignored pixels change
    assert scored(other, TARGET).compute() == scored(PRED, TARGET).compute()


def test_class_absent_from_gt_and_prediction_is_null_and_left_out_of_the_mean():
    # 4 classes, class 3 appears nowhere: its IoU is undefined, not 0 (cityscapesscripts: NaN,
    # skipped by getScoreAverage).
    r = scored(PRED, TARGET, num_classes=4).compute()
    assert r["per_class_iou"]["3"] is None
    assert r["per_class_precision"]["3"] is None and r["per_class_recall"]["3"] is None
    assert r["miou"] == pytest.approx(0.5)
    assert r["mean_accuracy"] == pytest.approx(2 / 3)


def test_class_predicted_but_absent_from_gt_scores_zero_and_counts():
    pred = PRED.clone()
    pred[0, 0] = 3  # a false positive of class 3 where gt is class 0
    r = scored(pred, TARGET, num_classes=4).compute()
    assert r["per_class_iou"]["3"] == 0.0
    assert r["per_class_iou"]["0"] == 0.0  # class 0 lost its only hit
    assert r["miou"] == pytest.approx((0 + 2 / 3 + 1 / 2 + 0) / 4)
    assert r["per_class_recall"]["3"] is None  # no gt pixels: recall undefined


def test_void_prediction_is_a_miss_but_no_false_positive():
    target = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, V, 1, 1]])
    m = scored(pred, target, num_classes=2)
    assert m.void_pred.tolist() == [1, 0]
    r = m.compute()
    assert r["per_class_iou"] == pytest.approx({"0": 1 / 2, "1": 1.0})
    assert r["pixel_accuracy"] == pytest.approx(3 / 4)


def test_nothing_seen_gives_nulls_not_nan():
    r = SegMetrics(3).compute()
    assert r["miou"] is None and r["pixel_accuracy"] is None and r["fwiou"] is None
    json.dumps(r, allow_nan=False)


def test_batch_equals_images_one_by_one():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (3, 16, 32), generator=g)
    target[target == 3] = V
    pred = torch.randint(0, 3, (3, 16, 32), generator=g)
    batch = scored(pred, target)
    single = SegMetrics(3)
    for p, t in zip(pred, target, strict=True):
        single.update(p, t)
    assert torch.equal(batch.confusion, single.confusion)
    assert batch.compute() == single.compute()


def test_states_sum_like_an_all_reduce_and_reset():
    a, b, both = SegMetrics(3), SegMetrics(3), SegMetrics(3)
    a.update(PRED, TARGET)
    b.update(TARGET.clamp(max=2), TARGET)
    both.update(PRED, TARGET)
    both.update(TARGET.clamp(max=2), TARGET)
    # what dist.all_reduce(t, SUM) does to each of a's tensors
    for mine, theirs in zip(a.tensors(), b.tensors(), strict=True):
        mine += theirs
    assert a.compute() == both.compute()

    restored = SegMetrics(3)
    restored.load_state(both.state())
    assert restored.compute() == both.compute()
    restored.reset()
    assert int(restored.confusion.sum()) == 0 and restored.compute()["miou"] is None


def test_bad_inputs_raise():
    m = SegMetrics(3)
    with pytest.raises(ValueError, match="shape"):
        m.update(PRED, TARGET[:1])
    with pytest.raises(ValueError, match="pred holds values"):
        m.update(torch.full_like(PRED, 7), TARGET)
    with pytest.raises(ValueError, match="target holds values"):
        m.update(PRED, torch.full_like(TARGET, 5))
    with pytest.raises(ConfigError):
        SegMetrics(3, class_names=("a", "b"))


# ---------------------------------------------------------------------- categories and iIoU

NAMES = ("road", "car", "truck")
CATS = ("flat", "vehicle", "vehicle")
INST = (False, True, True)
SIZES = {"car": 4.0, "truck": 8.0}


def instance_metrics():
    # Without train_to_label, instance ids are train_id * 1000 + n: 1001 = car #1, 2001 = truck #1.
    return SegMetrics(
        3,
        class_names=NAMES,
        class_categories=CATS,
        instance_classes=INST,
        avg_instance_size=SIZES,
    )


def test_category_iou_by_hand():
    target = torch.tensor([[0, 0, 1, 1, 2, 2]])
    pred = torch.tensor([[0, 1, 2, 1, 2, 0]])
    r = scored(pred, target, class_names=NAMES, class_categories=CATS).compute()
    # flat: tp 1, fn 1 (road->car), fp 1 (truck->road) -> 1/3
    # vehicle: tp 3 (car->truck counts), fn 1, fp 1 -> 3/5
    assert r["category_iou"] == pytest.approx({"flat": 1 / 3, "vehicle": 3 / 5})
    assert r["miou_category"] == pytest.approx((1 / 3 + 3 / 5) / 2)


def test_iiou_weights_instances_by_size():
    target = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 2, 2]])
    inst = torch.tensor([[0, 0, 1001, 1001, 1001, 1001, 1002, 1002, 2001, 2001]])
    pred = torch.tensor([[0, 1, 1, 1, 2, 0, 1, 1, 2, 2]])
    m = instance_metrics()
    m.update(pred, target, inst)
    r = m.compute()
    # car #1: 4 px, weight 4/4 = 1: hits 2 (class) / 3 (category: truck is a vehicle)
    # car #2: 2 px, weight 4/2 = 2: hits 2 / 2
    # car: tpW = 2 + 4 = 6, fnW = 2 + 0 = 2, fp = 1 (road pixel predicted car) -> 6 / 9
    # truck #1: 2 px, weight 4: tpW 8, fnW 0, fp = 1 (car pixel predicted truck) -> 8 / 9
    assert r["per_class_iiou"] == pytest.approx({"car": 6 / 9, "truck": 8 / 9})
    assert r["iiou"] == pytest.approx((6 / 9 + 8 / 9) / 2)
    # vehicle category: tpW = 3*1 + 2*2 + 2*4 = 15, fnW = 1, fp = 1 (road->car) -> 15 / 17
    assert r["category_iiou"] == pytest.approx({"vehicle": 15 / 17})
    assert r["iiou_category"] == pytest.approx(15 / 17)
    json.dumps(r, allow_nan=False)


def test_iiou_only_when_instances_given_and_ids_per_image():
    target = torch.tensor([[1, 1], [1, 1]])
    pred = torch.tensor([[1, 0], [1, 1]])
    m = instance_metrics()
    m.update(pred, target)
    assert "iiou" not in m.compute()

    # The same instance id in two images of a batch is two instances.
    inst = torch.tensor([[1001, 1001], [1001, 1001]])
    batch, single = instance_metrics(), instance_metrics()
    batch.update(
        torch.stack([pred, target]), torch.stack([target, target]), torch.stack([inst, inst])
    )
    single.update(pred, target, inst)
    single.update(target, target, inst)
    assert batch.compute() == single.compute()
    assert torch.allclose(batch.instance_stats, single.instance_stats)


@needs_sample
def test_from_spec_on_the_real_frame_scores_perfect_prediction_as_one():
    from pipeline.data.pngio import read_png

    root = f"{SAMPLE_ROOT}/gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_"
    spec = get_spec("cityscapes")
    train = torch.from_numpy(spec.to_train_ids(read_png(root + "labelIds.png")))
    inst = torch.from_numpy(read_png(root + "instanceIds.png"))  # uint16, as the PNG stores it
    m = SegMetrics.from_spec(spec)
    m.update(train, train, inst)
    r = m.compute()
    assert r["miou"] == 1.0 and r["iiou"] == 1.0 and r["miou_category"] == 1.0
    assert set(r["per_class_iou"]) == set(spec.class_names)
    assert any(v is None for v in r["per_class_iou"].values())  # classes not in this frame
    assert not math.isnan(r["iiou_category"])


def test_huge_instance_ids_give_the_same_numbers():
    # Raw label ids in the thousands make instance ids too large for the dense per-id table;
    # those are numbered with torch.unique first.
    target = torch.tensor([[0, 1, 1, 1, 2, 2]])
    pred = torch.tensor([[0, 1, 2, 1, 2, 0]])
    small = torch.tensor([[0, 1001, 1001, 1002, 2001, 2001]])
    huge = torch.where(small > 1000, small + (small // 1000) * 4_999_000, small)  # 5_000_001, ...
    a, b = (
        instance_metrics(),
        SegMetrics(
            3,
            class_names=NAMES,
            class_categories=CATS,
            instance_classes=INST,
            avg_instance_size=SIZES,
            train_to_label=(0, 5000, 10000),
        ),
    )
    a.update(pred, target, small)
    b.update(pred, target, huge)
    assert a.instance_stats.sum() > 0
    assert torch.allclose(a.instance_stats, b.instance_stats)

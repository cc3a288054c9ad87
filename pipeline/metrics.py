"""Confusion matrix and the scores derived from it, computed as the Cityscapes benchmark does.

`SegMetrics` accumulates, on the device of the tensors it is fed, everything the scores need:

    confusion      (C, C) int64    rows = ground-truth train id, columns = predicted train id
    void_pred      (C,)   int64    ground-truth pixels of class c predicted as void (ignore_index)
    instance_stats (4, C) float64  per instance class: size-weighted tp, fn at class level and
                                   at category level (for iIoU)
    counts         (2,)   int64    images seen, images that came with instance ids

These four tensors are the whole state: `tensors()` hands them out so a distributed evaluation
can `all_reduce` them in place (sum) before `compute()`.

How the scores follow cityscapesscripts' evalPixelLevelSemanticLabeling (v2.3.0):

- Ground-truth pixels labelled `ignore_index` are dropped: they are neither misses nor false
  positives. A prediction of `ignore_index` (a void class, e.g. a labelId prediction of
  "unlabeled") on a valid pixel is a miss (false negative) for the true class and a false
  positive for no class -- the official script's confusion row keeps such pixels, its
  false-positive column sum skips them.
- IoU = tp / (tp + fp + fn); a class with tp + fp + fn == 0 (absent from the ground truth and
  never predicted on a valid pixel) gets NaN, reported as null, and the mean (`miou`) is taken
  over the remaining classes. A class absent from the ground truth but predicted somewhere
  scores 0 and counts. This is the official `getScoreAverage`, which skips NaN entries.
- Category IoU treats all classes of a category as one class (`getIouScoreForCategory`).
- iIoU weights every ground-truth instance's pixels by avg_size[class] / instance_size, so
  large and small instances count alike; false positives stay unweighted pixel counts
  (`getInstanceIouScoreForLabel`). Only instance ids > 1000 whose label is an evaluated
  instance class count, as in `evaluatePair`.

One known difference: the official category iIoU also counts a prediction of an
ignored-in-evaluation vehicle label (caravan, trailer) as "vehicle". Here those predictions
have become void before they reach the metric (the 19-class table maps them to 255), so they
count as misses. A 19-class model never predicts them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from pipeline.errors import ConfigError

# Average pixel size of an instance per class over the Cityscapes train set, the weights of
# iIoU. Copied from cityscapesscripts' evalPixelLevelSemanticLabeling (args.avgClassSize),
# which exposes it only as a module-level global of a script that reads env vars on import.
CITYSCAPES_AVG_INSTANCE_SIZE: dict[str, float] = {
    "bicycle": 4672.3249222261,
    "caravan": 36771.8241758242,
    "motorcycle": 6298.7200839748,
    "rider": 3930.4788056518,
    "bus": 35732.1511111111,
    "train": 67583.7075812274,
    "car": 12794.0202738185,
    "person": 3462.4756337644,
    "truck": 27855.1264367816,
    "trailer": 16926.9763313609,
}

# Cityscapes instanceIds: label_id * 1000 + n for pixels of an instance; ids <= 1000 are
# plain label ids (stuff, or "group" regions with no single instance).
INSTANCE_ID_DIVISOR = 1000

# Rows of `instance_stats`.
_TP_W, _FN_W, _CAT_TP_W, _CAT_FN_W = range(4)


class SegMetrics:
    """Accumulate a confusion matrix (and iIoU instance stats) over batches; `compute()` scores.

    `class_categories` (category name per train id) enables category scores; `instance_classes`
    (bool per train id) and `train_to_label` (raw label id per train id, used to read the label
    id out of Cityscapes instanceIds) enable iIoU. Without `train_to_label`, instance ids are
    read as train_id * 1000 + n.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        class_categories: Sequence[str] | None = None,
        instance_classes: Sequence[bool] | None = None,
        device: torch.device | str = "cpu",
        train_to_label: Sequence[int] | None = None,
        avg_instance_size: Mapping[str, float] | None = None,
    ) -> None:
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        if ignore_index < num_classes:  # a negative one would need a second kind of key
            raise ConfigError(
                f"ignore_index must be >= num_classes ({num_classes}), got {ignore_index}"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.device = torch.device(device)
        self.class_names = (
            tuple(class_names) if class_names else tuple(str(i) for i in range(num_classes))
        )
        for name, seq in (
            ("class_names", self.class_names),
            ("class_categories", class_categories),
            ("instance_classes", instance_classes),
            ("train_to_label", train_to_label),
        ):
            if seq is not None and len(seq) != num_classes:
                raise ConfigError(
                    f"{name} has {len(seq)} entries, expected num_classes={num_classes}"
                )
        self.class_categories = tuple(class_categories) if class_categories else None
        self.instance_classes = (
            tuple(bool(x) for x in instance_classes) if instance_classes else None
        )

        C = num_classes
        self.images = None  # per-frame counts where an evaluation kept them (engine.evaluate)
        self.confusion = torch.zeros(C, C, dtype=torch.int64, device=self.device)
        self.void_pred = torch.zeros(C, dtype=torch.int64, device=self.device)
        self.instance_stats = torch.zeros(4, C, dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(2, dtype=torch.int64, device=self.device)

        # update() histograms (target, pred) pairs over every id either may hold: 0..base-1.
        self._base = max(C, ignore_index + 1)
        if self._base > 4096:
            raise ConfigError(f"ignore_index {ignore_index} too large (at most 4095)")
        not_an_id = torch.ones(self._base, dtype=torch.bool)
        not_an_id[:C] = False
        not_an_id[ignore_index] = False
        self._not_an_id = not_an_id.to(self.device)

        # Category index per train id, plus a last slot (-1) for void predictions.
        cats = self.class_categories or tuple(str(i) for i in range(C))
        self._category_names = tuple(dict.fromkeys(cats))  # unique, in first-seen order
        cat_index = [self._category_names.index(c) for c in cats] + [-1]
        self._cat_of = torch.tensor(cat_index, dtype=torch.int64, device=self.device)
        # (C, C + 1): 1 where predicted class j (last: void) is in the category of class c.
        self._same_category = (self._cat_of[:C, None] == self._cat_of[None, :]).to(torch.float64)

        self._instance_lut = None
        if self.instance_classes is not None and any(self.instance_classes):
            sizes = CITYSCAPES_AVG_INSTANCE_SIZE if avg_instance_size is None else avg_instance_size
            missing = [
                n
                for n, has in zip(self.class_names, self.instance_classes, strict=True)
                if has and n not in sizes
            ]
            if missing:
                raise ConfigError(f"no average instance size (iIoU weight) for class(es) {missing}")
            self._avg_size = torch.tensor(
                [
                    sizes[n] if has else 0.0
                    for n, has in zip(self.class_names, self.instance_classes, strict=True)
                ],
                dtype=torch.float64,
                device=self.device,
            )
            # raw label id -> train id of an instance class, -1 otherwise; the last slot
            # catches label ids beyond the table.
            raw = list(train_to_label) if train_to_label is not None else list(range(C))
            lut = torch.full((max(raw) + 2,), -1, dtype=torch.int64)
            for train_id, (label_id, has) in enumerate(
                zip(raw, self.instance_classes, strict=True)
            ):
                if has:
                    lut[label_id] = train_id
            self._instance_lut = lut.to(self.device)

    @classmethod
    def from_spec(cls, spec, device: torch.device | str = "cpu") -> SegMetrics:
        """Metrics for a `pipeline.data.labels.DatasetSpec` (names, categories, instances)."""
        return cls(
            spec.num_classes,
            ignore_index=spec.ignore_index,
            class_names=spec.class_names,
            class_categories=spec.class_categories,
            instance_classes=spec.instance_classes,
            device=device,
            train_to_label=spec.train_to_label,
        )

    # ----------------------------------------------------------------------------- state

    def tensors(self) -> list[torch.Tensor]:
        """The accumulated state; summing each across workers (all_reduce) merges evaluations."""
        return [self.confusion, self.void_pred, self.instance_stats, self.counts]

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "confusion": self.confusion.clone(),
            "void_pred": self.void_pred.clone(),
            "instance_stats": self.instance_stats.clone(),
            "counts": self.counts.clone(),
        }

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        for name, t in zip(
            ("confusion", "void_pred", "instance_stats", "counts"), self.tensors(), strict=True
        ):
            if tuple(state[name].shape) != tuple(t.shape):
                raise ConfigError(
                    f"metrics state {name!r} has shape {tuple(state[name].shape)}, expected {tuple(t.shape)}"
                )
            t.copy_(state[name])

    def reset(self) -> None:
        for t in self.tensors():
            t.zero_()

    # ---------------------------------------------------------------------------- update

    @torch.no_grad()
    def update(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        instances: torch.Tensor | None = None,
        per_image: bool = False,
    ) -> torch.Tensor | None:
        """Add (B, H, W) or (H, W) integer train ids; `target` may hold `ignore_index`, `pred`
        holds [0, C) or `ignore_index` (void). `instances`: Cityscapes instanceIds, same shape.

        `per_image`: also return each image's counts, (B, C, C + 1) int64 on the metric's
        device: its confusion matrix, and in the last column its void predictions (what
        `void_pred` adds up). Summed over images they are exactly this update's share of
        `confusion` and `void_pred` (pipeline.compare resamples them)."""
        if pred.shape != target.shape:
            raise ValueError(
                f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}"
            )
        if pred.dim() not in (2, 3):
            raise ValueError(f"expected (H, W) or (B, H, W), got shape {tuple(pred.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError("pred and target must be integer train ids, not logits/floats")
        C, base = self.num_classes, self._base
        num_images = 1 if pred.dim() == 2 else pred.shape[0]
        p = _signed(pred.to(self.device)).reshape(-1)
        t = _signed(target.to(self.device)).reshape(-1)
        for name, x in (("pred", p), ("target", t)):
            if x.dtype == torch.uint8 and base == 256:
                continue  # every uint8 value has a bin; bad ones are caught in the table below
            lo, hi = torch.aminmax(x)
            if int(lo) < 0 or int(hi) >= base:
                raise ValueError(f"{name} holds values outside [0, {C}) and not ignore_index")

        # One pass: a joint histogram of (target, pred) over every value either may hold,
        # (base, base); its [:C, :C] block is the confusion matrix, its ignore column the void
        # predictions, its ignore row the ignored pixels. int32 keys: half the memory traffic.
        key = t.to(torch.int32) * base + p.to(torch.int32)
        images = None
        if per_image:  # the same one pass, with the image's index as the highest digit
            wide = num_images * base * base > torch.iinfo(torch.int32).max
            image = torch.arange(num_images, device=key.device, dtype=key.dtype)
            key = key.to(torch.int64) if wide else key
            key = key.reshape(num_images, -1) + (image.to(key.dtype) * (base * base))[:, None]
            images = torch.bincount(key.reshape(-1), minlength=num_images * base * base)
            images = images.reshape(num_images, base, base)
            table = images.sum(0)
        else:
            table = torch.bincount(key, minlength=base * base).reshape(base, base)
        if bool(table[self._not_an_id].any()):
            raise ValueError(f"target holds values outside [0, {C}) and not ignore_index")
        if bool(table[:, self._not_an_id].any()):
            raise ValueError(f"pred holds values outside [0, {C}) and not ignore_index")
        self.confusion += table[:C, :C]
        self.void_pred += table[:C, self.ignore_index]
        self.counts[0] += num_images

        if instances is not None:
            if instances.shape != pred.shape:
                raise ValueError(
                    f"instances shape {tuple(instances.shape)} != pred shape {tuple(pred.shape)}"
                )
            if self._instance_lut is None:
                raise ConfigError("instances given but no instance classes were configured")
            inst = _signed(instances.to(self.device)).reshape(num_images, -1)
            for p_img, inst_img in zip(p.reshape(num_images, -1), inst, strict=True):
                self._update_instances(p_img, inst_img)
            self.counts[1] += num_images
        if images is None:
            return None
        # (B, C, C + 1): the confusion block and the void-prediction column of each image
        return torch.cat([images[:, :C, :C], images[:, :C, self.ignore_index, None]], dim=2)

    @torch.no_grad()
    def update_label_ids(
        self,
        pred_ids: torch.Tensor,
        target_ids: torch.Tensor,
        label_to_train: torch.Tensor,
        valid_ids: torch.Tensor,
        instances: torch.Tensor | None = None,
    ) -> None:
        """`update` for (H, W) uint8 raw label ids (official scoring reads labelId PNGs):
        the joint histogram of the raw ids, then their train ids through `label_to_train`
        ((256,) uint8, ignore_index for void) on the 256 x 256 table rather than on every
        pixel, and the instances' predictions on their own pixels only. The same counts as
        `update` of the mapped ids, in a third of the passes over the frame. Ids outside
        `valid_ids` ((256,) bool) raise UnknownIds before anything is counted."""
        C = self.num_classes
        if pred_ids.dtype != torch.uint8 or target_ids.dtype != torch.uint8:
            raise ValueError("update_label_ids takes uint8 label ids")
        if pred_ids.shape != target_ids.shape or pred_ids.dim() != 2:
            raise ValueError(f"expected two (H, W) arrays, got {tuple(pred_ids.shape)} and "
                             f"{tuple(target_ids.shape)}")  # fmt: skip
        lut = label_to_train.to(torch.int64)
        # target * 256 + pred in one int32 buffer, in place (5 ms less a 1024x2048 frame than
        # two int32 copies and two new tensors)
        key = target_ids.reshape(-1).to(torch.int32).mul_(256).add_(pred_ids.reshape(-1))
        joint = torch.bincount(key, minlength=256 * 256).reshape(256, 256)
        for side, present in (("target", joint.sum(1) > 0), ("pred", joint.sum(0) > 0)):
            unknown = torch.nonzero(present & ~valid_ids).flatten()
            if unknown.numel():
                raise UnknownIds(side, unknown.tolist())
        table = torch.zeros(self._base, self._base, dtype=torch.int64)
        table.index_put_((lut[:, None].expand(256, 256), lut[None, :].expand(256, 256)), joint,
                         accumulate=True)  # fmt: skip
        table = table.to(self.device)
        if bool(table[self._not_an_id].any()) or bool(table[:, self._not_an_id].any()):
            raise ValueError(f"label_to_train maps to values outside [0, {C}) and ignore_index")
        self.confusion += table[:C, :C]
        self.void_pred += table[:C, self.ignore_index]
        self.counts[0] += 1
        if instances is not None:
            if instances.shape != pred_ids.shape:
                raise ValueError(
                    f"instances shape {tuple(instances.shape)} != pred shape {tuple(pred_ids.shape)}"
                )
            if self._instance_lut is None:
                raise ConfigError("instances given but no instance classes were configured")
            inst = _signed(instances).reshape(-1)
            # only pixels of instances (ids > 1000) enter the instance table
            at = torch.nonzero(inst > INSTANCE_ID_DIVISOR).squeeze(1)
            p = label_to_train[pred_ids.reshape(-1).index_select(0, at).to(torch.int64)]
            self._update_instances(p.to(self.device), inst.index_select(0, at).to(self.device))
            self.counts[1] += 1

    def _update_instances(self, p: torch.Tensor, inst: torch.Tensor) -> None:
        """One image, flat: per ground-truth instance, its size and how many of its pixels were
        predicted as its class / its category, then the iIoU weight avg_size / size."""
        C, lut = self.num_classes, self._instance_lut
        if inst.numel() == 0:
            return
        low, top = (int(v) for v in torch.aminmax(inst))
        if low < 0:
            raise ValueError(f"instances hold a negative id ({low})")
        if top <= INSTANCE_ID_DIVISOR:  # as evaluatePair: only ids > 1000 are instances
            return
        if (top + 1) * (C + 1) <= 1 << 22:  # Cityscapes: ids < 34000, a dense table is cheapest
            ids, inst_id = inst.to(torch.int32), torch.arange(top + 1, device=inst.device)
        else:  # sparse or huge ids: number them first
            inst_id, ids = torch.unique(inst, return_inverse=True)
            ids = ids.to(torch.int32)
        # (ids, C + 1): pixels of each instance id by predicted class, void in the last column;
        # one bincount over the image instead of a mask per instance.
        p = p.clamp(max=C).to(torch.int32)  # void (ignore_index) -> C
        table = torch.bincount(ids * (C + 1) + p, minlength=inst_id.numel() * (C + 1))
        table = table.reshape(-1, C + 1)
        cls = lut[(inst_id // INSTANCE_ID_DIVISOR).clamp(max=lut.numel() - 1)]
        size = table.sum(1)
        # Keep real instances of evaluated instance classes: (N,) from here on.
        rows = torch.nonzero((inst_id > INSTANCE_ID_DIVISOR) & (cls >= 0) & (size > 0)).squeeze(1)
        table, inst_cls, size = (
            table[rows].to(torch.float64),
            cls[rows],
            size[rows].to(torch.float64),
        )
        hit = table.gather(1, inst_cls[:, None]).squeeze(1)
        cat_hit = (table * self._same_category[inst_cls]).sum(1)
        weight = self._avg_size[inst_cls] / size
        for row, value in (
            (_TP_W, hit * weight),
            (_FN_W, (size - hit) * weight),
            (_CAT_TP_W, cat_hit * weight),
            (_CAT_FN_W, (size - cat_hit) * weight),
        ):
            self.instance_stats[row].index_add_(0, inst_cls, value)

    # --------------------------------------------------------------------------- compute

    def compute(self) -> dict:
        """Scores as fractions in [0, 1]; undefined ones (nothing to score) are None."""
        conf = self.confusion.cpu().to(torch.float64)
        tp = conf.diag()
        gt_pixels = conf.sum(1) + self.void_pred.cpu().to(torch.float64)  # every valid GT pixel
        pred_pixels = conf.sum(0)  # predictions on valid GT pixels only
        fn = gt_pixels - tp
        fp = pred_pixels - tp
        total = gt_pixels.sum()

        iou = _ratio(tp, tp + fp + fn)
        recall = _ratio(tp, gt_pixels)
        precision = _ratio(tp, pred_pixels)
        f1 = _ratio(2 * tp, 2 * tp + fp + fn)
        present = gt_pixels > 0
        fwiou = float((gt_pixels[present] / total * iou[present]).sum()) if total > 0 else math.nan

        out: dict = {
            "miou": _nanmean(iou),
            "pixel_accuracy": float(tp.sum() / total) if total > 0 else math.nan,
            "mean_accuracy": _nanmean(recall),
            "fwiou": fwiou,
            "per_class_iou": self._per_class(iou),
            "per_class_precision": self._per_class(precision),
            "per_class_recall": self._per_class(recall),
            "per_class_f1": self._per_class(f1),
            "num_images": int(self.counts[0]),
            "num_pixels": int(total),
        }

        if self.class_categories is not None:

            def category_iou(m: torch.Tensor) -> float:
                cat_tp = conf[m][:, m].sum()  # a class of the category predicted as one
                cat_fp = conf[~m][:, m].sum()
                return _scalar_ratio(cat_tp, gt_pixels[m].sum() + cat_fp)  # tp + fn + fp

            out["miou_category"], out["category_iou"] = self._per_category(category_iou)

        if int(self.counts[1]) > 0 and self._instance_lut is not None:
            stats = self.instance_stats.cpu()
            has = torch.tensor(self.instance_classes)
            iiou = _ratio(stats[_TP_W], stats[_TP_W] + stats[_FN_W] + fp)
            out["iiou"] = _nanmean(iiou[has])
            out["per_class_iiou"] = {
                n: _none_if_nan(float(v))
                for n, v, h in zip(self.class_names, iiou, has, strict=True)
                if h
            }
            if self.class_categories is not None:

                def category_iiou(m: torch.Tensor) -> float | None:
                    if not bool(has[m].all()):  # official: only categories of instance classes
                        return None
                    cat_tp, cat_fn = stats[_CAT_TP_W][m].sum(), stats[_CAT_FN_W][m].sum()
                    return _scalar_ratio(cat_tp, cat_tp + cat_fn + conf[~m][:, m].sum())

                out["iiou_category"], out["category_iiou"] = self._per_category(category_iiou)

        return {k: _none_if_nan(v) if isinstance(v, float) else v for k, v in out.items()}

    def _per_category(self, score) -> tuple[float, dict[str, float | None]]:
        """(mean, {category: score}) of `score(mask of the category's classes)` over the
        categories it scores (None: left out); undefined scores are null and not averaged."""
        cats = self._cat_of[:-1].cpu()
        scores = {name: score(cats == k) for k, name in enumerate(self._category_names)}
        scores = {name: s for name, s in scores.items() if s is not None}
        mean = _nanmean(torch.tensor(list(scores.values()), dtype=torch.float64))
        return mean, {name: _none_if_nan(s) for name, s in scores.items()}

    def _per_class(self, values: torch.Tensor) -> dict[str, float | None]:
        return {n: _none_if_nan(float(v)) for n, v in zip(self.class_names, values, strict=True)}


class UnknownIds(ValueError):
    """Label ids the dataset's table does not know, in `side` ("pred" or "target")."""

    def __init__(self, side: str, ids: list[int]) -> None:
        super().__init__(f"{side} holds label id(s) {ids} not in the label table")
        self.side, self.ids = side, ids


def _signed(x: torch.Tensor) -> torch.Tensor:
    """uint16/uint32 (e.g. 16-bit instanceIds PNGs) as int32: torch implements few ops on them."""
    if x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        return x
    return x.to(torch.int32)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den elementwise, NaN where den == 0 (the score is undefined, not zero)."""
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.full_like(num, math.nan))


def _scalar_ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    return float(num / den) if float(den) > 0 else math.nan


def _nanmean(values: torch.Tensor) -> float:
    """Mean over defined entries (the official getScoreAverage); NaN if none is defined."""
    values = values[~torch.isnan(values)] if values.numel() else values
    return float(values.mean()) if values.numel() else math.nan


def _none_if_nan(x: float) -> float | None:
    """JSON has no NaN: an undefined score is written as null."""
    return None if math.isnan(x) else x


def confusion_png(confusion, class_names, path: Path) -> None:
    """The row-normalised confusion matrix as a heat map with class names (PIL only), written
    to `path` as it is (callers pass a temporary path: pipeline.atomic)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    rows = confusion.sum(1, keepdims=True)
    norm = np.divide(confusion, rows, out=np.zeros_like(confusion, dtype=float), where=rows > 0)
    n, cell, margin = len(class_names), 24, 130
    size = margin + n * cell + 10
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for i in range(n):
        for j in range(n):
            v = float(norm[i, j])  # white (0) -> dark blue (1), as matplotlib's "Blues"
            colour = tuple(int(255 - v * (255 - c)) for c in (8, 48, 107))
            x, y = margin + j * cell, margin + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour, outline="#dddddd")
        draw.text((4, margin + i * cell + 6), str(class_names[i])[:18], fill="black", font=font)
        label = Image.new("RGB", (margin - 4, cell), "white")
        ImageDraw.Draw(label).text((2, 6), str(class_names[i])[:18], fill="black", font=font)
        img.paste(label.rotate(90, expand=True), (margin + i * cell, 2))
    draw.text(
        (margin, size - 10), "columns: predicted, rows: ground truth", fill="black", font=font
    )
    img.save(path, format="PNG")

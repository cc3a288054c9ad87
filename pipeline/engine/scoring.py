"""Score a folder of predicted labelId PNGs against a Cityscapes gtFine tree.

The same job as cityscapesscripts' evalPixelLevelSemanticLabeling (and the same numbers, see
tests/test_scoring.py), without its env vars, prints and sys.exit, and faster: labels become
train ids through the dataset's table and one `SegMetrics` accumulates everything.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data.labels import DatasetSpec, get_spec
from pipeline.data.pngio import read_png
from pipeline.data.readers import worker_context
from pipeline.errors import DataError
from pipeline.metrics import SegMetrics, UnknownIds

log = logging.getLogger(__name__)

GT_SUFFIX = "_gtFine_labelIds.png"
INSTANCE_SUFFIX = "_gtFine_instanceIds.png"


@dataclass(frozen=True)
class ScoringPair:
    frame: str  # "{city}_{seq}_{frame}", e.g. "frankfurt_000000_000294"
    gt: Path
    pred: Path
    instance: Path | None


def score_prediction_folder(
    pred_dir: Path | str,
    gt_root: Path | str,
    split: str = "val",
    dataset: str = "cityscapes",
    progress: Callable[[int, int], None] | None = None,
    num_workers: int = 2,
) -> dict:
    """Scores (`SegMetrics.compute()`) of every `gtFine/{split}/*/*_gtFine_labelIds.png` under
    `gt_root` against its prediction in `pred_dir`. iIoU is included when every frame has its
    `_gtFine_instanceIds.png`. `progress(done, total)` is called after each image.

    `num_workers` processes read and score the frames, each its own (PNG decoding is most of
    the time, with libspng: it holds the GIL, so threads would take turns); their per-frame
    counts are summed here in the frames' order. 0 scores in this process, which is as fast
    on a machine whose cores are already busy."""
    spec = get_spec(dataset)
    pairs = find_pairs(pred_dir, gt_root, split)
    use_instances = all(p.instance is not None for p in pairs)
    if not use_instances:
        missing = sum(p.instance is None for p in pairs)
        log.warning(
            "%d of %d frames have no instanceIds PNG: iIoU is not computed", missing, len(pairs)
        )

    metrics = SegMetrics.from_spec(spec)
    with _one_torch_thread():
        for done, state in enumerate(_scored(pairs, spec, use_instances, num_workers), 1):
            for total, frame in zip(metrics.tensors(), state, strict=True):
                total += frame
            if progress is not None:
                progress(done, len(pairs))
    return metrics.compute()


def find_pairs(pred_dir: Path | str, gt_root: Path | str, split: str = "val") -> list[ScoringPair]:
    """Each ground-truth labelIds PNG with the one prediction that matches its frame id.

    Matching follows the official getPrediction: a prediction is any `{frame}*.png` anywhere
    under `pred_dir`, where `{frame}` is `{city}_{seq}_{frame}` of the ground-truth name;
    none or more than one is an error.
    """
    pred_dir, gt_root = Path(pred_dir), Path(gt_root)
    gt_dir = gt_root / "gtFine" / split
    if not gt_dir.is_dir():
        raise DataError(
            f"{gt_dir}: no such folder (expected a Cityscapes root with gtFine/{split}/)"
        )
    gts = sorted(gt_dir.glob(f"*/*{GT_SUFFIX}"))
    if not gts:
        raise DataError(f"{gt_dir}: no ground truth found (searched */*{GT_SUFFIX})")
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: prediction folder does not exist")

    # All file names under pred_dir, sorted, so the files starting with a frame id are one
    # contiguous run found by bisection (the official script fnmatch-es every file per frame).
    preds = sorted(
        (name, Path(root) / name)
        for root, _, names in os.walk(pred_dir)
        for name in names
        if name.endswith(".png")
    )
    names = [name for name, _ in preds]

    pairs = []
    for gt in gts:
        frame = "_".join(gt.name.split("_")[:3])
        matches = []
        i = bisect.bisect_left(names, frame)
        while i < len(names) and names[i].startswith(frame):
            matches.append(preds[i][1])
            i += 1
        if not matches:
            raise DataError(
                f"{gt}: no prediction in {pred_dir} (expected a file named {frame}*.png)"
            )
        if len(matches) > 1:
            listed = ", ".join(str(m) for m in sorted(matches))
            raise DataError(f"{gt}: {len(matches)} predictions match {frame}*.png: {listed}")
        inst = gt.with_name(gt.name[: -len(GT_SUFFIX)] + INSTANCE_SUFFIX)
        pairs.append(ScoringPair(frame, gt, matches[0], inst if inst.is_file() else None))
    return pairs


def load_pair(
    pair: ScoringPair, spec: DatasetSpec, use_instances: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(pred train ids, gt train ids, instanceIds or None) as (H, W) tensors, checked."""
    pred, gt, instances = load_label_ids(pair, use_instances)
    return (
        torch.from_numpy(spec.to_train_ids(pred.numpy(), str(pair.pred))),
        torch.from_numpy(spec.to_train_ids(gt.numpy(), str(pair.gt))),
        instances,
    )


def load_label_ids(
    pair: ScoringPair, use_instances: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(pred label ids, gt label ids, instanceIds or None) as (H, W) tensors, their shapes
    checked."""
    gt_ids = read_png(pair.gt)
    pred_ids = read_png(pair.pred)
    if pred_ids.ndim != 2:
        raise DataError(
            f"{pair.pred}: has {pred_ids.shape[2]} channels; expected a single-channel labelId PNG "
            "(write label ids, not a colour rendering)"
        )
    if gt_ids.ndim != 2:
        raise DataError(
            f"{pair.gt}: has {gt_ids.shape[2]} channels; expected single-channel labelIds"
        )
    if pred_ids.shape != gt_ids.shape:
        raise DataError(
            f"{pair.pred}: size {_wxh(pred_ids)} differs from its ground truth {pair.gt} ({_wxh(gt_ids)})"
        )
    pred_ids, gt_ids = _uint8(pred_ids, pair.pred), _uint8(gt_ids, pair.gt)
    instances = None
    if use_instances and pair.instance is not None:
        inst = read_png(pair.instance)
        if inst.shape != gt_ids.shape:
            raise DataError(
                f"{pair.instance}: size {_wxh(inst)} differs from {pair.gt} ({_wxh(gt_ids)})"
            )
        instances = torch.from_numpy(inst.astype(np.int32))  # 16-bit PNG: id * 1000 + n
    return torch.from_numpy(pred_ids), torch.from_numpy(gt_ids), instances


def _uint8(ids: np.ndarray, path: Path) -> np.ndarray:
    """Label ids as uint8 (a 16-bit labelId PNG with ids below 256 is fine)."""
    if ids.dtype == np.uint8:
        return ids
    if ids.min(initial=0) < 0 or ids.max(initial=0) > 255:
        raise DataError(f"{path}: label ids outside 0..255")
    return ids.astype(np.uint8)


class _FrameScores(torch.utils.data.Dataset):
    """Frame i -> its counts (SegMetrics.tensors()) or the DataError naming its file: the
    error travels as a value (a DataLoader worker's exception would come back wrapped in
    its traceback, not as the one line it is)."""

    def __init__(self, pairs: list[ScoringPair], spec: DatasetSpec, use_instances: bool) -> None:
        self.pairs, self.spec, self.use_instances = pairs, spec, use_instances
        self.lut = torch.from_numpy(spec.label_to_train)
        self.valid = torch.from_numpy(spec.valid_label_ids)
        self.metrics: SegMetrics | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> list[torch.Tensor] | DataError:
        pair = self.pairs[i]
        if self.metrics is None:
            self.metrics = SegMetrics.from_spec(self.spec)
        self.metrics.reset()
        try:
            pred, target, instances = load_label_ids(pair, self.use_instances)
            try:
                self.metrics.update_label_ids(pred, target, self.lut, self.valid, instances)
            except UnknownIds as exc:  # the spec's own one-line error, naming the file
                bad = pair.pred if exc.side == "pred" else pair.gt
                self.spec.to_train_ids((pred if exc.side == "pred" else target).numpy(), str(bad))
                raise
        except DataError as exc:
            return exc
        return [t.clone() for t in self.metrics.tensors()]


def _scored(
    pairs: list[ScoringPair], spec: DatasetSpec, use_instances: bool, num_workers: int
) -> Iterator[list[torch.Tensor]]:
    """Each frame's counts, in order; the first bad frame's DataError raised. DataLoader's
    workers compute with one thread each (torch sets it)."""
    frames = _FrameScores(pairs, spec, use_instances)
    workers = min(num_workers, len(pairs))
    loader = torch.utils.data.DataLoader(
        frames, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None,
        multiprocessing_context=worker_context(workers),
    )  # fmt: skip
    for state in loader:
        if isinstance(state, DataError):
            raise state
        yield state


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Score with one intra-op thread. The per-image tensor work is a few ms; what costs is
    PNG decoding, and OpenMP workers spinning beside it (or beside other processes on a
    shared machine) made scoring 2-4x slower in benchmarks/scoring_vs_cityscapesscripts.py."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _wxh(a: np.ndarray) -> str:
    return f"{a.shape[1]}x{a.shape[0]}"

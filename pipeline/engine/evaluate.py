"""Evaluation of a model on shards, and prediction of image files.

Images are evaluated at their stored resolution (1024x2048 for Cityscapes): no resizing of
the ground truth, ever. Predictions are compared to train ids; instanceIds, where the shards
have them, feed the Cityscapes iIoU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data.labels import DatasetSpec
from pipeline.data.shards import EvalReader
from pipeline.data.transforms import normalize
from pipeline.engine.inference import predict_probs
from pipeline.errors import DataError
from pipeline.metrics import SegMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceOptions:
    mode: str = "whole"  # whole | slide
    crop: tuple[int, int] = (1024, 1024)
    stride: tuple[int, int] = (768, 768)
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def predict_batch(
    model, images_uint8: torch.Tensor, num_classes: int, opts: InferenceOptions
) -> torch.Tensor:
    """uint8 (B, 3, H, W) on the model's device -> (B, H, W) int64 train ids."""
    x = normalize(images_uint8)
    probs = predict_probs(
        model, x, num_classes, mode=opts.mode, crop=opts.crop, stride=opts.stride,
        scales=opts.scales, flip=opts.flip,
    )  # fmt: skip
    return probs.argmax(1)


def _batches(samples: Iterable[dict], batch_size: int):
    """Group samples of equal size into batches (no resizing, no padding)."""
    batch: list[dict] = []
    for s in samples:
        if batch and (len(batch) == batch_size or batch[0]["image"].shape != s["image"].shape):
            yield batch
            batch = []
        batch.append(s)
    if batch:
        yield batch


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    shards,
    spec: DatasetSpec,
    device: torch.device,
    opts: InferenceOptions = InferenceOptions(),
    batch_size: int = 1,
    rank: int = 0,
    world_size: int = 1,
    progress: Callable[[int, int | None], None] | None = None,
    total: int | None = None,
) -> tuple[dict, SegMetrics]:
    """Score `model` on every sample of `shards` once. With world_size > 1, each rank scores a
    disjoint part and the confusion matrices are all-reduced (torch.distributed must be set up).
    Returns (metrics dict, the SegMetrics holding the confusion matrix)."""
    model.eval()
    metrics = SegMetrics.from_spec(spec, device=device)
    reader = EvalReader(shards, rank=rank, world_size=world_size)
    done, t0, pixels = 0, time.perf_counter(), 0
    for batch in _batches(reader, batch_size):
        images = torch.stack([s["image"] for s in batch]).to(device, non_blocking=True)
        if any(s["label"] is None for s in batch):
            raise ValueError(
                f"{batch[0]['key']}: sample has no label; cannot evaluate a test split"
            )
        labels = torch.stack([s["label"] for s in batch]).to(device)
        pred = predict_batch(model, images, spec.num_classes, opts)
        instances = None
        if all(s["instance"] is not None for s in batch) and spec.instance_classes is not None:
            instances = torch.stack([s["instance"] for s in batch]).to(device)
        metrics.update(pred, labels, instances)
        done += len(batch)
        pixels += labels.numel()
        if progress:
            progress(done, total)
    if world_size > 1:
        import torch.distributed as dist

        for t in metrics.tensors():
            dist.all_reduce(t)
    result = metrics.compute()
    seconds = time.perf_counter() - t0
    result["images"] = int(metrics.counts[0])
    result["seconds"] = seconds
    log.info("evaluated %d images in %.1fs", done, seconds)
    return result, metrics


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files, folders (recursive) or globs -> sorted image paths."""
    import glob

    out: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.update(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            out.add(p)
        else:
            matches = [Path(m) for m in glob.glob(item, recursive=True)]
            if not matches:
                raise DataError(f"{item}: no such file, folder or matching glob")
            out.update(m for m in matches if m.is_file())
    if not out:
        raise DataError(f"no images found in {', '.join(inputs)}")
    return sorted(out)


def output_stem(path: Path) -> str:
    name = path.stem
    return name[: -len("_leftImg8bit")] if name.endswith("_leftImg8bit") else name


@torch.no_grad()
def predict_files(
    model: torch.nn.Module,
    paths: Sequence[Path],
    out_dir: Path,
    spec: DatasetSpec,
    device: torch.device,
    opts: InferenceOptions = InferenceOptions(),
    batch_size: int = 1,
    outputs: Sequence[str] = ("trainids", "labelids", "color", "overlay"),
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write `{stem}_{trainIds,labelIds,color,overlay}.png` per image into out_dir.

    labelIds is the Cityscapes test-server format; color uses the dataset palette; overlay
    blends it over the image (50 %). Each PNG is written to a temporary name, then renamed.
    """
    from pipeline.data.pngio import read_png

    model.eval()
    stems: dict[str, Path] = {}
    for p in paths:
        if output_stem(p) in stems:
            raise DataError(
                f"{p} and {stems[output_stem(p)]}: same name, their outputs would collide"
            )
        stems[output_stem(p)] = p
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    samples = (
        {"path": p, "image": torch.from_numpy(read_png(p, "RGB")).permute(2, 0, 1)} for p in paths
    )
    done = 0
    for batch in _batches(samples, batch_size):
        images = torch.stack([s["image"] for s in batch]).to(device)
        pred = predict_batch(model, images, spec.num_classes, opts).to(torch.uint8).cpu().numpy()
        for s, train_ids in zip(batch, pred, strict=True):
            stem = output_stem(s["path"])
            files = {}
            if "trainids" in outputs:
                files["trainIds"] = train_ids
            if "labelids" in outputs:
                files["labelIds"] = spec.to_label_ids(train_ids)
            color = spec.colorize(train_ids)
            if "color" in outputs:
                files["color"] = color
            if "overlay" in outputs:
                img = s["image"].permute(1, 2, 0).numpy()
                files["overlay"] = ((img.astype(np.uint16) + color) // 2).astype(np.uint8)
            for kind, arr in files.items():
                written.append(_write_png_atomic(arr, out_dir / f"{stem}_{kind}.png"))
        done += len(batch)
        if progress:
            progress(done, len(paths))
    return written


def _write_png_atomic(array: np.ndarray, path: Path) -> Path:
    from pipeline.atomic import atomic_write
    from pipeline.data.pngio import encode_png

    return atomic_write(path, encode_png(array, compress_level=3))

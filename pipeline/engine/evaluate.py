"""Evaluation of a model on shards, at the stored resolution (1024x2048 for Cityscapes): no
resizing of the ground truth, ever.

DataLoader workers read, verify (against the manifest's sha256) and decode the frames, labels
and instanceIds; the evaluating process moves each batch of full-resolution frames to the
device, predicts under autocast (bf16 on GPUs that have it) and adds it to a confusion matrix
that stays on the device (instanceIds feed the Cityscapes iIoU). Training validates through
the same function.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.data.labels import DatasetSpec
from pipeline.data.readers import eval_loader
from pipeline.data.transforms import normalize
from pipeline.engine.device import autocast
from pipeline.engine.inference import predict_scores
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
    amp: torch.dtype | None = None  # autocast dtype (pipeline.engine.device.precision)


@dataclass(frozen=True)
class ImageCounts:
    """Each evaluated frame's counts: `keys` (N,) sorted, `counts` (N, C, C + 1) int64 on the
    CPU: the frame's confusion matrix (rows ground truth, columns prediction) and, last, its
    void predictions. They add up to the evaluation's confusion and void_pred."""

    keys: list[str]
    counts: torch.Tensor


def _gather_images(
    keys: list[str], tables: list[torch.Tensor], num_classes: int, world_size: int
) -> ImageCounts:
    C = num_classes
    counts = torch.cat(tables).cpu() if tables else torch.zeros(0, C, C + 1, dtype=torch.int64)
    parts = [(keys, counts)]
    if world_size > 1:  # a few KB per frame: objects are simplest, and gloo and NCCL take them
        parts = [None] * world_size
        torch.distributed.all_gather_object(parts, (keys, counts))
    all_keys = [k for ks, _ in parts for k in ks]
    all_counts = torch.cat([c for _, c in parts])
    order = sorted(range(len(all_keys)), key=all_keys.__getitem__)
    if len(set(all_keys)) != len(all_keys):
        raise DataError("evaluated frames: a key appears twice (the ranks' slices overlap)")
    return ImageCounts([all_keys[i] for i in order], all_counts[order])


def prepare_for_inference(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model on `device` in eval mode; channels-last on CUDA (cuDNN's fast layout)."""
    model = model.to(device).eval()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def predict_batch(
    model, images_uint8: torch.Tensor, num_classes: int, opts: InferenceOptions
) -> torch.Tensor:
    """uint8 (B, 3, H, W) on the model's device -> (B, H, W) int64 train ids."""
    x = normalize(images_uint8)
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device, opts.amp):
        scores = predict_scores(
            model, x, num_classes, mode=opts.mode, crop=opts.crop, stride=opts.stride,
            scales=opts.scales, flip=opts.flip,
        )  # fmt: skip
    return scores.argmax(1)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    shards,
    spec: DatasetSpec,
    device: torch.device,
    opts: InferenceOptions = InferenceOptions(),
    batch_size: int = 1,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: Callable[[int, int | None], None] | None = None,
    per_image: bool = False,
) -> tuple[dict, SegMetrics]:
    """Score `model` on every sample of `shards` once. With world_size > 1, each rank scores a
    disjoint part and the confusion matrices are all-reduced (torch.distributed must be set up).
    Returns (metrics dict, the SegMetrics holding the confusion matrix).

    `per_image`: also keep each frame's counts (SegMetrics.update's per-image tables), in
    `SegMetrics.images` as an ImageCounts sorted by key; with world_size > 1 every rank's
    frames are gathered, so each rank holds them all."""
    model.eval()
    metrics = SegMetrics.from_spec(spec, device=device)
    use_instances = bool(spec.instance_classes and any(spec.instance_classes))
    loader = eval_loader(
        shards, batch_size, workers, rank, world_size, pin_memory=device.type == "cuda",
        instance=use_instances,
    )  # fmt: skip
    total = loader.dataset.num_samples() if progress else None  # without a manifest: a read
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    done, t0 = 0, time.perf_counter()
    keys: list[str] = []
    tables: list[torch.Tensor] = []  # (B, C, C + 1) each, left on the device until the end
    for batches in loader:  # frames of one size per batch (see collate_eval)
        for b in batches:
            if b["label"] is None:
                raise DataError(
                    f"{shards}: {b['key'][0]}: sample has no label; cannot evaluate a test split"
                )
            images = b["image"].to(device, non_blocking=True)  # (B, 3, H, W) uint8
            labels = b["label"].to(device, non_blocking=True)  # (B, H, W) uint8
            instances = b["instance"]  # (B, H, W) int32 or None
            if instances is not None:
                instances = instances.to(device, non_blocking=True)
            pred = predict_batch(model, images, spec.num_classes, opts)
            table = metrics.update(pred, labels, instances, per_image=per_image)
            if per_image:
                keys.extend(b["key"])
                tables.append(table)
            done += len(b["key"])
        if progress:
            progress(done, total)
    if world_size > 1:  # every rank scored its slice: sum the counts
        for t in metrics.tensors():
            torch.distributed.all_reduce(t)
    if per_image:
        metrics.images = _gather_images(keys, tables, spec.num_classes, world_size)
    result = metrics.compute()
    seconds = time.perf_counter() - t0
    result["images"] = int(metrics.counts[0])
    result["seconds"] = seconds
    result["images_per_s"] = result["images"] / max(seconds, 1e-9)
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    log.info("evaluated %d images in %.1fs", result["images"], seconds)
    return result, metrics

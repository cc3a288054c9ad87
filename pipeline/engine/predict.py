"""Prediction of image files: trainIds, labelIds (the Cityscapes test-server format), colour
and overlay PNGs per image, written atomically."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import atomic_write
from pipeline.data.labels import DatasetSpec
from pipeline.data.pngio import encode_png, read_png
from pipeline.engine.evaluate import InferenceOptions, predict_batch
from pipeline.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
OUTPUTS = ("trainids", "labelids", "color", "overlay")


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


def _same_size_batches(samples: Iterable[dict], batch_size: int):
    """Group consecutive images of equal size into batches (no resizing, no padding)."""
    batch: list[dict] = []
    for s in samples:
        if batch and (len(batch) == batch_size or batch[0]["image"].shape != s["image"].shape):
            yield batch
            batch = []
        batch.append(s)
    if batch:
        yield batch


@torch.no_grad()
def predict_files(
    model: torch.nn.Module,
    paths: Sequence[Path],
    out_dir: Path,
    spec: DatasetSpec,
    device: torch.device,
    opts: InferenceOptions = InferenceOptions(),
    batch_size: int = 1,
    outputs: Sequence[str] = OUTPUTS,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write `{stem}_{trainIds,labelIds,color,overlay}.png` per image into out_dir.

    labelIds is the Cityscapes test-server format; color uses the dataset palette; overlay
    blends it over the image (50 %). Each PNG is written to a temporary name, then renamed.
    """
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
    for batch in _same_size_batches(samples, batch_size):
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
                path = out_dir / f"{stem}_{kind}.png"
                written.append(atomic_write(path, encode_png(arr, compress_level=3)))
        done += len(batch)
        if progress:
            progress(done, len(paths))
    return written

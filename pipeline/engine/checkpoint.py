"""Checkpoints: atomic writes, safe loads (weights_only=True), and model rebuilding."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from pipeline.atomic import atomic_path
from pipeline.errors import CheckpointError


def save_atomic(obj: dict, path: Path | str) -> Path:
    """torch.save to a temporary file in the same folder, then rename over `path`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


# model_config keys of checkpoints written before they named the part they configure
_RENAMED = {"separable": "separable_head", "multi_grid": "resnet_multi_grid"}


def load(path: Path | str, map_location="cpu") -> dict:
    """Load a checkpoint with weights_only=True; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle/zip errors have many types
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(obj, dict) or "model" not in obj:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no 'model' entry)")
    if obj.get("model_config"):
        obj["model_config"] = {_RENAMED.get(k, k): v for k, v in obj["model_config"].items()}
    return obj


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_from_checkpoint(path: Path | str, device="cpu", output_stride: int | None = None):
    """(model in eval mode, checkpoint dict). The model config travels in the checkpoint; the
    model runs at `output_stride`, else at the stride it last trained at (8 after a switch)."""
    from pipeline.models import build_model

    ckpt = load(path)
    cfg = dict(ckpt.get("model_config") or {})
    if not cfg:
        raise CheckpointError(f"{path}: checkpoint has no model_config")
    cfg["pretrained_backbone"] = None  # the weights come from the checkpoint
    model = build_model(**cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model {cfg} ({exc})") from None
    output_stride = output_stride or ckpt.get("output_stride")
    if output_stride is not None and output_stride != model.output_stride:
        model.set_output_stride(output_stride)
    return model.to(device).eval(), ckpt


def average_checkpoints(paths: list[Path | str], out: Path | str) -> Path:
    """Uniform average of model weights (float tensors) of several checkpoints of one model.
    Integer buffers (BN's num_batches_tracked) are taken from the first."""
    if not paths:
        raise CheckpointError("no checkpoints to average")
    ckpts = [load(p) for p in paths]
    first = ckpts[0]
    keys = set(first["model"])
    for p, c in zip(paths, ckpts, strict=True):
        if (
            set(c["model"]) != keys
            or c.get("model_config") != first.get("model_config")
            or c.get("output_stride") != first.get("output_stride")
        ):
            raise CheckpointError(f"{p}: a different model than {paths[0]}; cannot average")
    avg = {}
    for k, v in first["model"].items():
        if v.is_floating_point():
            avg[k] = sum(c["model"][k].double() for c in ckpts).div(len(ckpts)).to(v.dtype)
        else:
            avg[k] = v
    out_obj = {
        "model": avg,
        "model_config": first.get("model_config"),
        "output_stride": first.get("output_stride"),
        "params": first.get("params"),
        "dataset": first.get("dataset"),
        "averaged_from": [str(p) for p in paths],
        "step": max(int(c.get("step", 0)) for c in ckpts),
    }
    return save_atomic(out_obj, out)


def check_classes(ckpt: dict, spec, path: Path | str) -> None:
    """The checkpoint's class count must be the dataset's (a VOC model is not a Cityscapes one)."""
    n = (ckpt.get("model_config") or {}).get("num_classes")
    if n is not None and n != spec.num_classes:
        raise CheckpointError(
            f"{path}: the model predicts {n} classes, dataset {spec.name} has {spec.num_classes}"
            " (pass the dataset it was trained on)"
        )

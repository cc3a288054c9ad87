"""Checkpoints: atomic writes, safe loads (weights_only=True), and model rebuilding.

Damage is detected, not trusted: a checkpoint is a zip archive (torch.save) whose members
carry a CRC-32, but torch.load never checks them - a flipped byte in a tensor's data loads
as silently different weights. `load` checks every member's CRC first (about 0.1 s per GB
from the page cache), so a truncated, zeroed, bit-flipped or foreign file is a
`DamagedCheckpoint` naming the file.

`last.pt` keeps its predecessor: `save_atomic(..., keep_previous=True)` writes the new file
under a temporary name, links the current last.pt to `last-prev.pt`, then renames the new
one over last.pt, so at every moment both names hold a whole checkpoint (the previous one
costs no space until the next save replaces last.pt). `seg train --auto-resume` falls back
to it when last.pt is damaged (stages/steps.py).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import zipfile
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import torch

from pipeline.atomic import atomic_copy, atomic_path, replace
from pipeline.errors import CheckpointError, DamagedCheckpoint


def save_atomic(obj: dict, path: Path | str, keep_previous: bool = False) -> Path:
    """torch.save to a temporary file in the same folder, then rename over `path`. With
    `keep_previous`, the file that was at `path` stays at `previous_path(path)`. A full disk
    raises DiskFull naming `path`, which keeps its old content."""
    path = Path(path)
    with atomic_path(path) as tmp, _crc32_on():
        # a file object, not a name: torch's own writer turns ENOSPC into a RuntimeError
        # ("unexpected pos"), Python's file raises OSError(ENOSPC), which atomic_path names
        with open(tmp, "wb") as f:
            torch.save(obj, f)
        if keep_previous and path.is_file():
            _link_over(path, previous_path(path))
    return path


def previous_path(path: Path | str) -> Path:
    """Where save_atomic(keep_previous=True) keeps the checkpoint it replaced: last-prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}-prev{path.suffix}")


def set_aside(path: Path | str) -> Path:
    """Rename a damaged file to `NAME.damaged-<UTC time>` beside it (kept for a post-mortem,
    out of the way of the next run); returns the new path."""
    path = Path(path)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    while aside.exists():  # two in one second
        aside = path.with_name(f"{path.name}.damaged-{stamp}-{secrets.token_hex(2)}")
    replace(path, aside)
    return aside


def _link_over(src: Path, dst: Path) -> None:
    """`dst` becomes (atomically) a hard link to `src`; a copy where links are not possible."""
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.link")
    try:
        os.link(src, tmp)
    except OSError:  # no hard links here (some network or FUSE file systems)
        atomic_copy(src, dst)
        return
    try:
        replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def _crc32_on():
    """torch writes the members' CRC-32 by default; `load` relies on it, so make sure."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    if get is None or get():
        yield
        return
    torch.serialization.set_crc32_options(True)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(False)


# model_config keys of checkpoints written before they named the part they configure
_RENAMED = {"separable": "separable_head", "multi_grid": "resnet_multi_grid"}


def verify(path: Path | str) -> None:
    """Check every member of a zip checkpoint against its CRC-32 (torch.load does not).
    Files that are not zip archives are left to torch.load, which rejects them."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as exc:  # BadZipFile, struct/EOF errors on a mangled directory
        raise DamagedCheckpoint(
            f"{path}: damaged checkpoint (zip archive unreadable: {type(exc).__name__}: {exc})"
        ) from None
    if bad is not None:
        raise DamagedCheckpoint(f"{path}: damaged checkpoint ({bad} fails its CRC-32 check)")


def load(path: Path | str, map_location="cpu") -> dict:
    """Load a checkpoint with weights_only=True after checking its integrity; errors name
    the file (DamagedCheckpoint: the file is there but is not a whole checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    verify(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle/zip errors have many types
        raise DamagedCheckpoint(f"{path}: not a readable checkpoint ({_why(path, exc)})") from None
    if not isinstance(obj, dict) or "model" not in obj:
        raise DamagedCheckpoint(f"{path}: not a checkpoint of this project (no 'model' entry)")
    if obj.get("model_config"):
        obj["model_config"] = {_RENAMED.get(k, k): v for k, v in obj["model_config"].items()}
    return obj


def _why(path: Path, exc: Exception) -> str:
    """torch.load's error in a few words (its own messages run to several lines)."""
    size = path.stat().st_size
    if size == 0:
        return "empty file"
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):  # no zip directory at the end
        return f"zip archive cut short ({size:,} bytes)"
    if isinstance(exc, EOFError):
        return f"ends too early ({size:,} bytes)"
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # not a torch.save file, or objects it may not load
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n")[0]
        return f"not a file of weights: {detail.split('. ')[0][:160]}"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first[:160]}" if first else type(exc).__name__


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

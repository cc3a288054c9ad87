"""The training loop: shards -> augment -> DeepLab -> checkpoints. Read it top to bottom.

Iteration-based, as the published recipe (mmseg: SGD 0.01, momentum 0.9, wd 5e-4, poly 0.9,
80k iterations, global batch 8). `params.batch_size` is the global batch: under torchrun each
of N ranks takes batch_size / N, so the LR of the recipe holds for any number of GPUs and a
resumed run may change N.

Resumable: `last.pt` holds model, optimizer, scaler, step, RNG states, the data position and
the params; written atomically every `checkpoint_interval` steps. With a fixed seed on CPU,
a run killed and resumed ends with the same weights as one never interrupted.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.atomic import atomic_copy
from pipeline.data.labels import DatasetSpec
from pipeline.data.shards import TrainStream, skip_for_resume
from pipeline.data.transforms import TrainAugment, normalize, photometric_distortion
from pipeline.engine import checkpoint
from pipeline.engine.distributed import rank_world
from pipeline.engine.evaluate import InferenceOptions, evaluate, resolve_device
from pipeline.engine.losses import SegLoss, cosine_lr, inverse_log_weights, poly_lr
from pipeline.errors import CheckpointError, ConfigError
from pipeline.params import TrainParams

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"


class Callbacks:
    """What the loop reports; the stage layer renders it (rich, DVCLive, Prefect logs)."""

    def on_step(self, info: dict) -> None:  # step, total, loss, lr, images_per_s
        pass

    def on_eval(self, step: int, metrics: dict) -> None:
        pass


def model_config(p: TrainParams, num_classes: int) -> dict:
    m = p.model
    return {
        "arch": m.arch,
        "backbone": m.backbone,
        "num_classes": num_classes,
        "output_stride": m.output_stride,
        "aux_head": m.aux_head,
        "separable": m.separable,
        "multi_grid": tuple(m.multi_grid),
        "pretrained_backbone": m.pretrained_backbone,
    }


def freeze_bn(model: nn.Module) -> None:
    """BatchNorm in eval mode with frozen affine parameters (DeepLabV3's OS8 fine-tuning)."""
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.eval()
            for param in mod.parameters():
                param.requires_grad_(False)


def amp_setting(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a grad scaler) for train.amp = auto | bf16 | fp16 | off:
    auto is bf16 where the GPU has it, fp16 on older GPUs, off on CPU."""
    if mode == "auto":
        if device.type != "cuda":
            return None, False
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode == "off":
        return None, False
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp: fp16 needs a CUDA device; use bf16 or off on CPU")
    return (torch.bfloat16, False) if mode == "bf16" else (torch.float16, True)


def _optimizer(p: TrainParams, params) -> torch.optim.Optimizer:
    match p.optimizer:
        case "sgd":
            return torch.optim.SGD(
                params, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay
            )
        case "adam":
            return torch.optim.Adam(params, lr=p.lr, weight_decay=p.weight_decay)
        case "adamw":
            return torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay)
    raise ConfigError(f"train.optimizer: {p.optimizer!r} is not one of sgd, adam, adamw")


def lr_at(p: TrainParams, step: int) -> float:
    """Linear warm-up over `warmup_iters`, then poly (power 0.9) or cosine to `min_lr`."""
    if step < p.warmup_iters:
        return p.lr * (step + 1) / p.warmup_iters
    if p.schedule == "cosine":
        return cosine_lr(step, p.iterations, p.lr, p.min_lr)
    return poly_lr(step, p.iterations, p.lr, p.poly_power, p.min_lr)


def _collate(samples: list[dict]) -> dict:
    return {
        "image": torch.stack([s["image"] for s in samples]),  # (B, 3, h, w) uint8
        "label": torch.stack([s["label"] for s in samples]),  # (B, h, w) int64
    }


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()  # this device's: the GPU count may change
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def train(
    p: TrainParams,
    train_shards,
    val_shards,
    out_dir: Path | str,
    spec: DatasetSpec,
    class_counts: np.ndarray | None = None,
    resume: bool = False,
    callbacks: Callbacks | None = None,
    stop_after: int | None = None,
) -> dict:
    """Train; returns {"step", "best_miou", "best_checkpoint", "last_checkpoint", "history"}.

    `stop_after` ends the run after that step as if it had been killed right after a
    checkpoint (used to test resuming).
    """
    cb = callbacks or Callbacks()
    out_dir = Path(out_dir)
    rank, world = rank_world()
    device = resolve_device(p.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    if p.batch_size % world:
        raise ConfigError(f"train.batch_size {p.batch_size} is not divisible by {world} processes")
    local_batch = p.batch_size // world
    if local_batch < 2 and not p.freeze_bn:
        raise ConfigError(
            f"train.batch_size {p.batch_size} over {world} process(es) is {local_batch} image per "
            "step: BatchNorm (ASPP image pooling) needs >= 2 per process, or train.freeze_bn: true"
        )
    torch.manual_seed(p.seed + rank)
    random.seed(p.seed + rank)

    # ---- model, loss, optimizer
    from pipeline.models import build_model

    cfg = model_config(p, spec.num_classes)
    model = build_model(**cfg)
    os8_active = False
    ckpt = None
    start_step = 0
    last_path = out_dir / LAST
    if resume:
        if not last_path.is_file():
            raise CheckpointError(f"{last_path}: nothing to resume from")
        ckpt = checkpoint.load(last_path)
        if _normal(ckpt.get("model_config")) != _normal(cfg):
            raise CheckpointError(
                f"{last_path}: model config {ckpt.get('model_config')} differs from params {cfg}"
            )
        start_step = int(ckpt["step"])
    if p.os8_from is not None and start_step >= p.os8_from:
        model.set_output_stride(8)
        os8_active = True
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    if p.freeze_bn or os8_active:
        freeze_bn(model)
    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    channels_last = (
        p.channels_last and device.type == "cuda"
    )  # on CPU it measured slower (0.4 s/step)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    raw_model = model

    def wrap(m: nn.Module):
        """(DDP-wrapped model, the callable the step uses)."""
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            m = DDP(m, device_ids=[device.index] if device.type == "cuda" else None)
        return m, (torch.compile(m) if p.compile else m)

    model, fwd = wrap(raw_model)

    weights = None
    if p.class_weights == "inverse_log":
        if class_counts is None:
            raise ConfigError(
                "train.class_weights: inverse_log needs the manifest's class pixel counts"
            )
        weights = inverse_log_weights(class_counts).to(device)
    loss_fn = SegLoss(
        spec.num_classes, p.loss, weights, p.label_smoothing, p.ohem, p.ohem_thresh,
        p.ohem_min_kept, spec.ignore_index,
    ).to(device)  # fmt: skip
    # all parameters, frozen BN too: the groups must match across an OS8 switch and a resume
    optimizer = _optimizer(p, list(raw_model.parameters()))
    amp_dtype, use_scaler = amp_setting(p.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    best: list[dict] = []  # [{"miou", "step", "path"}], best first
    history: list[dict] = []
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        best = list(ckpt.get("best", []))
        history = list(ckpt.get("history", []))
        log.info("resumed from %s at step %d", last_path, start_step)

    if rank == 0:
        _tidy_snapshots(out_dir, best)

    # ---- data: the stream continues where the checkpoint left it
    augment = TrainAugment(tuple(p.crop_size), tuple(p.scale_range), p.flip, spec.ignore_index)
    batches_done = start_step * p.grad_accum
    stream = TrainStream(
        train_shards, seed=p.seed, rank=rank, world_size=world, shuffle_buffer=p.shuffle_buffer,
        transform=augment, skip=skip_for_resume(batches_done, local_batch, p.workers),
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        stream, batch_size=local_batch, num_workers=p.workers, collate_fn=_collate,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )  # fmt: skip
    batches = iter(loader)  # draws a base seed from the global RNG: restore it after this
    if ckpt is not None:
        _set_rng_state(ckpt["rng"], device)

    def save_last(step: int) -> None:
        if rank != 0:
            return
        checkpoint.save_atomic(
            {
                "model": raw_model.state_dict(),
                "model_config": cfg,
                "output_stride": raw_model.output_stride,  # 8 after an OS16 -> OS8 switch
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step,
                "rng": _rng_state(device),
                "data": {"batches_done": step * p.grad_accum, "workers": p.workers},
                "params": dataclasses.asdict(p),
                "best": best,
                "history": history,
            },
            last_path,
        )

    # ---- the loop
    done = start_step
    t_last, images_since = time.perf_counter(), 0
    for step in range(start_step, p.iterations):
        if p.os8_from is not None and step == p.os8_from and not os8_active:
            raw_model.set_output_stride(8)  # DeepLabV3 paper, Sec. 4.1: fine-tune at OS8, BN frozen
            freeze_bn(raw_model)
            os8_active = True
            model, fwd = wrap(raw_model)  # DDP must see which parameters no longer train
        lr = lr_at(p, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        if p.freeze_bn or os8_active:
            freeze_bn(raw_model)
        g = torch.Generator().manual_seed(p.seed * 1_000_003 + step * 101 + rank)
        loss_sum = 0.0
        for _ in range(p.grad_accum):
            batch = next(batches)
            images = batch["image"].to(device, non_blocking=True).float()
            labels = batch["label"].to(device, non_blocking=True)
            if p.photometric:
                images = photometric_distortion(images, g)
            x = normalize(images)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
            with ctx:
                out = fwd(x)
                loss = loss_fn(out["out"], labels)
                if "aux" in out:
                    loss = loss + p.aux_weight * loss_fn(out["aux"], labels)
            scaler.scale(loss / p.grad_accum).backward()
            loss_sum += float(loss.detach())
            images_since += labels.shape[0] * world
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        now = time.perf_counter()
        info = {
            "step": done, "total": p.iterations, "loss": loss_sum / p.grad_accum, "lr": lr,
            "images_per_s": images_since / max(now - t_last, 1e-9),
        }  # fmt: skip
        t_last, images_since = now, 0
        history.append({k: info[k] for k in ("step", "loss", "lr")})
        if rank == 0:
            cb.on_step(info)

        if val_shards is not None and (done % p.val_interval == 0 or done == p.iterations):
            if world > 1 and device.type != "cuda":  # no SyncBN on gloo: validate rank 0's BN stats
                for buf in raw_model.buffers():
                    torch.distributed.broadcast(buf, 0)
            metrics, _ = evaluate(
                raw_model, val_shards, spec, device, InferenceOptions(), rank=rank, world_size=world
            )
            history[-1]["val_miou"] = metrics["miou"]
            if rank == 0:
                cb.on_eval(done, metrics)
                best = _keep_best(best, metrics["miou"], done, raw_model, cfg, out_dir, p)
        if done % p.checkpoint_interval == 0 or done == p.iterations:
            save_last(done)
        if stop_after is not None and done >= stop_after:
            save_last(done)
            break
    return {
        "step": done,
        "best_miou": best[0]["miou"] if best else None,
        "best_checkpoint": str(out_dir / BEST) if best else None,
        "last_checkpoint": str(last_path),
        "best_k": [b["path"] for b in best],
        "history": history,
    }


def _tidy_snapshots(out_dir: Path, best: list[dict]) -> None:
    """Snapshots on disk = the run's best-k list: a new run drops an old run's, a resumed one
    drops those written after its last.pt (a timeline that was lost with the kill)."""
    keep = {Path(b["path"]).name for b in best}
    for f in out_dir.glob("best-*.pt"):
        if f.name not in keep:
            f.unlink()
    if best:
        atomic_copy(best[0]["path"], out_dir / BEST)
    else:
        (out_dir / BEST).unlink(missing_ok=True)


def _normal(cfg: dict | None) -> dict | None:
    return (
        None if cfg is None else {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    )


def _keep_best(
    best: list[dict], miou: float, step: int, model, cfg: dict, out_dir: Path, p: TrainParams
) -> list[dict]:
    """Keep the k best snapshots by val mIoU (for `seg average`); best.pt is the top one."""
    snap = {
        "model": model.state_dict(),
        "model_config": cfg,
        "output_stride": model.output_stride,
        "params": dataclasses.asdict(p),
        "step": step,
        "val_miou": miou,
    }
    k = p.keep_best
    entry = {"miou": float(miou), "step": step, "path": str(out_dir / f"best-{step:07d}.pt")}
    ranked = sorted([*best, entry], key=lambda e: (-e["miou"], e["step"]))
    keep, drop = ranked[:k], ranked[k:]
    if entry in keep:
        checkpoint.save_atomic(snap, entry["path"])
        if keep[0] is entry:
            checkpoint.save_atomic(snap, out_dir / BEST)
    for e in drop:
        Path(e["path"]).unlink(missing_ok=True)
    return keep

"""The training loop: shards -> augmentation on the device -> DeepLab -> checkpoints.

Iteration-based, as the published recipe (mmseg: SGD 0.01, momentum 0.9, wd 5e-4, poly 0.9,
80k iterations, global batch 8). `tp` is always the train section (TrainParams; the stage layer's
`p` is the whole Params). `tp.batch_size` is the global batch: under torchrun each
of N ranks takes batch_size / N, so the LR of the recipe holds for any number of GPUs and a
resumed run may change N.

The GPU working point: DataLoader workers only decode frames; scale, crop, flip and colour
jitter run batched on the device; the step is compiled on CUDA (`train.compile: auto`), in
bf16 and channels-last, with a fused optimizer; and the loop never waits for the GPU between
log points (the loss is summed on the device and read every `log_every` steps).

Resumable: `last.pt` holds model, optimizer, scaler, step, RNG states, the params and the
best-k list; written atomically every `checkpoint_interval` steps, the one before kept as
`last-prev.pt` (what `--auto-resume` falls back to when last.pt is damaged). With a fixed
seed on CPU, a run killed and resumed ends with the same weights as one never interrupted.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.atomic import atomic_copy
from pipeline.data.labels import DatasetSpec
from pipeline.data.readers import TrainStream, collate_train, skip_for_resume, worker_context
from pipeline.data.transforms import (
    BatchAugment,
    normalize,
    photometric_distortion,
    step_generator,
)
from pipeline.engine import checkpoint
from pipeline.engine.device import (
    autocast,
    channels_last_enabled,
    compile_enabled,
    cudnn_autotune,
    precision,
    working_point,
)
from pipeline.engine.distributed import broadcast_object, is_distributed, local_device, rank_world
from pipeline.engine.evaluate import InferenceOptions, evaluate
from pipeline.engine.losses import SegLoss, cosine_lr, inverse_log_weights, poly_lr
from pipeline.errors import CheckpointError, ConfigError
from pipeline.params import TrainParams

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"


class Callbacks:
    """What the loop reports; the stage layer renders it (rich, DVCLive, Prefect logs)."""

    def on_step(self, info: dict) -> None:
        """Every `log_every` steps and at the last: step, total, loss (mean since the last
        report), lr, images_per_s (all ranks, since the last report)."""

    def on_eval(self, step: int, metrics: dict) -> None:
        pass

    def on_checkpoint(self, path: Path, step: int) -> None:
        """Rank 0 saved last.pt at `step` (a run store copies it: stages/resume.py RunStore)."""

    def should_stop(self) -> bool:
        """Asked on rank 0 after each validation: True ends the run there, its checkpoint
        saved (a sweep's pruner stopped the trial: stages/sweep.py)."""
        return False


def train(
    tp: TrainParams,
    train_shards,
    val_shards,
    out_dir: Path | str,
    spec: DatasetSpec,
    class_counts: np.ndarray | None = None,
    resume: bool | Path | str = False,
    callbacks: Callbacks | None = None,
    stop_after: int | None = None,
    precision_change: bool = False,
) -> dict:
    """Train; returns {"step", "best_miou", "best_checkpoint", "last_checkpoint", "best_k",
    "history"}. `resume` continues `out_dir/last.pt` (True) or the checkpoint at that path
    (the stage layer's fallback: last-prev.pt); it must exist and fit the params. A resume
    onto another precision than the checkpoint's (`amp: auto` on another kind of host) is
    refused unless `precision_change`; the working point's `precision_changes` records it.

    `stop_after` ends the run after that step as if it had been killed right after a
    checkpoint (used to test resuming).
    """
    cb = callbacks or Callbacks()
    out_dir = Path(out_dir)
    rank, world = rank_world()
    device = _device(tp.device)
    sync_bn = is_distributed() and device.type == "cuda" and world > 1  # BN stats across GPUs
    local_batch = _local_batch(tp, world, sync_bn)
    cfg = model_config(tp, spec.num_classes)
    resume_from = (out_dir / LAST if resume is True else Path(resume)) if resume else None
    ckpt = _load_last(resume_from, cfg) if resume_from else None
    start = int(ckpt["step"]) if ckpt else 0

    # every rank its own dropout; the same seed, the same run
    torch.manual_seed(tp.seed + rank)
    random.seed(tp.seed + rank)
    model = _build_model(cfg, tp, ckpt, device, start)
    loss_fn = _loss(tp, spec, class_counts, device)
    optimizer = build_optimizer(tp, list(model.parameters()), device)
    prec = precision(tp.amp, device)
    changes = _precision_changes(ckpt, prec, start, resume_from, tp.amp, precision_change)
    amp_dtype = prec.dtype
    scaler = torch.amp.GradScaler(device.type, enabled=prec.scaler)
    best: list[dict] = []  # [{"miou", "step", "path"}], best first
    history: list[dict] = []  # one row per report: step, loss, lr (+ val_miou)
    if ckpt is not None:
        _restore_optimizer(optimizer, scaler, ckpt, resume_from)
        best, history = list(ckpt.get("best", [])), list(ckpt.get("history", []))
        log.info("resumed from %s at step %d", resume_from, start)
    if rank == 0:
        best = _tidy_snapshots(out_dir, best)
    compiled = compile_enabled(tp.compile, device, sync_bn)
    forward_loss = build_forward_loss(model, loss_fn, tp.aux_weight, device, compiled)
    batches = _train_batches(tp, train_shards, rank, world, local_batch, start, device)
    if ckpt is not None:  # after the DataLoader drew its base seed from the global RNG
        _set_rng_state(ckpt["rng"], device, rank, world, tp.seed, start)
    augment = BatchAugment(tuple(tp.crop_size), tuple(tp.scale_range), tp.flip, spec.ignore_index)
    channels_last = channels_last_enabled(tp.channels_last, device)
    frozen_bn = _bn_frozen(tp, model)
    point = working_point(
        device, prec, compile=compiled, channels_last=channels_last, world_size=world,
        sync_bn=sync_bn, loader_workers=tp.workers, precision_changes=changes,
    )  # fmt: skip
    check_same_working_point(point)  # before the first step: nodes that would train apart

    def save_last(step: int) -> None:
        rng = _gather(_rng_state(device))  # every rank's own RNG (a collective)
        if rank == 0:
            checkpoint.save_atomic(
                {
                    "model": model.state_dict(),
                    "model_config": cfg,
                    "dataset": spec.name,
                    "output_stride": model.output_stride,  # 8 after an OS16 -> OS8 switch
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "step": step,
                    "rng": rng,  # [rank 0's, rank 1's, ...]
                    "params": dataclasses.asdict(tp),
                    "working_point": point,
                    "best": best,
                    "history": history,
                },
                out_dir / LAST,
                keep_previous=True,  # last-prev.pt: what --auto-resume falls back to
            )
            cb.on_checkpoint(out_dir / LAST, step)

    # ---- the loop
    stopped = None  # the step a callback ended the run at (a pruned trial)
    loss_sum = torch.zeros((), device=device)  # summed on the device, read at each report
    reported, t_report = start, time.perf_counter()
    done = start
    for step in range(start, tp.iterations):
        if step == tp.os8_from and model.output_stride != 8:
            model.set_output_stride(8)  # DeepLabV3 paper, Sec. 4.1: fine-tune at OS8, BN frozen
            frozen_bn = True
            freeze_bn(model)  # before DDP is rebuilt: its reducer expects no BN gradients
            forward_loss = build_forward_loss(model, loss_fn, tp.aux_weight, device, compiled)
        lr = lr_at(tp, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        if frozen_bn:  # model.train() put every BatchNorm back into training mode
            freeze_bn(model)
        g = step_generator(tp.seed, step, rank)  # this step's scales, crops, flips, colours
        for micro in range(tp.grad_accum):
            batch = next(batches)
            x, y = prepare_batch(batch, augment, g, tp.photometric, device, channels_last)
            # DDP all-reduces the gradients once per step: at the last micro-batch
            with forward_loss.no_sync() if micro < tp.grad_accum - 1 else nullcontext():
                with autocast(device, amp_dtype):
                    loss = forward_loss(x, y)  # x (B, 3, h, w) normalised, y (B, h, w) train ids
                scaler.scale(loss / tp.grad_accum).backward()
            loss_sum += loss.detach()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1

        if done % tp.log_every == 0 or done == tp.iterations:
            mean_loss = float(loss_sum) / ((done - reported) * tp.grad_accum)  # waits for the GPU
            now = time.perf_counter()
            images = (done - reported) * local_batch * tp.grad_accum * world
            info = {
                "step": done, "total": tp.iterations, "loss": mean_loss, "lr": lr,
                "images_per_s": images / max(now - t_report, 1e-9),
            }  # fmt: skip
            loss_sum.zero_()
            reported, t_report = done, now
            history.append({k: info[k] for k in ("step", "loss", "lr")})
            if rank == 0:
                cb.on_step(info)

        if val_shards is not None and (done % tp.val_interval == 0 or done == tp.iterations):
            t_val = time.perf_counter()
            metrics = _validate(model, val_shards, spec, device, amp_dtype, local_batch, tp.workers)
            if not history or history[-1]["step"] != done:
                history.append({"step": done})
            history[-1]["val_miou"] = metrics["miou"]
            if rank == 0:
                cb.on_eval(done, metrics)
                best = _keep_best(
                    best, metrics["miou"], done, model, cfg, spec.name, out_dir, tp, point
                )
            t_report += time.perf_counter() - t_val  # images/s counts training only
            if broadcast_object(cb.should_stop() if rank == 0 else None):
                save_last(done)
                stopped = done
                break
        saved = done % tp.checkpoint_interval == 0 or done == tp.iterations
        if saved:
            save_last(done)
        if stop_after is not None and done >= stop_after:
            if not saved:  # once: a second save would make last-prev.pt a copy of last.pt
                save_last(done)
            break
    return {
        "step": done,
        "best_miou": best[0]["miou"] if best else None,
        "best_checkpoint": str(out_dir / BEST) if best else None,
        "last_checkpoint": str(out_dir / LAST),
        "best_k": [str(_snapshot(out_dir, b)) for b in best],
        "working_point": point,
        "stopped_at": stopped,
        "history": history,
    }


# ----------------------------------------------------------------------------- the step


def prepare_batch(
    batch: dict,
    augment: BatchAugment,
    g: torch.Generator,
    photometric: bool,
    device: torch.device,
    channels_last: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoded batch -> (normalised crops (B, 3, h, w), train ids (B, h, w) int64) on the
    device. The uint8 frames cross to the device first (4x fewer bytes than floats); the
    crops are then cut, flipped and distorted there."""
    images = batch["image"].to(device, non_blocking=True)  # (B, 3, H, W) uint8, pinned
    labels = batch["label"].to(device, non_blocking=True)  # (B, H, W) uint8
    x, y = augment(images, labels, batch["size"], g)  # (B, 3, h, w) float 0..255, (B, h, w)
    if photometric:
        x = photometric_distortion(x, g)
    x = normalize(x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


class ForwardLoss:
    """(x, y) -> loss through the model (DDP-wrapped when distributed), optionally compiled
    with the loss: one graph from the input to the scalar, the full-resolution logits and
    their cross-entropy fused. `no_sync()` holds back DDP's gradient all-reduce (the
    micro-batches of a step but its last)."""

    def __init__(self, net: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.net, self.fn = net, fn

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fn(x, y)

    def no_sync(self):
        return self.net.no_sync() if hasattr(self.net, "no_sync") else nullcontext()


def build_forward_loss(
    model: nn.Module,
    loss_fn: nn.Module,
    aux_weight: float,
    device: torch.device,
    compiled: bool,
    mode: str | None = None,
) -> ForwardLoss:
    """The step's forward and loss (see ForwardLoss). Rebuilt when the model changes shape
    (the OS8 switch), after BatchNorm is frozen: DDP registers the parameters that need
    gradients when it is built. `mode` is torch.compile's (benchmarks/train_throughput.py
    --compile-mode measures CUDA graphs, "reduce-overhead", against the default before the
    loop adopts it)."""
    net = model
    if is_distributed():
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def forward_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = net(x)  # {"out": (B, K, h, w) logits[, "aux": (B, K, h, w)]}
        loss = loss_fn(out["out"], y)
        if "aux" in out:
            loss = loss + aux_weight * loss_fn(out["aux"], y)
        return loss

    return ForwardLoss(net, torch.compile(forward_loss, mode=mode) if compiled else forward_loss)


# ----------------------------------------------------------------------------- set-up


def model_config(tp: TrainParams, num_classes: int) -> dict:
    m = tp.model
    return {
        "arch": m.arch,
        "backbone": m.backbone,
        "num_classes": num_classes,
        "output_stride": m.output_stride,
        "aux_head": m.aux_head,
        "separable_head": m.separable_head,
        "resnet_multi_grid": tuple(m.resnet_multi_grid),
        "pretrained_backbone": m.pretrained_backbone,
    }


def _bn_frozen(tp: TrainParams, model) -> bool:
    """BatchNorm trains no more: asked for, or after the OS16 -> OS8 switch (DeepLabV3, 4.1)."""
    return tp.freeze_bn or (model.output_stride == 8 and tp.os8_from is not None)


def freeze_bn(model: nn.Module) -> None:
    """BatchNorm in eval mode with frozen affine parameters (DeepLabV3's OS8 fine-tuning)."""
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.eval()
            for param in mod.parameters():
                param.requires_grad_(False)


def lr_at(tp: TrainParams, step: int) -> float:
    """Linear warm-up over `warmup_iters`, then poly (power 0.9) or cosine to `min_lr`."""
    if step < tp.warmup_iters:
        return tp.lr * (step + 1) / tp.warmup_iters
    if tp.schedule == "cosine":
        return cosine_lr(step, tp.iterations, tp.lr, tp.min_lr)
    return poly_lr(step, tp.iterations, tp.lr, tp.poly_power, tp.min_lr)


def _device(name: str) -> torch.device:
    device = local_device(name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one crop size: pick the fastest kernels once
    return device


def _local_batch(tp: TrainParams, world: int, sync_bn: bool = False) -> int:
    """Images per process per micro-batch. BatchNorm's statistics (the ASPP image pooling
    has one value per image) need >= 2 images: per process, or over all processes with
    SyncBatchNorm (one image per GPU, as 8 GPUs at the recipe's batch 8)."""
    if tp.batch_size % world:
        raise ConfigError(f"train.batch_size {tp.batch_size} is not divisible by {world} processes")
    local = tp.batch_size // world
    bn_batch = tp.batch_size if sync_bn else local
    if bn_batch < 2 and not tp.freeze_bn:
        raise ConfigError(
            f"train.batch_size {tp.batch_size} over {world} process(es) is {local} image per "
            "step: BatchNorm (ASPP image pooling) needs >= 2 per process (or over all GPUs "
            "with SyncBatchNorm), or train.freeze_bn: true"
        )
    return local


def _load_last(path: Path, cfg: dict) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: nothing to resume from")
    ckpt = checkpoint.load(path)
    if _normal(ckpt.get("model_config")) != _normal(cfg):
        raise CheckpointError(
            f"{path}: model config {ckpt.get('model_config')} differs from params {cfg}"
        )
    return ckpt


def _build_model(
    cfg: dict, tp: TrainParams, ckpt: dict | None, device: torch.device, start: int
) -> nn.Module:
    """The network at the state of step `start`: output stride, weights, frozen BatchNorm,
    SyncBatchNorm across GPUs, on the device (channels-last on CUDA)."""
    from pipeline.models import build_model

    model = build_model(**cfg)
    if tp.os8_from is not None and start >= tp.os8_from:
        model.set_output_stride(8)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    if _bn_frozen(tp, model):
        freeze_bn(model)
    if is_distributed() and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if tp.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def _loss(
    tp: TrainParams, spec: DatasetSpec, class_counts: np.ndarray | None, device: torch.device
) -> SegLoss:
    weights = None
    if tp.class_weights == "inverse_log":
        if class_counts is None:
            raise ConfigError(
                "train.class_weights: inverse_log needs the manifest's class pixel counts"
            )
        weights = inverse_log_weights(class_counts).to(device)
    return SegLoss(
        spec.num_classes, tp.loss, weights, tp.label_smoothing, tp.ohem, tp.ohem_thresh,
        tp.ohem_min_kept, spec.ignore_index,
    ).to(device)  # fmt: skip


def build_optimizer(tp: TrainParams, params: list, device: torch.device) -> torch.optim.Optimizer:
    """All parameters, frozen BatchNorm too: the groups must match across an OS8 switch and a
    resume. One fused kernel per step on CUDA instead of one launch per parameter tensor."""
    fused = {"fused": True} if device.type == "cuda" else {}
    match tp.optimizer:
        case "sgd":
            return torch.optim.SGD(
                params, lr=tp.lr, momentum=tp.momentum, weight_decay=tp.weight_decay, **fused
            )
        case "adam":
            return torch.optim.Adam(params, lr=tp.lr, weight_decay=tp.weight_decay, **fused)
        case "adamw":
            return torch.optim.AdamW(params, lr=tp.lr, weight_decay=tp.weight_decay, **fused)
    raise ConfigError(f"train.optimizer: {tp.optimizer!r} is not one of sgd, adam, adamw")


def _train_batches(
    tp: TrainParams,
    shards,
    rank: int,
    world: int,
    local_batch: int,
    start: int,
    device: torch.device,
) -> Iterator[dict]:
    """Decoded batches (see collate_train), continuing where step `start` left the stream."""
    stream = TrainStream(
        shards, seed=tp.seed, rank=rank, world_size=world, shuffle_buffer=tp.shuffle_buffer,
        skip=skip_for_resume(start * tp.grad_accum, local_batch, tp.workers),
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        stream, batch_size=local_batch, num_workers=tp.workers, collate_fn=collate_train,
        pin_memory=device.type == "cuda", prefetch_factor=4 if tp.workers else None,
        multiprocessing_context=worker_context(tp.workers),
    )  # fmt: skip
    return iter(loader)


def _validate(
    model: nn.Module,
    val_shards,
    spec: DatasetSpec,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    batch_size: int,
    workers: int,
) -> dict:
    """Val metrics through `evaluate` (the same path as `seg eval`), every rank a slice."""
    rank, world = rank_world()
    if world > 1 and device.type != "cuda":  # no SyncBN on gloo: validate rank 0's BN stats
        for buf in model.buffers():
            torch.distributed.broadcast(buf, 0)
    with cudnn_autotune(False):  # val frames come in many sizes (VOC): no autotuning each
        metrics, _ = evaluate(
            model, val_shards, spec, device, InferenceOptions(amp=amp_dtype),
            batch_size=batch_size, workers=workers, rank=rank, world_size=world,
        )  # fmt: skip
    return metrics


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()  # this device's: the GPU count may change
    return state


def _gather(obj) -> list:
    """[rank 0's obj, rank 1's, ...] on every rank; [obj] in one process."""
    if not is_distributed():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _set_rng_state(
    states: list[dict] | dict, device: torch.device, rank: int, world: int, seed: int, step: int
) -> None:
    """Each rank continues its own RNG stream (dropout, the loader's seed). A checkpoint of
    another world size holds other streams: then every rank starts a new one from (seed,
    rank, step), the same on every rerun."""
    if isinstance(states, dict):  # written before every rank's state was kept
        states = [states]
    if len(states) != world:
        log.info("last.pt holds %d rank RNG state(s), this run has %d rank(s): RNG reseeded "
                 "from (seed, rank, step)", len(states), world)  # fmt: skip
        reseed = int(np.random.SeedSequence((seed, rank, step)).generate_state(1)[0])
        torch.manual_seed(reseed)
        random.seed(reseed)
        return
    state = states[rank]
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _restore_optimizer(optimizer, scaler, ckpt: dict, path: Path) -> None:
    """The optimizer and grad-scaler state of a checkpoint, fitted to this run: momentum
    buffers take their parameter's memory layout (a CPU checkpoint is NCHW, channels-last
    parameters on CUDA are not, and the fused optimizer wants both alike); a checkpoint from
    a run without a scaler (bf16, fp32) starts an fp16 run's scaler afresh."""
    optimizer.load_state_dict(ckpt["optimizer"])
    for param, state in optimizer.state.items():
        for name, value in state.items():
            if (
                torch.is_tensor(value)
                and value.shape == param.shape
                and value.stride() != param.stride()
            ):
                state[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    elif scaler.is_enabled():
        log.info("%s: trained without a grad scaler; the fp16 scaler starts afresh", path)


def _normal(cfg: dict | None) -> dict | None:
    return (
        None if cfg is None else {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    )


# ----------------------------------------------------------------------------- best-k snapshots


def _snapshot(out_dir: Path, entry: dict) -> Path:
    """A best-k entry's file: its name in `out_dir`, wherever the run was when it wrote it
    (entries hold the name only; older checkpoints hold a path)."""
    return out_dir / Path(entry["path"]).name


def _precision_changes(
    ckpt: dict | None, prec, start: int, path: Path | None, amp: str, allowed: bool
) -> list[dict]:
    """The run's precision changes so far, plus this resume's when it changes the precision
    (refused in one line unless `allowed`): a run that trained in bf16 and goes on in fp32
    (or fp16 with a GradScaler) is no longer the run its params describe."""
    if ckpt is None:
        return []
    before = ckpt.get("working_point") or {}
    changes = list(before.get("precision_changes") or [])
    old = before.get("precision")
    if old is None or old == prec.name:
        return changes
    if not allowed:
        raise ConfigError(
            f"{path}: trained in {old} up to step {start}; here amp: {amp} resolves to "
            f"{prec.name} ({prec.why}): resuming would change the precision mid-run. Continue "
            "it anyway with `seg train --allow-precision-change` (SEG_ALLOW_PRECISION_CHANGE=1 "
            "for dvc repro; the checkpoint records it) or start a new run (`seg train`)"
        )
    log.warning("resumed at step %d in %s, trained in %s up to there (%s): recorded in the "
                "working point's precision_changes", start, prec.name, old, prec.why)  # fmt: skip
    return [*changes, {"step": start, "from": old, "to": prec.name, "why": prec.why}]


# what every process of one run must have resolved alike: the numbers they compute together
SHARED_POINT = ("precision", "compile", "channels_last", "torch", "cuda", "cudnn")


def check_same_working_point(point: dict) -> None:
    """Every process of the group resolved the same working point (precision, compile,
    channels-last, torch / CUDA / cuDNN), else a one-line error before the first step: a
    bf16 node beside an fp16 + GradScaler node would all-reduce gradients of two different
    runs. Params are compared before (stages/launch.py check_same_params)."""
    from pipeline.engine.distributed import gather_objects

    mine = {k: point.get(k) for k in SHARED_POINT}
    everyone = gather_objects(mine)
    for rank, theirs in enumerate(everyone):
        differ = [k for k in SHARED_POINT if theirs[k] != everyone[0][k]]
        if differ:
            what = ", ".join(
                f"{k} {everyone[0][k]} on rank 0, {theirs[k]} on rank {rank}" for k in differ
            )
            raise ConfigError(
                f"the processes resolved different working points ({what}): give every node "
                "the same train.amp / train.compile / train.channels_last (not auto) or the "
                "same kind of device and software"
            )


def _tidy_snapshots(out_dir: Path, best: list[dict]) -> list[dict]:
    """Snapshots on disk = the run's best-k list: a new run drops an old run's, a resumed one
    drops those written after its last.pt (a timeline that was lost with the kill). Entries
    whose file is not in `out_dir` (a checkpoint fetched from another machine's run) leave
    the list: the snapshots are this folder's files. Returns the list that stays."""
    best = [b for b in best if _snapshot(out_dir, b).is_file()]
    keep = {_snapshot(out_dir, b).name for b in best}
    for f in out_dir.glob("best-*.pt"):
        if f.name not in keep:
            f.unlink()
    if best:
        atomic_copy(_snapshot(out_dir, best[0]), out_dir / BEST)
    else:
        (out_dir / BEST).unlink(missing_ok=True)
    return best


def _keep_best(
    best: list[dict],
    miou: float,
    step: int,
    model,
    cfg: dict,
    dataset: str,
    out_dir: Path,
    tp: TrainParams,
    point: dict,
) -> list[dict]:
    """Keep the k best snapshots by val mIoU (for `seg average`); best.pt is the top one."""
    snap = {
        "model": model.state_dict(),
        "model_config": cfg,
        "dataset": dataset,
        "output_stride": model.output_stride,
        "params": dataclasses.asdict(tp),
        "working_point": point,
        "step": step,
        "val_miou": miou,
    }
    k = tp.keep_best
    entry = {"miou": float(miou), "step": step, "path": f"best-{step:07d}.pt"}  # in out_dir
    ranked = sorted([*best, entry], key=lambda e: (-e["miou"], e["step"]))
    keep, drop = ranked[:k], ranked[k:]
    if entry in keep:
        checkpoint.save_atomic(snap, _snapshot(out_dir, entry))
        if keep[0] is entry:
            checkpoint.save_atomic(snap, out_dir / BEST)
    for e in drop:
        _snapshot(out_dir, e).unlink(missing_ok=True)
    return keep

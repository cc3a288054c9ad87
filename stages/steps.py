"""The pipeline's stages as plain functions: read params, call the library, write outputs.

The `seg` commands, the DVC stages (which run `seg ...`) and the Prefect flows all call
these, so there is one code path. Paths come from params.yaml (`data` section) and are
declared once there; dvc.yaml templates them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from pipeline.atomic import atomic_files, atomic_write
from pipeline.errors import ConfigError, DataError
from pipeline.params import Params, load_params, params_from_dict, yaml_load
from stages.resume import (  # noqa: F401  (steps.X)
    Resume,
    ResumePlan,
    RunStore,
    agree_on_resume,
    is_train_note,
    plan_resume,
)

log = logging.getLogger("seg")


# ----------------------------------------------------------------------------- params


def load(params_file: Path | str = "params.yaml", overrides: list[str] | None = None) -> Params:
    """params.yaml plus `section.key=value` overrides (values parsed as YAML 1.2, as DVC's
    `-S`), validated."""
    import yaml

    params = load_params(params_file)
    if not overrides:
        return params
    raw = params.to_dict()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"--set {key}: {part!r} is not a params section")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"--set {key}: unknown key; valid: {', '.join(sorted(node))}")
        try:
            node[parts[-1]] = yaml_load(value)
        except yaml.YAMLError as exc:
            what = str(getattr(exc, "problem", None) or exc).splitlines()[0]
            raise ConfigError(f"--set {item!r}: the value is not YAML ({what})") from None
    return params_from_dict(raw)


def shard_dir(p: Params, split: str) -> Path | str:
    """{data.shards}/{split}: a folder (holding the shards, or with data.store a pointer to
    them), or a URL in an object store given directly (s3://bucket/prefix/train)."""
    from pipeline import store

    return store.join(p.data.shards, split)


def train_dir(p: Params) -> Path:
    return Path(p.data.outputs) / "train"


def eval_dir(p: Params) -> Path:
    return Path(p.data.outputs) / "eval"


def runs_file(p: Params) -> Path:
    return Path(p.data.outputs) / "runs.parquet"


def kfold_dir(p: Params) -> Path:
    return Path(p.data.outputs) / "kfold"


def folds_file(p: Params) -> Path:
    return kfold_dir(p) / "folds.json"


def fold_dir(p: Params, fold: int) -> Path:
    return kfold_dir(p) / f"fold-{fold}"


def kfold_summary_file(p: Params) -> Path:
    # outside kfold/: the summary stage depends on that whole folder
    return Path(p.data.outputs) / "kfold_summary.json"


# ----------------------------------------------------------------------------- stages


def synth(
    out: Path | str,
    splits: dict[str, int],
    height: int,
    width: int,
    seed: int = 0,
    workers: int = 0,
    overwrite: bool = False,
    progress=None,
) -> dict:
    """`seg synth` (and so the synth stage): seeded Cityscapes-layout scenes. workers 0: all
    cores."""
    from pipeline.data.synth import generate_cityscapes

    return generate_cityscapes(
        Path(out), splits, height=height, width=width, seed=seed, workers=_workers(workers),
        progress=progress, overwrite=overwrite,
    )  # fmt: skip


def preprocess(
    root: Path | str,
    split: str,
    out: Path | str,
    dataset: str = "cityscapes",
    samples_per_shard: int = 100,
    image_format: str = "png",
    workers: int = 0,
    skip_bad: bool = False,
    overwrite: bool = False,
    progress=None,
    store: str | None = None,
):
    """`seg preprocess` (and so the preprocess stages): one split into shards + manifest.
    With `store` (data.store), the shards go to a prefix there named after their content and
    `out` gets the pointer to it. Returns the ShardSummary. workers 0: all cores."""
    from pipeline.data.shards import write_shards

    if not Path(root).is_dir():
        raise DataError(f"{root}: dataset root not found (set data.root in params.yaml)")
    return write_shards(
        root, split, out, dataset=dataset, samples_per_shard=samples_per_shard,
        image_format=image_format, workers=_workers(workers), skip_bad=skip_bad,
        overwrite=overwrite, progress=progress, store_url=store or None,
    )  # fmt: skip


def train(
    p: Params,
    resume: Resume = Resume.NEW,
    sink=None,
    stop_after: int | None = None,
    fold: int | None = None,
    say: Callable[[str], object] | None = None,
    precision_change: bool = False,
) -> dict:
    """Train on the train shards, validating on the val shards; rank 0 writes checkpoints,
    the training log and summary.json. `fold` k: train on the training split outside fold k,
    validate on fold k, into {outputs}/kfold/fold-k/train. `say` gets the lines that tell how
    the run starts (resumed from which checkpoint at which step, or a new run and why; a
    damaged checkpoint set aside): `seg train` prints them on stdout."""
    from pipeline.data.labels import get_spec
    from pipeline.data.shards import class_pixel_counts, pin
    from pipeline.engine.distributed import rank_world
    from pipeline.engine.train import Callbacks, train

    out = train_dir(p)
    # pinned: each manifest read once; everything the run reads is checked against these
    train_src = pin(shard_dir(p, p.data.train_split))
    val_src = pin(shard_dir(p, p.data.val_split))
    _check_dataset(train_src, p.data.dataset)
    resume = Resume(resume)
    if fold is None:
        counts = class_pixel_counts(train_src)
    else:
        strict = resume is Resume.CONTINUE
        out, train_src, val_src, counts, same_folds = _fold_training(p, fold, strict)
        resume = resume if same_folds else Resume.NEW
    main = rank_world()[0] == 0  # under torchrun only rank 0 logs and writes
    run_store = RunStore.from_env() if fold is None else None
    plan = None
    if main:  # rank 0 decides where the run starts; the other processes follow it
        fetched = run_store.adopt(out / "last.pt", p) if run_store and resume is Resume.AUTO else []
        plan = plan_resume(out / "last.pt", p, resume)
        plan.notes[:0] = fetched
    plan = agree_on_resume(plan)
    for note in plan.notes:
        log.info("%s", note)
        if main and say is not None:
            say(note)
    from stages.sweep import TrialLink

    trial = TrialLink.from_env() if fold is None else None
    from stages.train_log import TrainLog

    logger = TrainLog(out, plan.checkpoint is not None, sink, run_store, trial) if main else None
    try:
        result = train(
            p.train, train_src, val_src, out, get_spec(p.data.dataset), class_counts=counts,
            resume=plan.checkpoint or False, callbacks=logger or Callbacks(),
            stop_after=stop_after, precision_change=precision_change,
        )  # fmt: skip
    except BaseException:
        if logger is not None:  # the training's error (a full disk) is the one to report
            with contextlib.suppress(Exception):
                logger.close()
        raise
    pruned = result.get("stopped_at") if trial is not None else None
    if logger is not None:
        if pruned is not None:
            logger.mark_pruned(pruned)
        logger.close()
    summary = {k: v for k, v in result.items() if k != "history"}
    if main:
        _write_json(out / "summary.json", summary)
    if pruned is not None:
        from stages.sweep import Pruned

        val = next((h["val_miou"] for h in reversed(result["history"]) if "val_miou" in h), None)
        raise Pruned(
            f"pruned at step {pruned} of {p.train.iterations} (val mIoU "
            f"{100 * val:.2f}): trial {trial.number} of sweep {trial.study}; not a finished model"
        )
    return summary


def evaluate(
    p: Params,
    checkpoint: Path | str | None = None,
    shards: Path | str | None = None,
    out: Path | str | None = None,
    progress=None,
    fold: int | None = None,
    registry: dict | None = None,
    history: bool = True,
) -> dict:
    """Score a checkpoint on the val shards; write metrics.json (+ per-class plot data, the
    confusion matrix as JSON and PNG, each frame's counts in confusion_per_image.parquet for
    `seg compare`) stamped with provenance; append to the run history (unless `history` is
    False). `registry`: the registry version the checkpoint is (name, version, stage, commit),
    named in the provenance of both files.

    Under torchrun (`seg eval --gpus N`) every rank scores a slice, the confusion matrices are
    summed, and rank 0 writes the same files as a single process. `fold` k: score fold k's
    final weights (kfold/fold-k/train/last.pt: picking a best.pt by its score on fold k would
    bias the estimate) on fold k, into kfold/fold-k/eval; not added to the run history."""
    from pipeline import compare, provenance
    from pipeline.data.labels import get_spec
    from pipeline.engine.checkpoint import build_from_checkpoint, check_classes, sha256_file
    from pipeline.engine.device import precision, working_point
    from pipeline.engine.distributed import local_device, rank_world
    from pipeline.engine.evaluate import InferenceOptions, evaluate, prepare_for_inference
    from pipeline.params import params_hash

    e = p.evaluate
    frames, fold_info = None, None
    if fold is not None:
        checkpoint, shards, frames, out, fold_info = _fold_evaluation(p, fold, checkpoint, out)
    from pipeline.data.readers import Subset
    from pipeline.data.shards import pin

    checkpoint = Path(checkpoint or train_dir(p) / "best.pt")
    shards = pin(shards or shard_dir(p, p.data.val_split))  # scored and stamped: one manifest
    frames = Subset(shards, frames.keys) if isinstance(frames, Subset) else shards
    out = Path(out or eval_dir(p))
    rank, world = rank_world()
    device = local_device(e.device)
    model, ckpt = build_from_checkpoint(checkpoint, "cpu", output_stride=e.output_stride)
    output_stride = model.output_stride  # evaluate.output_stride, or the checkpoint's
    model = prepare_for_inference(model, device)
    spec = get_spec(p.data.dataset)
    check_classes(ckpt, spec, checkpoint)
    _check_dataset(shards, spec.name)
    prec = precision(e.amp, device, warn=rank == 0)
    opts = InferenceOptions(
        e.mode, tuple(e.crop_size), tuple(e.stride), tuple(e.scales), e.flip, prec.dtype
    )
    metrics, acc = evaluate(
        model, frames, spec, device, opts, batch_size=e.batch_size, workers=e.workers,
        rank=rank, world_size=world, progress=progress, per_image=True,
    )  # fmt: skip
    if rank != 0:  # rank 0 writes the results; the others only scored their share
        return metrics
    metrics["provenance"] = {
        "git": provenance.git_state(),
        "params_hash": params_hash(p),
        "train_params_hash": params_hash(ckpt["params"]) if ckpt.get("params") else None,
        "eval_params": dataclasses.asdict(e),
        "data": provenance.data_hash(shards),
        "model_config": ckpt.get("model_config"),
        "checkpoint": {
            "path": str(checkpoint),
            "sha256": sha256_file(checkpoint),
            "step": ckpt.get("step"),
        },
        "time": provenance.now(),
        "hardware": provenance.hardware(),
        "world_size": world,
        # what evaluation and training resolved to (precision and why, device, CPU, versions)
        "working_point": working_point(device, prec, loader_workers=e.workers),
        "train_working_point": ckpt.get("working_point"),
        # the flow run (commit, overrides, experiment, host) when a flow ran this stage
        "run": provenance.run_info(),
    }
    if fold_info is not None:
        metrics["provenance"]["fold"] = fold_info
    if registry is not None:
        metrics["provenance"]["registry"] = registry
    prov = metrics["provenance"]
    per_image = compare.FrameCounts(
        acc.images.keys,
        acc.images.counts.numpy(),
        list(spec.class_names),
        {
            "dataset": spec.name,
            "data_sha256": prov["data"]["sha256"],
            "eval": compare.eval_settings(prov["eval_params"], output_stride),
            "checkpoint_sha256": prov["checkpoint"]["sha256"],
            "miou": metrics["miou"],
            "registry": registry,
        },
    )
    from pipeline.metrics import confusion_png

    # all or nothing: a full disk at the last file leaves every previous result as it was
    with atomic_files() as new:
        _json_to(new(out / "metrics.json"), metrics)
        _json_to(
            new(out / "per_class_iou.json"),
            [{"class": k, "iou": v} for k, v in metrics["per_class_iou"].items()],
        )
        _json_to(
            new(out / "confusion.json"),
            {"classes": list(spec.class_names), "matrix": acc.confusion.tolist()},
        )
        confusion_png(
            acc.confusion.cpu().numpy(), spec.class_names, new(out / "confusion.png", ".png")
        )
        compare.write_frame_counts(new(out / compare.FILE, ".parquet"), per_image)
        if fold is None and history:
            from stages.history import append_run

            append_run(runs_file(p), metrics, new(runs_file(p)))
    return metrics


def score_predictions(
    pred_dir: Path, gt_root: Path, split: str, dataset: str, out: Path | None, progress=None
) -> dict:
    from pipeline.engine.scoring import score_prediction_folder

    metrics = score_prediction_folder(
        pred_dir, gt_root, split=split, dataset=dataset, progress=progress
    )
    if out is not None:
        _write_json(Path(out) / "metrics.json", metrics)
    return metrics


# ----------------------------------------------------------------------------- k-fold


def kfold_split(p: Params) -> dict:
    """Assign the training split's groups to data.folds folds; write kfold/folds.json (with
    data.folds: 0, a file with no folds, so the DVC graph stays whole)."""
    from pipeline.data.folds import make_folds

    shards = shard_dir(p, p.data.train_split)
    _check_dataset(shards, p.data.dataset)
    doc = make_folds(shards, p.data.folds)
    _write_json(folds_file(p), doc)
    return doc


def kfold_summarize(p: Params) -> dict:
    """Mean and std over the folds' kfold/fold-k/eval/metrics.json -> kfold_summary.json."""
    from pipeline.data.folds import summarize

    per_fold = []
    for k in range(p.data.folds):
        path = fold_dir(p, k) / "eval" / "metrics.json"
        if not path.is_file():
            raise DataError(f"{path}: fold {k} has no metrics yet (run `seg kfold eval {k}`)")
        per_fold.append(json.loads(path.read_text()))
    summary = summarize(per_fold)
    summary["dataset"], summary["split"] = p.data.dataset, p.data.train_split
    _write_json(kfold_summary_file(p), summary)
    return summary


def _fold_parts(p: Params, fold: int):
    """(train Subset, val Subset, folds document) of a fold, checked against params and shards."""
    from pipeline.data.folds import fold_keys, load_folds
    from pipeline.data.readers import Subset
    from pipeline.data.shards import pin

    shards = pin(shard_dir(p, p.data.train_split))
    doc = load_folds(folds_file(p), shards)
    if doc["k"] != p.data.folds:
        raise DataError(
            f"{folds_file(p)}: has {doc['k']} folds but data.folds is {p.data.folds}; "
            "run `seg kfold split` again"
        )
    train_keys, val_keys = fold_keys(doc, fold)
    return Subset(shards, train_keys), Subset(shards, val_keys), doc


def _fold_training(p: Params, fold: int, strict: bool):
    """(out dir, train source, val source, class pixel counts, same folds as last.pt) of fold
    k's training. A stamp of the fold's keys next to last.pt stops a resume onto other folds
    (data.folds changed while a run was unfinished)."""
    import hashlib

    from pipeline.data.shards import class_pixel_counts
    from pipeline.errors import CheckpointError

    train_src, val_src, _ = _fold_parts(p, fold)
    out = fold_dir(p, fold) / "train"
    keys = "\n".join(sorted(val_src.keys)).encode()
    stamp = {"fold": fold, "val_keys_sha256": hashlib.sha256(keys).hexdigest()}
    stamp_file = out / "fold.json"
    same = not stamp_file.is_file() or json.loads(stamp_file.read_text()) == stamp
    if not same and strict:
        raise CheckpointError(f"{out / 'last.pt'}: cannot resume: it trained on other folds")
    if not same:
        log.warning("%s: trained on other folds; starting a new run", out / "last.pt")
    _write_json(stamp_file, stamp)
    counts = class_pixel_counts(train_src.source, train_src.keys)
    return out, train_src, val_src, counts, same


def _fold_evaluation(p: Params, fold: int, checkpoint, out):
    """(checkpoint, shard folder, fold k's Subset, out dir, provenance) of fold k's evaluation."""
    import hashlib

    _, val_src, doc = _fold_parts(p, fold)
    f = doc["folds"][fold]
    info = {
        "fold": fold,
        "k": doc["k"],
        "groups": f["groups"],
        "samples": f["samples"],
        "folds_sha256": hashlib.sha256(folds_file(p).read_bytes()).hexdigest(),
    }
    checkpoint = checkpoint or fold_dir(p, fold) / "train" / "last.pt"
    out = out or fold_dir(p, fold) / "eval"
    return checkpoint, val_src.source, val_src, out, info


# ----------------------------------------------------------------------------- helpers


def _check_dataset(shards: Path | str, dataset: str) -> None:
    from pipeline.data.shards import manifest_info

    made_from = manifest_info(shards).get("dataset")
    if made_from != dataset:
        raise DataError(
            f"{shards}: shards of dataset {made_from!r}, but data.dataset is {dataset!r}"
        )


def _workers(n: int) -> int:
    return n or os.cpu_count() or 1


def _json_text(data) -> str:
    return json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"


def _write_json(path: Path, data) -> None:
    """Write JSON to a temporary file, then rename: never a half-written metrics file."""
    atomic_write(path, _json_text(data))


def _json_to(path: Path, data) -> None:
    path.write_text(_json_text(data), encoding="utf-8")

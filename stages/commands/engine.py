"""`seg train | eval | predict | average | runs`: the commands users run every day."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from pipeline.errors import SegError
from stages.commands.options import ParamsOpt, PrecisionChangeOpt, SetOpt
from stages.errors import cli_errors

# `seg train`'s exit code for a trial its sweep's pruner stopped: DVC records no result, the
# flow marks the trial pruned (stages/dvc_stages.py), not failed
PRUNED_EXIT = 3

NnodesOpt = Annotated[int, typer.Option(help="Nodes in a multi-node run.")]
NodeRankOpt = Annotated[int, typer.Option(help="This node's index (0 is the master).")]
MasterAddrOpt = Annotated[str | None, typer.Option(help="Address of node 0 (multi-node runs).")]
MasterPortOpt = Annotated[
    int | None, typer.Option(help="Port on node 0 (default: a free port on one node).")
]


def register(app: typer.Typer) -> None:
    app.command()(train)
    app.command("eval")(evaluate)
    app.command()(predict)
    app.command()(average)
    app.command()(runs)


class _RichProgress:
    """Training callbacks -> one rich progress bar (step, loss, lr, images/s, ETA)."""

    def __init__(self, update) -> None:
        self.update = update

    def on_step(self, info: dict) -> None:
        self.update(
            info["step"], info["total"], loss=f"{info['loss']:.4f}", lr=f"{info['lr']:.2e}",
            img_s=f"{info['images_per_s']:.1f}",
        )  # fmt: skip

    def on_eval(self, step: int, metrics: dict) -> None:
        from stages.progress import console

        console.print(f"step {step}: val mIoU {100 * metrics['miou']:.2f}")


@cli_errors
def train(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    resume: Annotated[
        bool,
        typer.Option(help="Continue outputs/train/last.pt; fails, saying why, if it can't."),
    ] = False,
    auto_resume: Annotated[
        bool,
        typer.Option(
            help="Continue last.pt if it is an unfinished run of the same params, else start "
            "afresh (what dvc repro uses)."
        ),
    ] = False,
    gpus: Annotated[
        int,
        typer.Option(
            help="Processes per node, one per GPU, via torchrun (0: this process, no process "
            "group; 1: a one-process group). Without CUDA, -S train.device=cpu runs N gloo "
            "processes on CPU."
        ),
    ] = 0,
    nnodes: NnodesOpt = 1,
    node_rank: NodeRankOpt = 0,
    master_addr: MasterAddrOpt = None,
    master_port: MasterPortOpt = None,
    allow_precision_change: PrecisionChangeOpt = False,
) -> None:
    """Train DeepLabV3/V3+ on the training shards, validating and checkpointing as it goes."""
    from pipeline.engine import distributed
    from stages import launch, steps
    from stages.progress import console, progress_bar

    p = steps.load(params, set_)
    mode = steps.Resume.from_flags(resume, auto_resume)
    if (gpus or nnodes > 1) and not distributed.in_worker():
        topo = launch.Topology(max(gpus, 1), nnodes, node_rank, master_addr, master_port)
        args = launch.train_args(params, set_, mode, allow_precision_change)
        _torchrun(topo, args, p.train.device, "train.device")
        return
    from stages.sweep import Pruned

    try:
        with _process_group(p.train.device) as rank:
            launch.check_same_params(p)  # nodes with other params.yaml: one line, no training
            if rank == 0:
                with progress_bar("train", "loss", "lr", "img_s") as update:
                    summary = steps.train(p, resume=mode, sink=_RichProgress(update), say=say,
                                          precision_change=allow_precision_change)  # fmt: skip
            else:
                summary = steps.train(p, resume=mode, precision_change=allow_precision_change)
    except Pruned as exc:  # a sweep's trial stopped early: not an error, not a finished model
        if rank == 0:
            console.print(str(exc), highlight=False, soft_wrap=True)
        raise typer.Exit(code=PRUNED_EXIT) from None
    if rank != 0:
        return
    best = summary["best_miou"]
    console.print(
        f"done at step {summary['step']}; best val mIoU "
        + (f"{100 * best:.2f}" if best is not None else "n/a")
        + f"; checkpoints in {steps.train_dir(p)}"
    )


@cli_errors
def evaluate(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint to score (default outputs/train/best.pt).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Instead of --checkpoint: a registry version (deeplab@v1.3.0, deeplab#prod), "
            "fetched from the DVC remote where this clone lacks it."
        ),
    ] = None,
    shards: Annotated[
        str | None,
        typer.Option(help="Shard folder or s3://bucket/prefix URL (default: the val shards)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder for metrics.json etc. (default outputs/eval; with --predictions: none)."
        ),
    ] = None,
    predictions: Annotated[
        Path | None,
        typer.Option(help="Score a folder of predicted labelId PNGs instead of a model."),
    ] = None,
    gt: Annotated[
        Path | None, typer.Option(help="With --predictions: the Cityscapes root holding gtFine/.")
    ] = None,
    split: Annotated[str, typer.Option(help="With --predictions: the gtFine split.")] = "val",
    gpus: Annotated[
        int,
        typer.Option(
            help="Processes, one per GPU, via torchrun, each scoring a slice (0: this process)."
            " Without CUDA, -S evaluate.device=cpu runs N gloo processes."
        ),
    ] = 0,
) -> None:
    """Evaluate a checkpoint on full-resolution shards, or score existing predictions (--predictions)."""
    from pipeline.engine import distributed
    from stages import launch, steps
    from stages.progress import console, progress_bar

    if predictions is not None:
        if gt is None:
            raise typer.BadParameter("--predictions needs --gt ROOT")
        with progress_bar("score") as update:
            metrics = steps.score_predictions(
                predictions, gt, split, "cityscapes", out, progress=update
            )
        _print_metrics(console, metrics)
        return
    p = steps.load(params, set_)
    source = None
    if model is not None:
        if checkpoint is not None:
            raise typer.BadParameter("give --checkpoint or --model, one of them")
        checkpoint, source = _from_registry(params, model)
    if gpus and not distributed.in_worker():
        extra = [
            f"--{k}={v}" for k, v in (("model", model), ("shards", shards), ("out", out)) if v
        ] + ([f"--checkpoint={checkpoint}"] if checkpoint and not model else [])
        args = launch.worker_args("eval", params, set_, *extra)
        _torchrun(launch.Topology(gpus), args, p.evaluate.device, "evaluate.device")
        return
    with _process_group(p.evaluate.device) as rank:
        if rank == 0:
            with progress_bar("eval") as update:
                metrics = steps.evaluate(
                    p, checkpoint, shards, out, progress=update, registry=source
                )
        else:
            metrics = steps.evaluate(p, checkpoint, shards, out, registry=source)
    if rank == 0:
        _print_metrics(console, metrics)


def _from_registry(params: Path, ref: str) -> tuple[Path, dict]:
    """(local weights, provenance) of a registry version, in the project of `params`."""
    from stages import model_files, registry

    root = Path(params).resolve().parent
    v = registry.resolve(root, ref)
    return model_files.fetch(root, v), v.provenance()


def say(line: str) -> None:
    """A line on stdout, flushed: how a training run starts (resumed from where, or a new run
    and why), which `dvc repro` and the flows' logs show as it happens."""
    typer.echo(line)


def _torchrun(topo, args: list[str], device: str, key: str) -> None:
    """This command again under torchrun, one worker per process of `topo`; torchrun's exit
    code is the command's (its workers printed their own errors)."""
    from stages import launch

    code = launch.launch(topo, args, device, key)
    if code:
        raise typer.Exit(code)


@contextmanager
def _process_group(device: str) -> Iterator[int]:
    """This process's rank in torchrun's process group (0 outside torchrun: no group), the
    group cleaned up at the end. A node or worker that died ends the command in one line
    ("another process of the group is gone ..."), not a traceback."""
    from pipeline.engine import distributed
    from stages import launch

    rank = distributed.init_from_env(device, launch.GROUP_TIMEOUT_S).rank
    try:
        yield rank
    except Exception as exc:
        lost = launch.lost_peer(exc)
        if lost is None:
            raise
        raise SegError(lost) from None
    finally:
        distributed.cleanup()


def _print_metrics(console, metrics: dict) -> None:
    from rich.table import Table

    table = Table(
        title=f"mIoU {100 * metrics['miou']:.2f}  pixel acc {100 * metrics['pixel_accuracy']:.2f}"
    )
    table.add_column("class")
    table.add_column("IoU", justify="right")
    for name, iou in metrics["per_class_iou"].items():
        table.add_row(name, "-" if iou is None else f"{100 * iou:.2f}")
    console.print(table)


@cli_errors
def predict(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders or globs.")],
    checkpoint: Annotated[
        Path | None, typer.Option(help="Trained checkpoint (e.g. outputs/train/best.pt).")
    ] = None,
    model_file: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Instead of --checkpoint: a model from `seg export` (.onnx, .torchscript.pt, "
            ".pt2), or a registry version (deeplab#prod, deeplab@v1.3.0: its checkpoint, fetched "
            "from the DVC remote where this clone lacks it).",
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("predictions"),
    dataset: Annotated[str, typer.Option(help="Label table for ids and colours.")] = "cityscapes",
    mode: Annotated[str, typer.Option(help="whole or slide.")] = "whole",
    crop: Annotated[tuple[int, int], typer.Option(help="Slide window (h w).")] = (1024, 1024),
    stride: Annotated[tuple[int, int], typer.Option(help="Slide stride (h w).")] = (768, 768),
    scales: Annotated[
        list[float] | None, typer.Option("--scale", help="Test scales (repeatable).")
    ] = None,
    flip: Annotated[bool, typer.Option(help="Add horizontally flipped inference.")] = False,
    output_stride: Annotated[int | None, typer.Option(help="Run at this output stride.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch (same-size images).")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    amp: Annotated[
        str, typer.Option(help="auto (bf16 where the hardware has it natively), bf16, fp16, off.")
    ] = "auto",
    output: Annotated[
        list[str] | None,
        typer.Option(
            help="What to write (repeatable): trainids, labelids, color, overlay. Default: all."
        ),
    ] = None,
) -> None:
    """Segment images: writes {name}_trainIds/_labelIds/_color/_overlay.png per image."""
    from pipeline.data.labels import get_spec
    from pipeline.engine.checkpoint import build_from_checkpoint, check_classes
    from pipeline.engine.device import precision, resolve_device
    from pipeline.engine.evaluate import InferenceOptions, prepare_for_inference
    from pipeline.engine.predict import OUTPUTS, expand_inputs, predict_files
    from stages.progress import console, progress_bar

    if mode not in ("whole", "slide"):
        raise typer.BadParameter(f"--mode {mode!r}: valid: whole, slide")
    from pipeline.params import check_inference

    check_inference(crop, stride, scales or (1.0,), batch_size, "--")
    if any(o not in OUTPUTS for o in output or ()):
        raise typer.BadParameter(f"--output {output}: valid: {', '.join(OUTPUTS)}")
    if (checkpoint is None) == (model_file is None):
        raise typer.BadParameter("give --checkpoint or --model, one of them")
    from stages.registry import parse_ref

    source = None
    if model_file is not None and not Path(model_file).exists() and parse_ref(model_file):
        checkpoint, source = _from_registry(Path("params.yaml"), model_file)
        model_file = None
    model_file = Path(model_file) if model_file is not None else None
    if model_file is not None and output_stride is not None:
        raise typer.BadParameter("--output-stride: an exported model runs at its export stride")
    dev = resolve_device(device)
    paths = expand_inputs(inputs)
    if model_file is not None:
        from pipeline.engine.export import load_exported

        model = load_exported(model_file, dev)  # runs like the model: model(x)["out"]
        ckpt, checkpoint = model.metadata, model_file  # the metadata holds model_config
        amp = "off"  # it runs in the precision it was exported in
    else:
        model, ckpt = build_from_checkpoint(checkpoint, "cpu", output_stride=output_stride)
        model = prepare_for_inference(model, dev)
    spec = get_spec(dataset)
    check_classes(ckpt, spec, checkpoint)
    opts = InferenceOptions(
        mode, crop, stride, tuple(scales or (1.0,)), flip, precision(amp, dev).dtype
    )
    with progress_bar("predict") as update:
        written = predict_files(
            model, paths, out, spec, dev, opts, batch_size, tuple(output or OUTPUTS), update
        )
    if source is not None:  # only then: a prediction folder otherwise holds the PNGs alone
        _write_provenance(out, checkpoint, model_file, source, len(paths))
    via = f" with {source['ref']} (commit {source['commit'][:8]})" if source else ""
    console.print(f"{len(paths)} image(s) -> {len(written)} files in {out}{via}")


def _write_provenance(out: Path, checkpoint, model_file, source, images: int) -> None:
    """{out}/provenance.json: which registry version made these predictions, and when."""
    import json

    from pipeline import provenance
    from pipeline.atomic import atomic_write
    from pipeline.engine.checkpoint import sha256_file

    weights = Path(model_file or checkpoint)
    doc = {
        "model": {"path": str(weights), "sha256": sha256_file(weights)},
        "registry": source,
        "images": images,
        "time": provenance.now(),
    }
    atomic_write(out / "provenance.json", json.dumps(doc, indent=2) + "\n")


@cli_errors
def average(
    checkpoints: Annotated[
        list[Path], typer.Argument(help="Checkpoints of one model (e.g. outputs/train/best-*.pt).")
    ],
    out: Annotated[Path, typer.Option(help="Where to write the averaged checkpoint.")] = Path(
        "outputs/train/averaged.pt"
    ),
) -> None:
    """Average the weights of several checkpoints (e.g. the best k by val mIoU)."""
    from pipeline.engine.checkpoint import average_checkpoints
    from stages.progress import console

    average_checkpoints(list(checkpoints), out)
    console.print(f"averaged {len(checkpoints)} checkpoints -> {out}")


@cli_errors
def runs(
    history: Annotated[Path, typer.Option(help="The run history file.")] = Path(
        "outputs/runs.parquet"
    ),
    compare: Annotated[
        tuple[str, str] | None,
        typer.Option(help="Compare two runs class by class (index or id prefix)."),
    ] = None,
) -> None:
    """The evaluation history: one row per `seg eval`, or two runs compared class by class."""
    import json

    from rich.table import Table

    from stages.history import find_run, read_runs
    from stages.progress import console, pct

    rows = read_runs(history)
    if compare:
        a, b = (find_run(rows, ref) for ref in compare)
        ia, ib = json.loads(a["per_class_iou"]), json.loads(b["per_class_iou"])
        table = Table(title=f"{a['run']} vs {b['run']}")
        for col in ("class", a["run"], b["run"], "delta"):
            table.add_column(col, justify="left" if col == "class" else "right")
        for name in ia:
            x, y = ia.get(name), ib.get(name)
            delta = "-" if x is None or y is None else f"{100 * (y - x):+.2f}"
            table.add_row(name, pct(x), pct(y), delta)
        table.add_row(
            "mIoU", pct(a["miou"]), pct(b["miou"]), f"{100 * (b['miou'] - a['miou']):+.2f}"
        )
        console.print(table)
        return
    table = Table(title=f"{len(rows)} evaluation(s) in {history}")
    for col in ("#", "run", "time", "git", "model", "step", "device", "train/eval", "mIoU"):
        table.add_column(col)
    for i, r in enumerate(rows):
        git = (r["git_revision"] or "-")[:8] + ("*" if r["git_dirty"] else "")
        precisions = f"{r.get('train_precision') or '-'}/{r.get('eval_precision') or '-'}"
        table.add_row(
            str(i), r["run"], r["time"] or "-", git, r["model"], str(r["step"]),
            r.get("device") or "-", precisions, pct(r["miou"]),
        )  # fmt: skip
    console.print(table)

"""`seg kfold`: grouped k-fold cross-validation (data.folds: K), and its summary as a table.

    seg kfold split          kfold/folds.json: the training split's groups in K folds
    seg kfold train K        fold K: train outside it, validate on it
    seg kfold eval K         fold K's final weights scored on fold K
    seg kfold summarize      mean and std over the folds -> kfold_summary.json
    seg kfold                that summary as a table

`dvc repro` runs them all (stages kfold_split, kfold_train@K, kfold_eval@K, kfold_summary).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.commands.engine import _print_metrics, _RichProgress, say
from stages.commands.options import ParamsOpt, PrecisionChangeOpt, SetOpt
from stages.errors import cli_errors

kfold_app = typer.Typer(
    help="Grouped k-fold cross-validation over the training split (data.folds: K).",
    no_args_is_help=False,
)

FoldArg = Annotated[int, typer.Argument(help="The fold, 0..K-1.")]


def register(app: typer.Typer) -> None:
    app.add_typer(kfold_app, name="kfold")


@kfold_app.callback(invoke_without_command=True)
@cli_errors
def show(
    ctx: typer.Context,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Mean and std of mIoU and each class's IoU over the folds, from kfold_summary.json."""
    if ctx.invoked_subcommand is not None:
        return
    import json

    from pipeline.errors import DataError
    from stages import steps

    path = steps.kfold_summary_file(steps.load(params, set_))
    if not path.is_file():
        raise DataError(f"{path}: no k-fold summary yet (set data.folds >= 2, then `dvc repro`)")
    _print_summary(json.loads(path.read_text()), path)


@kfold_app.command()
@cli_errors
def split(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Assign the training split's groups (city / sequence / scene) to data.folds folds."""
    from rich.table import Table

    from stages import steps
    from stages.progress import console

    p = steps.load(params, set_)
    doc = steps.kfold_split(p)
    if not doc["folds"]:
        console.print(f"data.folds is 0: k-fold is off; wrote {steps.folds_file(p)} with no folds")
        return
    table = Table(title=f"{doc['k']} folds of {doc['shards']} -> {steps.folds_file(p)}")
    for col in ("fold", "samples", "groups"):
        table.add_column(col, justify="left" if col == "groups" else "right")
    for f in doc["folds"]:
        table.add_row(str(f["fold"]), str(f["samples"]), ", ".join(f["groups"]))
    console.print(table)


@kfold_app.command()
@cli_errors
def train(
    fold: FoldArg,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the fold's last.pt; fails, saying why, if it can't.")
    ] = False,
    auto_resume: Annotated[
        bool,
        typer.Option(
            help="Continue last.pt if it is an unfinished run of the same params and folds."
        ),
    ] = False,
    allow_precision_change: PrecisionChangeOpt = False,
) -> None:
    """Train on the training split outside fold FOLD, validating on fold FOLD."""
    from stages import steps
    from stages.progress import console, progress_bar

    p = steps.load(params, set_)
    mode = steps.Resume.from_flags(resume, auto_resume)
    with progress_bar(f"fold {fold}", "loss", "lr", "img_s") as update:
        summary = steps.train(p, resume=mode, sink=_RichProgress(update), fold=fold, say=say,
                              precision_change=allow_precision_change)  # fmt: skip
    console.print(
        f"fold {fold}: done at step {summary['step']}; checkpoints in {steps.fold_dir(p, fold)}/train"
    )


@kfold_app.command("eval")
@cli_errors
def evaluate(fold: FoldArg, params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Score fold FOLD's final weights (its last.pt) on fold FOLD."""
    from stages import steps
    from stages.progress import console, progress_bar

    p = steps.load(params, set_)
    with progress_bar(f"eval fold {fold}") as update:
        metrics = steps.evaluate(p, progress=update, fold=fold)
    _print_metrics(console, metrics)


@kfold_app.command()
@cli_errors
def summarize(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Mean and std over the folds' metrics -> kfold_summary.json, printed as a table."""
    from stages import steps
    from stages.progress import console

    p = steps.load(params, set_)
    summary = steps.kfold_summarize(p)
    if not summary["folds"]:
        console.print(f"data.folds is 0: k-fold is off; wrote {steps.kfold_summary_file(p)}")
        return
    _print_summary(summary, steps.kfold_summary_file(p))


def _print_summary(summary: dict, path: Path) -> None:
    from rich.table import Table

    from stages.progress import console, pct

    if not summary.get("folds"):
        console.print(f"{path}: k-fold is off (data.folds: 0)")
        return

    def mean_std(s: dict) -> tuple[str, str]:
        return pct(s["mean"]), pct(s["std"])

    per_fold = "  ".join(
        f"{k} {pct(v['miou'])}" for k, v in summary["per_fold"].items() if v["miou"] is not None
    )
    mean, std = mean_std(summary["miou"])
    table = Table(
        title=f"{summary['folds']}-fold {summary.get('dataset', '')}: mIoU {mean} ± {std}",
        caption=f"{per_fold}\nstd: sample std (ddof=1) over folds; n: folds where the class is scored",
    )
    for col in ("class", "IoU mean", "± std", "n"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, s in summary["per_class_iou"].items():
        table.add_row(name, *mean_std(s), str(s["n"]))
    table.add_section()
    table.add_row("mIoU", mean, std, str(summary["miou"]["n"]))
    table.add_row(
        "pixel acc", *mean_std(summary["pixel_accuracy"]), str(summary["pixel_accuracy"]["n"])
    )
    console.print(table)

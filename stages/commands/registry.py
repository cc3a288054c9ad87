"""`seg compare`, `seg promote` and `seg registry show | register | sync`: models, their
versions and stages as git tags (GTO's format), and a gate that knows its uncertainty."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.errors import cli_errors

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="The params file.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
PushOpt = Annotated[
    bool, typer.Option("--push/--no-push", help="Push the tag to origin (where there is one).")
]

registry_app = typer.Typer(
    help="The model registry: dvc.yaml's artifacts, versions and stages as git tags (GTO).",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.command()(compare)
    app.command()(promote)
    registry_app.command("show")(show)
    registry_app.command("register")(register_version)
    registry_app.command("sync")(sync)
    app.add_typer(registry_app, name="registry")


@cli_errors
def compare(
    a: Annotated[str, typer.Argument(help="A: a registry version (deeplab@v1.2.0, deeplab#prod), an eval folder or its confusion_per_image.parquet, a checkpoint, a commit or an experiment.")],
    b: Annotated[str, typer.Argument(help="B: the same kinds; ΔmIoU is B - A.")],
    params: ParamsOpt = Path("params.yaml"),
    json_: JsonOpt = False,
    resamples: Annotated[int | None, typer.Option(help="Bootstrap resamples (default registry.resamples).")] = None,
    seed: Annotated[int | None, typer.Option(help="Resampling seed (default registry.seed).")] = None,
    level: Annotated[float | None, typer.Option(help="Confidence level (default registry.level).")] = None,
    method: Annotated[str, typer.Option(help="studentized (default), bca or percentile.")] = "studentized",
) -> None:  # fmt: skip
    """ΔmIoU of B over A with its interval, and each class's Δ: a paired bootstrap over the
    val frames (the same resampled frames for both; each resample's mIoU computed as the
    dataset-level metric). Both must be scored on the same val data with the same settings."""
    import json

    from pipeline import compare as cmp
    from pipeline.params import load_params
    from stages import gate
    from stages.progress import console

    p = load_params(params)
    r = p.registry
    if method not in cmp.METHODS:
        raise typer.BadParameter(f"--method {method!r}: one of {', '.join(cmp.METHODS)}")
    root = Path(params).resolve().parent
    fa, fb = gate.counts_of(root, a, p), gate.counts_of(root, b, p)
    c = cmp.paired_bootstrap(
        fa, fb, resamples or r.resamples, r.seed if seed is None else seed, level or r.level,
        method,
    )  # fmt: skip
    if json_:
        typer.echo(json.dumps({"a": a, "b": b, **c.to_dict()}, indent=2))
        return
    console.print(_comparison_table(c, a, b))
    console.print(
        f"{c.line()} ({100 * c.level:g} % {c.method}, {c.resamples} resamples of {c.frames} frames)"
    )


def _comparison_table(c, a: str, b: str):
    from rich.table import Table

    from stages.progress import pct

    table = Table(title=f"B = {b} vs A = {a}")
    for col in ("class", "A IoU", "B IoU", "Δ", f"{100 * c.level:g} % interval", "defined"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, ia, ib, d in zip(c.classes, c.iou_a, c.iou_b, c.class_delta, strict=True):
        table.add_row(name, pct(ia), pct(ib), _pts(d.value), _span(d), f"{100 * d.defined:.0f} %")
    table.add_row("mIoU", pct(c.miou_a), pct(c.miou_b), _pts(c.delta.value), _span(c.delta), "")
    return table


def _pts(x) -> str:
    return "-" if x is None else f"{100 * x:+.2f}"


def _span(d) -> str:
    return "-" if d.lo is None else f"[{100 * d.lo:+.2f}, {100 * d.hi:+.2f}]"


@cli_errors
def promote(
    name: Annotated[str, typer.Argument(help="The model (dvc.yaml's artifacts).")],
    version: Annotated[str, typer.Argument(help="Its version, e.g. v1.3.0.")],
    to: Annotated[str, typer.Option("--to", help="The stage to assign.")] = "prod",
    force: Annotated[bool, typer.Option(help="Assign even when the gate does not pass (needs --reason).")] = False,
    reason: Annotated[str | None, typer.Option(help="Why --force: recorded in the stage tag.")] = None,
    push: PushOpt = True,
    params: ParamsOpt = Path("params.yaml"),
    json_: JsonOpt = False,
) -> None:  # fmt: skip
    """Run the gate against the stage's current holder and assign the stage only when the
    ΔmIoU interval's lower bound is above registry.min_gain (a tag NAME#STAGE#N, pushed).
    Exits 1 when it does not pass (nothing changed)."""
    import json

    from pipeline.params import load_params
    from stages import gate
    from stages.progress import console

    p = load_params(params)
    root = Path(params).resolve().parent
    out = gate.promote(root, name, version, to, force, reason, push, p)
    if json_:
        typer.echo(json.dumps(out.to_dict(), indent=2, default=str))
        return
    for note in out.notes:
        console.print(note, highlight=False)
    if out.comparison is not None:
        console.print(_comparison_table(out.comparison, out.holder.ref, out.candidate.ref))
    console.print(out.line, highlight=False)
    if out.tag:
        console.print(f"{out.candidate.ref} is in {to}: tag {out.tag}", highlight=False)
    elif out.holder is None or out.holder.commit != out.candidate.commit:
        raise typer.Exit(1)  # not promoted: nothing changed


@cli_errors
def show(
    name: Annotated[str | None, typer.Argument(help="One model (default: every model).")] = None,
    params: ParamsOpt = Path("params.yaml"),
    json_: JsonOpt = False,
) -> None:
    """Versions, stages, val mIoU with its interval, data hash, params changed since the
    previous version, commit and experiment."""
    import json

    from rich.table import Table

    from stages import registry
    from stages.progress import console

    root = Path(params).resolve().parent
    rows = registry.show(root, name)
    if json_:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title=f"{len(rows)} version(s)")
    for col in (
        "model",
        "version",
        "stages",
        "val mIoU",
        "data",
        "params changed",
        "commit",
        "experiment",
    ):
        table.add_column(col)
    for r in rows:
        miou = "-" if r["miou"] is None else f"{100 * r['miou']:.2f}"
        if r["miou_lo"] is not None:
            miou += f" [{100 * r['miou_lo']:.2f}, {100 * r['miou_hi']:.2f}]"
        changed = r["params_changed"]
        changed = (
            "-"
            if changed is None
            else ", ".join(f"{k}: {v[0]} -> {v[1]}" for k, v in changed.items()) or "none"
        )
        table.add_row(
            r["name"], r["version"], ", ".join(r["stages"]) or "-", miou,
            (r["data_sha256"] or "-")[:12], changed, r["commit"][:8], r["experiment"] or "-",
        )  # fmt: skip
    console.print(table)
    for r in rows:
        if r["note"]:
            console.print(f"{r['name']}@{r['version']}: {r['note']}", highlight=False)


@cli_errors
def register_version(
    name: Annotated[str, typer.Argument(help="The model (dvc.yaml's artifacts).")],
    rev: Annotated[str, typer.Argument(help="A commit, branch or experiment name.")] = "HEAD",
    version: Annotated[str | None, typer.Option(help="The version (vX.Y.Z); default: the latest bumped.")] = None,
    bump: Annotated[str, typer.Option(help="major, minor or patch (without --version).")] = "minor",
    message: Annotated[str | None, typer.Option("--message", "-m", help="The tag's message.")] = None,
    push: PushOpt = True,
    params: ParamsOpt = Path("params.yaml"),
) -> None:  # fmt: skip
    """Register a commit or experiment as a new version of a model: the tag NAME@vX.Y.Z
    (pushed), its weights and evaluation in the DVC remote."""
    from stages import registry
    from stages.progress import console

    root = Path(params).resolve().parent
    v = registry.register(root, name, rev, version, bump, message, push)
    exp = f", experiment {v.experiment}" if v.experiment else ""
    console.print(f"registered {v.ref}: commit {v.commit[:8]}{exp}", highlight=False)


@cli_errors
def sync(params: ParamsOpt = Path("params.yaml")) -> None:
    """Write GTO's annotations file (artifacts.yaml) from dvc.yaml's artifacts."""
    from stages import registry
    from stages.progress import console

    path, changed = registry.sync_annotations(Path(params).resolve().parent)
    console.print(f"{path}: {'written' if changed else 'in step with dvc.yaml'}", highlight=False)

"""`seg synth`: write synthetic Cityscapes-format scenes (the demo and test data)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.errors import cli_errors


@cli_errors
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Root to create (Cityscapes layout).")],
    train: Annotated[int, typer.Option(help="Frames in the train split.")] = 40,
    val: Annotated[int, typer.Option(help="Frames in the val split.")] = 10,
    test: Annotated[int, typer.Option(help="Frames in the test split.")] = 0,
    height: Annotated[int, typer.Option(help="Frame height in pixels (Cityscapes: 1024).")] = 128,
    width: Annotated[int, typer.Option(help="Frame width in pixels (Cityscapes: 2048).")] = 256,
    seed: Annotated[int, typer.Option(help="Same seed and sizes give byte-identical files.")] = 0,
    workers: Annotated[int, typer.Option(help="Processes; 0 = all CPU cores.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing synthetic root.")] = False,
) -> None:
    """Generate street scenes with Cityscapes labelIds / instanceIds, deterministically."""
    from rich.progress import Progress

    from stages import steps

    splits = {name: n for name, n in (("train", train), ("val", val), ("test", test)) if n}
    with Progress(transient=True) as bar:
        task = bar.add_task("synth", total=None)
        summary = steps.synth(
            out_dir, splits or {"train": 0}, height, width, seed, workers, overwrite,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )  # fmt: skip
    frames = ", ".join(f"{n} {split}" for split, n in summary["frames"].items())
    typer.echo(
        f"wrote {frames} frames of {height}x{width} to {out_dir}: "
        f"{len(summary['classes'])} evaluated classes, label ids {summary['label_ids']}"
    )


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app`."""
    app.command("synth")(synth)

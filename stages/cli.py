"""`seg`: the command line of the pipeline. Heavy imports (torch) live inside commands."""

from __future__ import annotations

import typer

from stages.commands import (
    data,
    doctor,
    engine,
    export,
    kfold,
    models,
    pipeline,
    recipes,
    registry,
    sweep,
    synth,
)

app = typer.Typer(
    name="seg",
    help="DeepLabV3/V3+ semantic segmentation: synthesize or convert data, train, evaluate, predict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _module in (
    synth, data, models, engine, export, kfold, recipes, pipeline, sweep, registry, doctor,
):  # fmt: skip
    _module.register(app)


@app.callback()
def _root() -> None:
    """DeepLabV3/V3+ semantic segmentation pipeline (Cityscapes, CamVid, PASCAL VOC, Virtual KITTI)."""


if __name__ == "__main__":
    app()

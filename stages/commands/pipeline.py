"""`seg flow` and `seg serve`: the stages as Prefect flows, now or on a schedule.

Without PREFECT_API_URL, flows run in Prefect's ephemeral mode (no server to start). To see
runs in the UI: `prefect server start --host 127.0.0.1` and
`export PREFECT_API_URL=http://127.0.0.1:4200/api`. Prefect is imported inside the commands,
so `seg --help` stays fast.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from stages.errors import cli_errors

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="The params file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="Override a param, e.g. -S train.lr=0.02 (repeatable)."),
]
LogEveryOpt = Annotated[int, typer.Option(help="Log training progress every N steps.")]


class Stage(str, Enum):
    synth = "synth"
    preprocess = "preprocess"
    train = "train"
    evaluate = "evaluate"
    pipeline = "pipeline"


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app`."""
    app.command()(flow)
    app.command()(serve)


def _prepare(params: Path, set_: list[str] | None):
    """Validate params and the Prefect server before any work; returns the API URL or None."""
    from stages import steps

    steps.load(params, set_)
    # the library's `seg` logger -> Prefect run logs (read when prefect is first imported)
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "seg")
    from stages import flows

    return flows.check_server()


@cli_errors
def flow(
    stage: Annotated[
        Stage, typer.Argument(help="The stage to run, or the whole pipeline.")
    ] = Stage.pipeline,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option(help="train: continue an unfinished run of the same params.")
    ] = True,
    log_every: LogEveryOpt = 50,
    gpus: Annotated[
        int, typer.Option(help="train/pipeline: DDP under torchrun with N processes (GPUs).")
    ] = 0,
) -> None:
    """Run a stage's Prefect flow (or the pipeline flow) now; ephemeral unless PREFECT_API_URL is set."""
    api = _prepare(params, set_)
    from stages import flows
    from stages.progress import console

    kwargs = {"params": str(params), "overrides": set_ or []}
    if stage in (Stage.train, Stage.pipeline):
        kwargs.update(resume=resume, log_every=log_every, gpus=gpus)
    result = flows.FLOWS[stage.value](**kwargs)
    if isinstance(result, dict) and "miou" in result:
        console.print(
            f"mIoU {100 * result['miou']:.2f}  pixel acc {100 * result['pixel_accuracy']:.2f}"
            f"  ({result['metrics']})"
        )
    console.print(f"flow {stage.value} done" + (f"; runs at {api}" if api else " (ephemeral)"))


@cli_errors
def serve(
    name: Annotated[str, typer.Option(help="Deployment name.")] = "nightly",
    cron: Annotated[str, typer.Option(help="When to run (cron; UTC unless --timezone).")] = (
        "0 3 * * *"
    ),
    timezone: Annotated[
        str | None, typer.Option(help="IANA timezone of --cron, e.g. Europe/Berlin.")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Serve the pipeline flow as a scheduled deployment until Ctrl-C (runs in this directory)."""
    api = _prepare(params, set_)
    from prefect import serve as prefect_serve

    from stages import flows
    from stages.progress import console

    deployment = flows.deployment(name, cron, timezone, str(params), set_)
    if api is None:
        console.print(
            "PREFECT_API_URL is not set: serving against a temporary local API that ends with "
            "this process. For the UI: `prefect server start --host 127.0.0.1` and "
            "PREFECT_API_URL=http://127.0.0.1:4200/api",
            highlight=False,
            soft_wrap=True,
        )
    prefect_serve(deployment)

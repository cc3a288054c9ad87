"""`seg flow`, `seg serve`, `seg deploy`: the DVC graph as a Prefect flow, now or on a schedule.

Each flow task runs one DVC stage (DVC decides what is stale). `seg flow` runs in this
project, as `dvc exp run` does; a deployment's runs (`seg serve`, `seg deploy`) are
experiments pinned to a commit, each in a workspace of its own (stages/runs.py). Without PREFECT_API_URL,
`seg flow` runs in Prefect's ephemeral mode (no server to start). To see runs in the UI:
`prefect server start --host 127.0.0.1` and `export PREFECT_API_URL=http://127.0.0.1:4200/api`.
Prefect and DVC are imported inside the commands, so `seg --help` stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from stages.commands.options import FlowSetOpt as SetOpt
from stages.errors import cli_errors

LogEveryOpt = Annotated[int, typer.Option(help="Log training progress every N steps.")]
NameOpt = Annotated[
    str | None,
    typer.Option(help="Deployment name (default: the repository's name, from its git remote)."),
]
BranchOpt = Annotated[
    str | None,
    typer.Option(
        help="Each scheduled run takes the tip of this branch when it starts (default: the "
        "branch checked out here); a run may name a commit instead (parameter `commit`)."
    ),
]
LimitOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--limit",
        help="Seconds a run's commands may take, NAME=SECONDS (repeatable): git (300), dvc "
        "(3600: pull, push, exp save), stage (604800: one stage, training included), lock "
        "(600: waiting for DVC's lock).",
    ),
]
PromoteOpt = Annotated[
    str | None,
    typer.Option(
        help="A registry stage (prod): each run's model is registered and gated against the "
        "stage's holder, promoted when ΔmIoU's lower bound beats registry.min_gain."
    ),
]
CronOpt = Annotated[str, typer.Option(help="When to run (cron; UTC unless --timezone).")]
TimezoneOpt = Annotated[
    str | None, typer.Option(help="IANA timezone of --cron, e.g. Europe/Berlin.")
]
CollisionOpt = Annotated[
    str,
    typer.Option(
        help="A run due while the previous one still runs: skip (cancel it) or queue (wait)."
    ),
]


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app`."""
    app.command()(flow)
    app.command()(serve)
    app.command()(deploy)


def _prepare(set_: list[str] | None, need_server: bool = False):
    """Validate params and the Prefect server before any work; returns the API URL or None."""
    from stages import steps

    steps.load("params.yaml", set_)
    from stages import deployments

    api = deployments.check_server()
    if need_server and api is None:
        from pipeline.errors import ConfigError

        raise ConfigError(
            "PREFECT_API_URL is not set: workers find deployments through a Prefect server, "
            "e.g. PREFECT_API_URL=http://127.0.0.1:4200/api after `prefect server start`"
        )
    return api


@cli_errors
def flow(
    targets: Annotated[
        list[str] | None,
        typer.Argument(help="DVC stages to bring up to date (default: all), with what they need."),
    ] = None,
    set_: SetOpt = None,
    log_every: LogEveryOpt = 50,
) -> None:
    """Run the pipeline flow now, in this project (as `dvc exp run`: the results show here):
    each stale DVC stage runs, the rest are reported up to date."""
    api = _prepare(set_)
    from stages import deployments, dvc_stages, flows
    from stages.progress import console

    root = dvc_stages.project_root()
    dvc_stages.stage_plan(root, targets)  # an unknown stage fails in one line, before any run
    with deployments.ephemeral_startup() if api is None else deployments.safe_urls():
        result = flows.pipeline_flow(targets=targets, overrides=set_ or [], log_every=log_every)
    for stage, outcome in result["stages"].items():
        console.print(f"{stage}: {outcome}", highlight=False)
    if "experiment" in result:
        console.print(f"experiment {result['experiment']} (dvc exp show)", highlight=False)
    if "miou" in result:
        console.print(
            f"mIoU {100 * result['miou']:.2f}  pixel acc {100 * result['pixel_accuracy']:.2f}"
            f"  ({result['metrics']})"
        )
    console.print("flow done" + (f"; runs at {api}" if api else " (ephemeral)"))


@cli_errors
def serve(
    name: NameOpt = None,
    cron: CronOpt = "0 3 * * *",
    timezone: TimezoneOpt = None,
    set_: SetOpt = None,
    collision: CollisionOpt = "skip",
    branch: BranchOpt = None,
    limit: LimitOpt = None,
    promote: PromoteOpt = None,
) -> None:
    """Serve the pipeline flow on a schedule until Ctrl-C, one run at a time: each run is an
    experiment at the tip of the branch, in a workspace of its own; this clone is not changed
    (the experiment's ref lands in it, as `dvc exp run --temp` leaves it)."""
    api = _prepare(set_)
    from prefect import serve as prefect_serve

    from stages import deployments, dvc_stages, flows, runs, supervise
    from stages.progress import console

    deployments.check_options(cron, timezone, collision, limit)
    root = dvc_stages.project_root()  # runs start from here: fail now, not at 3 a.m.
    branch = branch or runs.current_branch(root, runs.Limits())
    name = name or deployments.default_name(root)
    deployment = deployments.deployment(
        name, cron, timezone, set_, collision, branch, limit, promote
    )
    # the runs it starts send heartbeats; a run whose heartbeats stop is marked Crashed
    os.environ.update(deployments.run_env())
    if api is not None:
        supervise.crash_silent_runs(deployment.apply(), f"{flows.pipeline_flow.name}/{name}")
    if api is None:
        console.print(
            "PREFECT_API_URL is not set: serving against a temporary local API that ends with "
            "this process. For the UI: `prefect server start --host 127.0.0.1` and "
            "PREFECT_API_URL=http://127.0.0.1:4200/api",
            highlight=False,
            soft_wrap=True,
        )
    with deployments.ephemeral_startup() if api is None else deployments.safe_urls():
        prefect_serve(deployment)


@cli_errors
def deploy(
    pool: Annotated[str, typer.Option(help="Work pool whose workers run the flow.")],
    name: NameOpt = None,
    cron: CronOpt = "0 3 * * *",
    timezone: TimezoneOpt = None,
    set_: SetOpt = None,
    collision: CollisionOpt = "skip",
    workdir: Annotated[
        str | None,
        typer.Option(
            help="The project folder on the workers' machines (default: this one), or '$NAME':"
            " the clone each worker's environment variable NAME points to."
        ),
    ] = None,
    branch: BranchOpt = None,
    limit: LimitOpt = None,
    promote: PromoteOpt = None,
    notify: Annotated[
        str | None,
        typer.Option(help="A webhook URL that gets one call when a run's model regresses."),
    ] = None,
) -> None:
    """Register the scheduled pipeline on a work pool; `prefect worker start --pool POOL` runs
    it. Each run is an experiment at a commit (the branch's tip, or the run's `commit`), in a
    workspace of its own made from the worker's clone, which it never changes."""
    api = _prepare(set_, need_server=True)
    from stages import deployments, dvc_stages, runs
    from stages.progress import console

    deployments.check_options(cron, timezone, collision, limit)
    root = dvc_stages.project_root()
    branch = branch or runs.current_branch(root, runs.Limits())
    name = name or deployments.default_name(root)
    variable = deployments.workdir_variable(workdir or "")
    where = workdir if variable else (Path(workdir) if workdir else root).absolute()
    deployment_id = deployments.deploy(
        pool, name, cron, timezone, set_, collision, where, branch, limit, 1, promote, notify
    )
    start = f"{variable}=/path/to/clone " if variable else ""
    console.print(
        f"deployment seg-pipeline/{name} ({deployment_id}) on work pool {pool!r} at {api}: "
        f"cron {cron!r}, one run at a time ({collision}), in {where}. "
        f"Start a worker there: {start}prefect worker start --pool {pool}",
        highlight=False,
        soft_wrap=True,
    )

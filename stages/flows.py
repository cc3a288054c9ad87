"""The DVC graph as a Prefect flow: DVC decides what runs, Prefect schedules, retries, logs it.

`seg-pipeline` runs the stages of dvc.yaml in graph order, one task per stage. Each task asks
DVC whether its stage is stale (`dvc status STAGE`) and, only then, runs it
(`dvc repro --single-item STAGE`): a run with nothing changed finishes in seconds with every
stage reported up to date, a changed param reruns exactly the stale stages, and every result
lands in dvc.lock. The stage commands are the `seg` commands in dvc.yaml, so the flow,
`dvc repro` and `seg` reach the same code.

A run is (commit, overrides, targets). A deployment's run, on whichever worker (or `seg
serve`) picks it up, works in a workspace of its own at its commit (stages/runs.py: the tip of
its branch when it starts, or the commit it names), with that commit's code, and never
changes the host's clone: the overrides go into the workspace's params.yaml, the outputs come
from the host's DVC cache or the DVC remote, an experiment of the same commit and params is
reused (`reuse_experiment`), the stale stages run, and the result is saved as a DVC
experiment named after the flow run and pushed (`dvc exp push`: the git ref to origin, the
outputs to the DVC remote; on a host without remotes the ref goes into the clone, as
`dvc exp run --temp` leaves it). While training, each checkpoint is copied to a store of the
run's commit and overrides (`checkpoint_store`), so the next run of the same work resumes
from it on any host. `seg flow` runs in the project itself, as `dvc exp run` does.

Locking: a deployment has a concurrency limit of 1, so two of its runs never overlap
(`collision`: skip cancels the newcomer, queue makes it wait); a run that the server marks
Crashed or Cancelled while it is alive (its slot may be another run's) stops itself
(`RunWatch`). Workspaces share nothing they write: hosts cannot damage each other's outputs.
In the project itself (`seg flow`), DVC's own locks keep two writers off the same outputs.
DVC owns caching too: no Prefect result caching (`cache_policy=NO_CACHE,
persist_result=False`). Every command a run starts has a time limit (runs.Limits).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from pipeline.errors import ConfigError
from stages import runs, steps
from stages.artifacts import publish_metrics, run_markdown, stages_markdown
from stages.dvc_stages import (
    IO_RETRIES,
    IO_STAGES,
    StageFailed,
    _plan,
    all_changes,
    dvc_stage,
    project_root,
    release_stale_locks,
    retry_stage,
    set_params,
    stage_plan,
)
from stages.experiments import (
    checkpoint_store,
    default_dvc_remote,
    push_experiment,
    remotes,
    restore_outputs,
    reuse_experiment,
    save_experiment,
    store_display,
)
from stages.supervise import RunWatch


@flow(name="seg-pipeline", persist_result=False)
def pipeline_flow(
    targets: list[str] | None = None,
    overrides: list[str] | None = None,
    log_every: int = 50,
    commit: str | None = None,
    branch: str | None = None,
    limits: dict[str, float] | None = None,
    workspace: bool = False,
    trial: dict | None = None,
    promote: str | None = None,
) -> dict:
    """Run the stale stages of dvc.yaml up to `targets` (default: all), one task per stage,
    with `overrides` (`section.key=value`, as `dvc exp run -S`).

    A deployment's run (a worker's, `seg serve`'s) is an experiment at a pinned commit: in a
    workspace of its own (stages/runs.py) at `commit`, or at the tip of `branch` when it
    starts (default: the branch it was deployed from), with that commit's code; it never
    changes the host's clone. Called directly (`seg flow`), it runs in the project itself,
    as `dvc exp run` does; `workspace` makes it run as a deployment's run does (a local
    sweep's trials). `limits`: seconds per kind of command (runs.Limits). `trial`: the sweep
    trial this run is (stages/sweep.py TrialLink): its training reports to the sweep's study,
    and the run tells the study how it ended. `promote` (a deployment's run): the registry
    stage its model is gated for (stages/promotion.py)."""
    from prefect.runtime import deployment

    logger = get_run_logger()
    watch = RunWatch.start_if_supervised(logger)
    try:
        lim = runs.Limits.parse(limits)
        if deployment.get_id() or workspace:
            out = _in_workspace(
                targets, overrides, log_every, commit, branch, lim, logger, trial, promote
            )
            gated = out.get("promotion")
            if gated and not gated["promoted"]:  # the run completes, saying why
                from prefect.states import Completed

                return Completed(message=gated["line"], data=out)
            return out
        if commit or branch:
            raise ConfigError("commit and branch pin a deployment's runs; `seg flow` runs here")
        return _pipeline(project_root(), targets, overrides, log_every, lim, logger)
    finally:
        if watch is not None:
            watch.stop()


def _in_workspace(
    targets, overrides, log_every, commit, branch, lim, logger, trial, promote
) -> dict:
    """A deployment's run: its workspace made, its own code loaded, the pipeline run there by
    that code (`run_in_workspace`), the workspace removed."""
    from prefect.runtime import flow_run

    clone = project_root()
    gone = runs.sweep(clone)
    if gone:
        logger.info("removed the workspaces of %d run(s) that are gone: %s", len(gone),
                    ", ".join(gone))  # fmt: skip
    name = runs.experiment_name(flow_run.get_name() or "run", flow_run.get_id() or "")
    ws = runs.open_workspace(clone, name, commit, branch, lim)
    logger.info(
        "workspace %s: commit %s (%s) on host %s, made in %.1f s", ws.path, ws.commit[:12],
        ws.source, runs.host(), ws.seconds,
    )  # fmt: skip
    try:
        with runs.own_code(ws.path) as code:
            enter = getattr(code, "run_in_workspace", None)
            if enter is None:
                raise ConfigError(
                    f"commit {ws.commit[:12]}: its stages/flows.py has no run_in_workspace (a "
                    "commit from before per-run workspaces): run it with `seg flow` in a "
                    "checkout of it"
                )
            return enter(
                workspace=str(ws.path), clone=str(clone), commit=ws.commit, source=ws.source,
                name=name, targets=targets, overrides=list(overrides or []),
                log_every=log_every, limits=lim.as_dict(), setup_seconds=ws.seconds,
                **({"trial": trial} if trial else {}),
                **({"promote": promote} if promote else {}),
            )  # fmt: skip
    finally:
        ws.remove()
        logger.info("workspace %s removed", ws.path)


def run_in_workspace(
    workspace: str,
    clone: str,
    commit: str,
    source: str,
    name: str,
    targets: list[str] | None,
    overrides: list[str],
    log_every: int,
    limits: dict[str, float],
    setup_seconds: float,
    trial: dict | None = None,
    promote: str | None = None,
) -> dict:
    """The pipeline in a run's workspace, by the workspace's own code (its stages.flows; the
    deployment's entry point calls this after `runs.load_flows`). Outputs come from the
    host's cache or the DVC remote, the stale stages run with the overrides, and the result
    is saved as experiment `name` and pushed: to origin and the DVC remote, or, on a host
    without them, into the clone (as `dvc exp run --temp` leaves it)."""
    here = os.getcwd()
    os.chdir(workspace)  # DVC resolves stage names and paths from the working directory
    try:
        return _run_in_workspace(
            workspace, clone, commit, source, name, targets, overrides, log_every, limits,
            setup_seconds, trial, promote,
        )  # fmt: skip
    finally:
        os.chdir(here)


def _run_in_workspace(
    workspace,
    clone,
    commit,
    source,
    name,
    targets,
    overrides,
    log_every,
    limits,
    setup_seconds,
    trial,
    promote,
) -> dict:
    logger = get_run_logger()
    root, lim = Path(workspace), runs.Limits.parse(limits)
    steps.load(root / "params.yaml", overrides)  # a bad override fails here, before any work
    planned = stage_plan(root, targets)
    dvc_remote = default_dvc_remote(root)
    store = checkpoint_store(root, Path(clone), runs.run_key(commit, overrides), dvc_remote)
    run = {
        "name": name, "commit": commit, "source": source, "overrides": overrides,
        "targets": targets, "host": runs.host(), "flow_run_id": _flow_run_id(),
        "checkpoints": store_display(store),
    }  # fmt: skip
    env = {
        **runs.workspace_env(root), "SEG_RUN": json.dumps(run), "SEG_RUN_NAME": name,
        "SEG_RUN_STORE": str(store),
    }  # fmt: skip
    link = None
    if trial:
        from stages.sweep import TrialLink

        link = TrialLink(**trial)
        env.update(link.to_env())
        run["trial"] = {"sweep": link.study, "number": link.number}
    if overrides:
        set_params(workspace, overrides)
    reused = reuse_experiment(workspace, commit, lim.git)
    restored = restore_outputs(workspace, dvc_remote is not None, lim.dvc)
    logger.info(
        "outputs of dvc.lock restored in %.1f s (%s); checkpoints of this commit and overrides "
        "go to %s", restored, "host cache, then DVC remote" if dvc_remote else "host cache",
        run["checkpoints"],
    )  # fmt: skip
    results = run_stages(root, planned, log_every, lim, logger, env)
    out: dict = {"stages": {r["stage"]: r["result"] for r in results}, "run": run}
    run["reused"] = reused
    out["pruned"] = _pruned_at(results)
    ran = [r["stage"] for r in results]  # up to date, ran or pruned: the stages it has outputs of
    out["experiment"] = save_experiment(workspace, name, lim.dvc, ran, untracked=True)
    push_experiment(workspace, "origin", name, outputs=dvc_remote is not None, limit=lim.dvc)
    if "evaluate" in planned and out["pruned"] is None:
        out.update(publish_metrics(workspace, evaluated="evaluate" in _ran(results)))
    out["kfold"] = _kfold(root)
    if promote and out["pruned"] is None and "evaluate" in planned:
        from stages.promotion import promote_model
        from stages.registry import models

        declared = sorted(models(root))
        if len(declared) != 1:
            raise ConfigError(f"promote: dvc.yaml declares {len(declared)} models, not one")
        out["promotion"] = promote_model(workspace, out["experiment"], promote, declared[0])
    if link is not None:
        from stages.sweep_flow import finish_trial

        told = finish_trial(link, {**out, "experiment": out["experiment"], "host": run["host"]})
        logger.info("trial %d of sweep %s: %s", link.number, link.study, told)
    create_markdown_artifact(
        markdown=run_markdown(run, out, setup_seconds, restored),
        key="run",
        description="What this run was: commit, overrides, experiment, host",
    )
    return out


def _pipeline(root: Path, targets, overrides, log_every: int, lim, logger) -> dict:
    """`seg flow`: the stale stages run in the project itself; with overrides (written into
    params.yaml) or remotes, what ran is saved as an experiment, and pushed with remotes."""
    from prefect.runtime import flow_run

    steps.load(root / "params.yaml", overrides)  # a bad override fails here, before any work
    planned = stage_plan(root, targets)
    logger.info("project %s; stages in order: %s", root, ", ".join(planned))
    team = remotes(root)  # (git remote, DVC remote): runs travel between hosts
    for note in release_stale_locks(root):
        logger.warning("%s", note)
    if overrides:
        set_params(str(root), overrides)
    name = runs.experiment_name(flow_run.get_name() or "run", flow_run.get_id() or "")
    run = {"name": name, "overrides": list(overrides or []), "host": runs.host(),
           "flow_run_id": _flow_run_id()}  # fmt: skip
    results = run_stages(root, planned, log_every, lim, logger, {"SEG_RUN": json.dumps(run)})
    out: dict = {"stages": {r["stage"]: r["result"] for r in results}}
    if (overrides or team) and _ran(results):
        out["experiment"] = save_experiment(str(root), name, lim.dvc)
        if team:
            push_experiment(str(root), team[0], out["experiment"], limit=lim.dvc)
    if "evaluate" in planned:
        out.update(publish_metrics(str(root), evaluated="evaluate" in _ran(results)))
    return out


def _pruned_at(results: list[dict]) -> int | None:
    """The step a sweep's pruner stopped training at (its `pruned at step N` line), or None."""
    for r in results:
        for note in r.get("notes") or []:
            if note.startswith("pruned at step "):
                return int(note.split()[3])
    return None


def _kfold(root: Path) -> dict | None:
    """The k-fold mean and std of val mIoU when folds are on (kfold_summary.json)."""
    p = steps.load(root / "params.yaml")
    path = root / steps.kfold_summary_file(p)
    if p.data.folds < 2 or not path.is_file():
        return None
    doc = json.loads(path.read_text())
    miou = doc.get("miou") or {}
    return {"mean": miou.get("mean"), "std": miou.get("std"), "folds": p.data.folds}


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.get_id()


def run_stages(root: Path, planned: list[str], log_every: int, lim, logger, env: dict) -> list:
    """Each planned stage, in order, as a task: run if DVC says it is stale. The stage table
    (the `dvc-stages` artifact) is written whatever happens."""
    logger.info("stages in order: %s", ", ".join(planned))
    upstream = _plan(root, None)[1]
    # one `dvc status` for all; a stage is asked again only when something it depends on ran
    try:
        first: dict | None = all_changes(root, planned, lim.lock, env)
    except StageFailed:  # a stage's files are busy: ask stage by stage, to name the stage
        first = None
    ran: set[str] = set()
    results: list[dict] = []
    failed = None
    try:
        for stage in planned:
            retrying = stage.split("@")[0] in IO_STAGES
            run = dvc_stage.with_options(
                retries=IO_RETRIES if retrying else 0,
                retry_delay_seconds=5,
                retry_condition_fn=retry_stage,
            )
            fresh = first is not None and not upstream.get(stage, set()) & ran
            known = first.get(stage, []) if fresh else None
            results.append(run(str(root), stage, log_every, lim.as_dict(), env, known))
            if results[-1]["result"] == "pruned":  # nothing downstream of a pruned trial
                logger.info("%s was pruned: the stages after it do not run", stage)
                break
            if results[-1]["result"] != "up to date":
                ran.add(stage)
    except BaseException:
        failed = next((s for s in planned if s not in {r["stage"] for r in results}), None)
        raise
    finally:
        create_markdown_artifact(
            markdown=stages_markdown(results, planned, failed),
            key="dvc-stages",
            description="Each DVC stage of this run: ran or up to date, and why",
        )
    return results


def _ran(results: list[dict]) -> list[str]:
    return [r["stage"] for r in results if r["result"] != "up to date"]

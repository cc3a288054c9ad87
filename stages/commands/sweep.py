"""`seg sweep NAME -S ...`: a hyperparameter search over the work pool (or `--local`), each
trial a run of the pipeline and a DVC experiment; `seg sweep show NAME`: its trials, ranked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from stages.errors import cli_errors


def register(app: typer.Typer) -> None:
    app.command(context_settings={"help_option_names": ["-h", "--help"]})(sweep)


@cli_errors
def sweep(
    name: Annotated[
        str, typer.Argument(help="The sweep's name (its Optuna study); `show`: see below.")
    ],
    show_name: Annotated[
        str | None,
        typer.Argument(
            metavar="[NAME]", help="With `seg sweep show NAME`: the sweep whose trials to list."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-S",
            help="The search space, in `dvc exp run -S` syntax (Hydra's): train.lr=0.02,0.05 "
            "(a choice), 'train.batch_size=range(4,16,4)', 'train.crop_size=choice([96,96],"
            "[128,128])', 'train.lr=tag(log, interval(0.001,0.1))'; a single value is fixed.",
        ),
    ] = None,  # fmt: skip
    sampler: Annotated[str, typer.Option(help="grid | random | tpe (Optuna's TPE).")] = "grid",
    trials: Annotated[
        int | None, typer.Option(help="Trials in all (random and tpe need it; grid: its size).")
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(help="Seconds: after them no trial is handed out; running ones finish."),
    ] = None,
    parallel: Annotated[
        int, typer.Option(help="Trials at once on the pool (each worker runs --limit of them).")
    ] = 2,
    prune: Annotated[
        str, typer.Option(help="none | median | hyperband: stop trials behind the others.")
    ] = "none",
    seed: Annotated[int, typer.Option(help="The sampler's seed.")] = 0,
    max_grid: Annotated[int, typer.Option(help="The largest grid to run.")] = 256,
    storage: Annotated[
        str | None,
        typer.Option(
            help="Optuna's storage: postgresql+psycopg://user@host/db for several hosts "
            "(default: a journal file in .dvc/tmp/seg/, one host)."
        ),
    ] = None,
    pool: Annotated[
        str | None, typer.Option(help="The work pool whose workers run the trials.")
    ] = None,
    workdir: Annotated[
        str, typer.Option(help="The project on the workers' machines, or '$NAME' (seg deploy).")
    ] = "$SEG_PROJECT",
    branch: Annotated[
        str | None, typer.Option(help="The trials run the tip of this branch (default: this one).")
    ] = None,
    local: Annotated[
        bool, typer.Option("--local", help="Run the trials here, one after another (no server).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="`show`: the table as JSON.")] = False,
) -> None:
    """Search hyperparameters: trials run as pipeline runs on the pool (or --local), each a DVC
    experiment at one pinned commit, pruned when --prune says so; a killed sweep started again
    under its name goes on. `seg sweep show NAME` ranks its trials by val mIoU."""
    from stages import sweep as sw
    from stages.dvc_stages import project_root

    root = project_root()
    url = storage or sw.default_storage(root)
    if name == "show":
        if not show_name:
            raise typer.BadParameter("seg sweep show NAME: which sweep?")
        return _show(show_name, url, as_json)
    if show_name is not None:
        raise typer.BadParameter(f"unexpected {show_name!r}: `seg sweep NAME -S ...`")
    space = sw.parse_space(list(set_ or []), root / "params.yaml")
    total = sw.check_budget(sampler, space, trials, max_grid)
    sw.pruner(prune)  # an unknown --prune: one line, now
    if parallel < 1:
        from pipeline.errors import ConfigError

        raise ConfigError(f"--parallel {parallel}: at least 1")
    api = _server(local)
    commit, source = _pin(root, branch)
    settings = sw.Settings(space.as_dict(), sampler, prune, total, commit, seed, timeout)
    from stages import deployments
    from stages.sweep_flow import study_of, sweep_flow

    study_of(name, url, settings)  # created, or the same sweep continued (else one line)
    deployment = None
    if not local:
        from pipeline.errors import ConfigError

        if not pool:
            raise ConfigError("a sweep runs its trials on a work pool: --pool POOL, or --local")
        dep_name = f"sweep-{name}"
        deployments.deploy(
            pool, dep_name, None, None, None, "queue", workdir, branch, None, parallel
        )  # fmt: skip
        deployment = f"seg-pipeline/{dep_name}"
    from stages.progress import console

    console.print(
        f"sweep {name}: {total} trials ({sampler}, pruning {prune}) at commit {commit[:12]} "
        f"({source}); " + ("here, one at a time" if local else
                          f"on pool {pool!r}, {parallel} at once, at {api}"), highlight=False,
    )  # fmt: skip
    with deployments.ephemeral_startup() if api is None else deployments.safe_urls():
        result = sweep_flow(name, url, parallel=1 if local else parallel,
                            deployment=deployment, local=local)  # fmt: skip
    best = result.get("best")
    console.print(
        f"sweep {name}: {result['trials']} trials; best "
        + (f"trial {best['number']}, val mIoU {100 * best['miou']:.2f} ({' '.join(best['overrides'])})"
           if best else "none finished")
        + f"; `seg sweep show {name}` ranks them", highlight=False,
    )  # fmt: skip


def _server(local: bool) -> str | None:
    from stages import deployments

    api = deployments.check_server()
    if api is None and not local:
        from pipeline.errors import ConfigError

        raise ConfigError(
            "PREFECT_API_URL is not set: trials reach the pool's workers through a Prefect "
            "server (or run them here: --local)"
        )
    return api


def _pin(root: Path, branch: str | None) -> tuple[str, str]:
    """The commit every trial runs: the tip of `branch` on origin (or in this clone without
    a remote), read once, when the sweep starts."""
    from pipeline.errors import ConfigError
    from stages import runs

    lim = runs.Limits()
    branch = branch or runs.current_branch(root, lim)
    if branch is None:
        raise ConfigError(f"{root}: detached HEAD: pass --branch")
    remote = runs.git_remote(root, lim)
    where = remote[0] if remote else "."
    out = runs.git(root, "ls-remote", where, f"refs/heads/{branch}", limit=lim.git,
                   what=f"git ls-remote {where}")  # fmt: skip
    if not out:
        raise ConfigError(f"branch {branch!r}: not on {where} (push it first)")
    return out.split()[0], f"{remote[0] if remote else 'clone'}/{branch}"


def _show(name: str, url: str, as_json: bool) -> None:
    from rich.table import Table

    from stages.progress import console
    from stages.sweep_flow import study_of, table

    rows = table(study_of(name, url))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table(title=f"sweep {name}: trials by val mIoU")
    for col in ("trial", "state", "val mIoU", "±", "last reported", "overrides", "experiment",
                "host", "min"):  # fmt: skip
        t.add_column(col)
    for r in rows:
        t.add_row(*("-" if v is None else str(v) for v in (
            r["trial"], r["state"], r["val_miou"], r["std"], r["last_reported"], r["overrides"],
            r["experiment"], r["host"], r["minutes"])))  # fmt: skip
    console.print(t)

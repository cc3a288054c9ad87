"""A run's results as a DVC experiment, and where they travel: an experiment of the same
commit and params reused, the outputs dvc.lock records restored into a workspace, the result
saved (`dvc exp save`) and pushed (`dvc exp push`: the ref to origin, the outputs to the DVC
remote), and the store a run's checkpoints go to while it trains."""

from __future__ import annotations

import re
import time
from pathlib import Path

from prefect import get_run_logger, task

from stages import runs, steps
from stages.dvc_stages import (
    IO_RETRIES,
    TASK_OPTS,
    StageFailed,
    dvc_command,
    dvc_env,
    dvc_error,
    since,
)


@task(name="save-experiment", **TASK_OPTS)
def save_experiment(
    root: str,
    name: str | None = None,
    limit: float = runs.Limits.dvc,
    stages: list | None = None,
    untracked: bool = False,
) -> str:
    """`dvc exp save [-n NAME] [-I FILE...] [STAGE...]`: the workspace's params, metrics and
    outputs as an experiment; returns its name. With `stages`, only theirs are committed: a
    run's workspace has no outputs of the stages it did not run (a pruned trial's evaluate),
    and DVC refuses to save a stage whose outputs are missing. `untracked` (a run's own
    workspace, never your clone): the files git neither tracks nor ignores go in too, i.e. the
    stages' `cache: false` metrics and plots, which a commit made before they existed does not
    track (`dvc exp save` leaves untracked files out)."""
    found = runs.git(root, "ls-files", "--others", "--exclude-standard", limit=limit,
                     what="git ls-files").splitlines() if untracked else []  # fmt: skip
    keep = [f for f in found if not f.startswith(".dvc/") and f != runs.LOCK_NAME]
    include = [a for f in keep for a in ("-I", f)]
    args = ["exp", "save", *(["--name", name] if name else []), *include, *(stages or [])]
    done = runs.call(
        dvc_command(*args), root, limit,
        "dvc exp save", "dvc", env=dvc_env(), check=False,
    )  # fmt: skip
    text = done.stdout + done.stderr
    if done.returncode != 0:
        raise StageFailed(f"dvc exp save: {dvc_error(text)}")
    found = re.search(r"Experiment has been saved as: (\S+)", text)
    name = found.group(1) if found else (name or "")
    get_run_logger().info("saved experiment %s (dvc exp show lists it)", name)
    return name


def remotes(root: Path) -> tuple[str, str] | None:
    """(git remote, DVC remote) when the project has both: `origin` (or the only git remote)
    and DVC's default remote (`dvc remote add -d`). None otherwise: a run then stays local."""
    remote = runs.git_remote(root, runs.Limits())
    dvc_remote = default_dvc_remote(root)
    if remote is None or dvc_remote is None:
        return None
    return remote[0], dvc_remote[0]


def default_dvc_remote(root: Path) -> tuple[str, str] | None:
    """(name, URL) of the project's default DVC remote; a local path made absolute."""
    from dvc.repo import Repo

    from pipeline import store

    with Repo(str(root)) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            return None
        url = str(repo.config["remote"][name]["url"])
    if not store.is_url(url) and not Path(url).is_absolute():
        url = str((Path(root) / ".dvc" / url).resolve())
    return name, url


@task(name="push-experiment", retries=IO_RETRIES, retry_delay_seconds=5, **TASK_OPTS)
def push_experiment(
    root: str, git_remote: str, name: str, outputs: bool = True, limit: float = runs.Limits.dvc
) -> None:
    """`dvc exp push`: the experiment's git ref to the git remote, its outputs to the DVC
    remote (`outputs`; without a DVC remote they are in the host's cache already); another
    clone gets it with `dvc exp pull`."""
    args = ["exp", "push", *([] if outputs else ["--no-cache"]), git_remote, name]
    try:
        runs.call(dvc_command(*args), root, limit, f"dvc exp push {git_remote} {name}", "dvc",
                  env=dvc_env())  # fmt: skip
    except runs.CommandFailed as exc:
        raise StageFailed(str(exc), retryable=exc.retryable) from None
    where = "and the DVC remote " if outputs else ""
    get_run_logger().info(
        "pushed experiment %s to %s %s(dvc exp pull %s %s)", name, git_remote, where,
        git_remote, name,
    )  # fmt: skip


@task(name="reuse-experiment", retries=IO_RETRIES, retry_delay_seconds=5, **TASK_OPTS)
def reuse_experiment(root: str, commit: str, limit: float = runs.Limits.git) -> str | None:
    """DVC's run cache for whole runs: when an experiment of the same commit has exactly the
    params this run has (params.yaml after its overrides), its dvc.lock and the files it
    keeps in git (metrics, plots) are checked out into the workspace, so DVC finds its
    outputs up to date and reruns only what they lack (a run that stopped at `train` leaves
    `evaluate` to this one). The newest such experiment of origin (or of the clone) counts;
    a pruned trial's never does. Returns its name, or None."""
    import yaml

    logger = get_run_logger()
    refs = f"refs/exps/{commit[:2]}/{commit[2:]}"
    runs.git(root, "fetch", "--quiet", "--no-tags", "origin", f"+{refs}/*:{refs}/*",
             limit=limit, what="git fetch origin (experiments)")  # fmt: skip
    listed = runs.git(
        root, "for-each-ref", "--sort=-committerdate", "--format=%(refname)", refs, limit=limit
    ).split()
    mine = yaml.safe_load((Path(root) / "params.yaml").read_text())
    live = steps.train_dir(steps.load(Path(root) / "params.yaml")) / "dvclive" / "metrics.json"
    for ref in listed:
        shown = runs.git(root, "show", f"{ref}:params.yaml", limit=limit, check=False)
        if not shown or yaml.safe_load(shown) != mine:
            continue
        trained = runs.git(root, "show", f"{ref}:{live}", limit=limit, check=False)
        if '"pruned"' in trained:  # a sweep's pruned trial: no finished model to reuse
            continue
        runs.git(root, "checkout", ref, "--", ".", limit=limit)
        name = ref.rsplit("/", 1)[-1]
        logger.info(
            "experiment %s of this commit has these params: its dvc.lock and metrics checked "
            "out, so DVC reruns only what its outputs lack", name,
        )  # fmt: skip
        return name
    return None


@task(name="restore-outputs", retries=IO_RETRIES, retry_delay_seconds=5, **TASK_OPTS)
def restore_outputs(root: str, from_remote: bool, limit: float = runs.Limits.dvc) -> float:
    """The outputs dvc.lock records, into a new workspace: linked from the host's cache,
    fetched from the DVC remote where the cache lacks them (`dvc pull`); what neither has,
    the stages recompute. Returns the seconds it took."""
    t0 = time.perf_counter()
    args = ["pull", "--allow-missing"] if from_remote else ["checkout", "--allow-missing"]
    try:
        runs.call(dvc_command(*args), root, limit, f"dvc {args[0]}", "dvc", env=dvc_env())
    except runs.CommandFailed as exc:
        raise StageFailed(str(exc), retryable=exc.retryable) from None
    return since(t0)


def checkpoint_store(root: Path, clone: Path, key: str, dvc_remote) -> str:
    """Where a run's checkpoints go while it trains, so that the next run of the same commit
    and overrides resumes from them on any host: `seg-runs/KEY` beside the DVC remote's
    files (the same bucket or folder), or, without a DVC remote, in the host's clone
    (`.dvc/tmp/seg/checkpoints/KEY`: another run on this host finds it)."""
    from pipeline import store

    if dvc_remote is not None:
        return str(store.join(dvc_remote[1], "seg-runs", key))
    return str(clone.resolve() / runs.SEG_DIR / "checkpoints" / key)


def store_display(where: str) -> str:
    from pipeline import store

    return store.display(where)

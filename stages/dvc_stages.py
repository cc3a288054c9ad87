"""The DVC graph, stage by stage: which stages a run plans (in graph order), what DVC says is
stale (`dvc status`), and each stale stage run as a Prefect task (`dvc repro --single-item`),
its output streamed to the run's logs, training progress read from DVCLive's files, its
failure turned into one line (`StageFailed`), and a stale DVC lock of a reused PID removed.
DVC decides what runs; these tasks only ask it and report."""

from __future__ import annotations

import contextvars
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline.errors import ConfigError, SegError
from stages import runs, steps, working_point
from stages.supervise import stop_process_tree

TASK_OPTS = {"cache_policy": NO_CACHE, "persist_result": False}

# synth and preprocess read and write data on disks and network mounts: a second try usually
# works. Training is never retried (hours of compute; a rerun resumes from last.pt).
IO_STAGES = ("synth", "preprocess")

IO_RETRIES = 2


class StageFailed(SegError):
    """A DVC stage failed; `retryable` is False for a user error or a lock held elsewhere."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


def project_root(path: Path | str = ".") -> Path:
    """The DVC project holding `path` (the folder with .dvc/ and dvc.yaml)."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Path(Repo.find_root(str(path)))
    except NotDvcRepoError:
        raise ConfigError(
            f"{Path(path).resolve()}: not in a DVC project (no .dvc/ here or above): run from "
            "the project folder (a clone of this repository)"
        ) from None


def stage_plan(root: Path, targets: Sequence[str] | None = None) -> list[str]:
    """The pipeline stages of dvc.yaml to run for `targets` (all when empty) and the stages
    they depend on, in graph order (ties in dvc.yaml order), as DVC names them
    (`preprocess@train`). Data sources (`.dvc` files) are left out: a change there shows up
    as a changed dep of the stages that read them."""
    return _plan(root, targets)[0]


def _plan(root: Path, targets: Sequence[str] | None) -> tuple[list[str], dict[str, set[str]]]:
    """stage_plan's order, and each planned stage's upstream stages (what it depends on,
    directly or not)."""
    import networkx as nx
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(root)) as repo:
        try:
            stages = [s for s in repo.index.stages if isinstance(s, PipelineStage)]
        except DvcException as exc:
            raise ConfigError(f"{root / 'dvc.yaml'}: {exc}") from None
        chosen = set(stages)
        if targets:
            chosen = set()
            for target in targets:
                try:
                    chosen.update(repo.stage.collect(target, with_deps=True))
                except DvcException:
                    valid = ", ".join(_address(root, s) for s in stages)
                    raise ConfigError(f"unknown stage {target!r}; valid: {valid}") from None
        position = {s: i for i, s in enumerate(stages)}
        # DVC's graph points from a stage to the stages it depends on: reversed, deps first
        graph = repo.index.graph.subgraph(chosen & set(stages)).reverse(copy=True)
        order = list(nx.lexicographical_topological_sort(graph, position.get))
        upstream = {
            _address(root, s): {_address(root, a) for a in nx.ancestors(graph, s)} for s in order
        }
        return [_address(root, s) for s in order], upstream


def _address(root: Path, stage) -> str:
    """The stage's name as `dvc repro` takes it in the project root (`preprocess@train`, or
    `sub/dvc.yaml:name` for a dvc.yaml in a subfolder)."""
    where = Path(stage.path).resolve().parent
    return (
        stage.name
        if where == root.resolve()
        else f"{Path(stage.path).relative_to(root)}:{stage.name}"
    )


def dvc_command(*args: str) -> list[str]:
    """`dvc ARGS` of this Python environment, waiting for DVC's repo lock rather than failing
    when another dvc holds it for a moment (`dvc status` in a shell, a lock-file update)."""
    return [sys.executable, "-m", "dvc", "--wait-for-lock", *args]


def dvc_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The stage commands (`seg ...`) resolve to this environment's `seg`, and print at once;
    `extra`: a run's own variables (its workspace's code first on PYTHONPATH, its
    checkpoint store, its provenance)."""
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra or {}))
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    return env


def stage_changes(root: Path, stage: str, limit: float = runs.Limits.lock, env=None) -> list:
    """What makes `stage` stale, from `dvc status STAGE --json` ({} when up to date). It
    waits for DVC's repo lock (another dvc in the project) at most `limit` seconds."""
    return all_changes(root, [stage], limit, env, what=f"dvc stage {stage}").get(stage, [])


def all_changes(
    root: Path, stages: list[str], limit: float = runs.Limits.lock, env=None, what: str = ""
) -> dict[str, list]:
    """`dvc status --json STAGE...` in one call: stage -> what makes it stale (absent: up to
    date)."""
    what = what or "dvc status"
    try:
        proc = runs.call(
            dvc_command("status", "--json", *stages), root, limit, "dvc status", "lock",
            env=dvc_env(env), check=False,
        )  # fmt: skip
    except runs.CommandFailed as exc:
        raise StageFailed(f"{what}: {exc}") from None
    if proc.returncode != 0:  # e.g. its outputs are busy: another dvc is running it
        raise StageFailed(f"{what}: {dvc_error(proc.stdout + proc.stderr)}")
    return json.loads(proc.stdout or "{}")


def lock_outs(root: Path, stage: str) -> list[tuple] | None:
    """(path, md5) of each output dvc.lock records for `stage` (None: none recorded)."""
    import yaml

    try:
        lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
    except OSError:
        return None
    outs = ((lock.get("stages") or {}).get(stage) or {}).get("outs")
    return [(o.get("path"), o.get("md5")) for o in outs] if outs else None


def describe_changes(changes) -> str:
    """dvc status's JSON for one stage, in a line: `changed deps: params.yaml: train modified,
    pipeline/engine/train.py modified`."""
    parts = []
    for item in changes:
        if isinstance(item, str):  # "changed command", "always changed"
            parts.append(item)
            continue
        for kind, paths in item.items():
            what = []
            for path, state in paths.items():
                if isinstance(state, dict):  # params file -> {section: state}
                    what += [f"{path}: {k} {v}" for k, v in state.items()]
                else:
                    what.append(f"{path} {state}")
            parts.append(f"{kind}: {', '.join(what)}")
    return "; ".join(parts)


_BLOCKER = re.compile(r"^\s*\(PID \d+\): ")


def dvc_error(output: str) -> str:
    """One line from a failed dvc command: seg's own `error:` line when the stage command
    failed with one, else DVC's ERROR line (with the processes that hold a busy output)."""
    lines = output.splitlines()
    for line in lines:
        if line.startswith("error: "):
            return line.removeprefix("error: ")
    for i, line in enumerate(lines):
        if line.startswith("ERROR: "):
            msg = line.removeprefix("ERROR: ")
            holders: list[str] = []  # "'x' is busy, it is being blocked by:" + its holders
            for follow in lines[i + 1 :]:
                if not _BLOCKER.match(follow):
                    break
                if follow.strip() not in holders:  # DVC repeats a holder for each path
                    holders.append(follow.strip())
            return f"{msg.rstrip(':')} {'; '.join(holders)}" if holders else msg
    tail = [line for line in lines if line.strip()]
    return tail[-1] if tail else "no output"


class TrainProgress(threading.Thread):
    """While the train stage runs, its DVCLive rows -> run logs every `every` steps.

    `seg train` writes one DVCLive row per step (outputs/train/dvclive/plots/metrics/...);
    following those files gives the Prefect logs the training curve as it happens, without a
    second channel from the training process.
    """

    def __init__(self, live_dir: Path, total: int, every: int, logger) -> None:
        super().__init__(daemon=True, name="train-progress")
        metrics = live_dir / "plots" / "metrics"
        self.files = {
            name: _TsvTail(metrics / f"{name}.tsv")
            for name in ("train/loss", "train/lr", "train/images_per_s", "val/miou")
        }
        self.total, self.every, self.logger = total, max(1, every), logger
        self.rows: dict[str, dict[int, float]] = {name: {} for name in self.files}
        self.logged = 0
        self.done = threading.Event()
        # Prefect's settings and run context live in context variables, which a new thread
        # does not inherit: without them its logs would not reach this run's API
        self.context = contextvars.copy_context()

    def run(self) -> None:
        self.context.run(self._follow)

    def _follow(self) -> None:
        while not self.done.wait(2.0):
            self.poll()
        self.poll()

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=10)

    def poll(self) -> None:
        for name, tail in self.files.items():
            if tail.restarted():  # a new run rewrote the files
                self.rows[name].clear()
                self.logged = 0 if name == "train/loss" else self.logged
            for row in tail.new_rows():
                self.rows[name][int(row["step"])] = float(row[name.rsplit("/", 1)[1]])
        loss, lr, ips = (self.rows[k] for k in ("train/loss", "train/lr", "train/images_per_s"))
        for step in sorted(s for s in loss if s > self.logged and s in lr and s in ips):
            if step == 1 or step % self.every == 0 or step == self.total:
                self.logger.info(
                    "step %d/%d  loss %.4f  lr %.2e  %.1f img/s",
                    step, self.total, loss[step], lr[step], ips[step],
                )  # fmt: skip
            self.logged = step
            if step in self.rows["val/miou"]:
                self.logger.info("step %d: val mIoU %.2f", step, 100 * self.rows["val/miou"][step])


class _TsvTail:
    """The complete rows appended to a TSV file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.header, self.inode = path, 0, None, None

    def restarted(self) -> bool:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False
        if self.inode is not None and (st.st_ino != self.inode or st.st_size < self.offset):
            self.offset, self.header, self.inode = 0, None, st.st_ino
            return True
        self.inode = st.st_ino
        return False

    def new_rows(self) -> list[dict[str, str]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        complete = chunk[: chunk.rfind("\n") + 1]
        self.offset += len(complete.encode("utf-8"))
        rows = []
        for line in complete.splitlines():
            cells = line.split("\t")
            if self.header is None:
                self.header = cells
            elif len(cells) == len(self.header):
                rows.append(dict(zip(self.header, cells, strict=True)))
        return rows


def run_dvc_stage(
    root: Path,
    stage: str,
    logger,
    notes: list[str] | None = None,
    limit: float = runs.Limits.stage,
    env: dict[str, str] | None = None,
) -> tuple[str, float]:
    """`dvc repro --single-item STAGE`, its output streamed to `logger`. Returns how it went
    ("ran" or "restored from the run cache") and the seconds it took; `notes` collects the
    lines that say how training started (resumed from where, a new run and why, a damaged
    checkpoint set aside) for the run's stage table. Past `limit` seconds the stage's
    processes are stopped and the stage fails, naming the limit."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        dvc_command("repro", "--single-item", stage), cwd=root, env=dvc_env(env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
    )  # fmt: skip
    lines: list[str] = []
    assert proc.stdout is not None
    timer = threading.Timer(limit, stop_process_tree, args=(proc.pid,))
    timer.daemon = True
    timer.start()
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if line.strip():
                lines.append(line)
                logger.info("%s", line)
                if notes is not None and steps.is_train_note(line):
                    notes.append(line.strip())
        code = proc.wait()
    except BaseException:  # cancelled, crashed, its worker gone: the stage goes with the run
        stop_process_tree(proc.pid)
        raise
    finally:
        timer.cancel()
    seconds = time.perf_counter() - t0
    text = "\n".join(lines)
    if code != 0 and seconds >= limit:
        raise StageFailed(
            f"dvc stage {stage}: no result within {limit:g} s (the run's stage limit; "
            "`seg deploy --limit stage=SECONDS` sets it)"
        )
    pruned = next((line for line in lines if line.startswith("pruned at step ")), None)
    if code != 0 and pruned:  # a sweep's trial stopped early: not a failure
        if notes is not None:
            notes.append(pruned)
        return "pruned", seconds
    if code != 0:
        user_error = any(line.startswith("error: ") for line in lines)
        busy = "is busy, it is being blocked by" in text or "Unable to acquire lock" in text
        raise StageFailed(
            f"dvc stage {stage}: {dvc_error(text)}", retryable=not (user_error or busy)
        )
    cached = f"Stage '{stage}' is cached - skipping run" in text
    return ("restored from the run cache" if cached else "ran"), seconds


def retry_stage(_task, _task_run, state) -> bool:
    """Retry a failed I/O stage, but not a user error or a lock held by another process."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, StageFailed) and exc.retryable


@task(name="dvc-stage", task_run_name="{stage}", retries=0, **TASK_OPTS)
def dvc_stage(
    root: str,
    stage: str,
    log_every: int = 50,
    limits: dict | None = None,
    env: dict[str, str] | None = None,
    changes: list | None = None,
) -> dict:
    """Run one DVC stage if, and only if, DVC says it is stale (`changes`: what `dvc status`
    said of it when nothing it depends on has run since; None: ask now)."""
    logger = get_run_logger()
    lim = runs.Limits.parse(limits)
    t0 = time.perf_counter()
    if changes is None:
        changes = stage_changes(Path(root), stage, lim.lock, env)
    if not changes:
        logger.info("%s: up to date, skipped (dvc status)", stage)
        return {"stage": stage, "result": "up to date", "why": "", "seconds": since(t0)}
    why = describe_changes(changes)
    always = changes == ["always changed"]  # the working_point stage
    before = lock_outs(Path(root), stage) if always else None
    if always and stage == working_point.STAGE:
        p = steps.load(Path(root) / "params.yaml")
        if working_point.is_current(root, p, before):  # asked here: no dvc, no seg process
            logger.info("%s: this machine's working point is the one dvc.lock records", stage)
            return {"stage": stage, "result": "up to date", "seconds": since(t0),
                    "why": "always changed: this machine's working point is dvc.lock's"}  # fmt: skip
    logger.info("%s: %s; running `dvc repro --single-item %s`", stage, why, stage)
    progress, notes = None, []
    if stage == "train":
        p = steps.load(Path(root) / "params.yaml")
        live = Path(root) / steps.train_dir(p) / "dvclive"
        progress = TrainProgress(live, p.train.iterations, log_every, logger)
        progress.start()
    try:
        result, _ = run_dvc_stage(Path(root), stage, logger, notes, lim.stage, env)
    finally:
        if progress is not None:
            progress.stop()
    if before and lock_outs(Path(root), stage) == before:  # it changed nothing downstream
        result, why = "up to date", f"{why}: ran, its outputs are the same"
    logger.info("%s: %s in %.1f s", stage, result, since(t0))
    return {
        "stage": stage, "result": result, "why": why, "seconds": since(t0), "notes": notes
    }  # fmt: skip


def since(t0: float) -> float:
    return round(time.perf_counter() - t0, 2)


@task(name="set-params", **TASK_OPTS)
def set_params(root: str, overrides: list[str]) -> None:
    """Write the overrides into params.yaml, as `dvc exp run -S` does (DVC's own function,
    so the file keeps its layout), atomically."""
    import shutil

    from dvc.utils.hydra import apply_overrides

    from pipeline.atomic import atomic_path

    params = Path(root) / "params.yaml"
    with atomic_path(params, suffix=".yaml") as tmp:
        shutil.copy(params, tmp)
        apply_overrides(tmp, list(overrides))
    get_run_logger().info("params.yaml: %s", ", ".join(overrides))


def release_stale_locks(root: Path) -> list[str]:
    """Entries of DVC's rwlock (.dvc/tmp/rwlock: which process holds which outputs) whose PID
    now belongs to another process: DVC counts a holder alive while its PID exists, so after
    a reboot (or a long uptime) a reused PID blocks every run of the project for good. An
    entry is stale when the process with that PID started after the lock file was last
    written, or runs another command than the one recorded. Removed under DVC's own lock;
    returns a line for each."""
    import psutil
    from dvc.fs import localfs
    from dvc.rwlock import _edit_rwlock

    tmp = root / ".dvc" / "tmp"
    path = tmp / "rwlock"
    if not path.is_file():
        return []
    written = path.stat().st_mtime

    def stale(info: dict) -> str | None:
        try:
            proc = psutil.Process(int(info["pid"]))
            started, cmdline = proc.create_time(), proc.cmdline()
        except (psutil.Error, ValueError):
            return None  # gone: DVC removes those itself
        args = str(info["cmd"]).split()[1:]
        if started > written + 1:
            return "started after the lock was taken"
        if args and cmdline[-len(args) :] != args:
            return f"now runs {' '.join(cmdline)[:80]!r}"
        return None

    notes: list[str] = []
    with _edit_rwlock(str(tmp), localfs, False) as lock:
        for mode in ("write", "read"):
            for out, held in list(lock[mode].items()):
                infos = held if isinstance(held, list) else [held]
                keep = []
                for info in infos:
                    why = stale(info)
                    if why is None:
                        keep.append(info)
                    else:
                        notes.append(
                            f"DVC's lock on {out} named PID {info['pid']} ({info['cmd']}), a "
                            f"process that is gone: the PID {why}; entry removed"
                        )
                if mode == "write" and not keep:
                    del lock[mode][out]
                elif mode == "read":
                    lock[mode][out] = keep
    return notes

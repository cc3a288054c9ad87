"""The DVC graph as a Prefect flow: DVC decides what runs, Prefect schedules, retries, logs it.

`seg-pipeline` runs the stages of dvc.yaml in graph order, one task per stage. Each task asks
DVC whether its stage is stale (`dvc status STAGE`) and, only then, runs it
(`dvc repro --single-item STAGE`): a run with nothing changed finishes in seconds with every
stage reported up to date, a changed param reruns exactly the stale stages, and every result
lands in dvc.lock, so `dvc status` and `dvc repro` know about it. The stage commands are the
`seg` commands in dvc.yaml, so the flow, `dvc repro` and `seg` reach the same code.

Locking: DVC's own locks keep two writers off the same outputs (a manual `dvc repro` while a
flow trains fails at once, saying which process holds the outputs, and so does the flow in
the other case); a deployment has a concurrency limit of 1, so two scheduled runs never
overlap (`collision`: skip cancels the newcomer, queue makes it wait). DVC owns caching too:
no Prefect result caching (`cache_policy=NO_CACHE, persist_result=False`).

With overrides (`-S train.lr=0.02`) a run is an experiment, as with `dvc exp run -S`: the
overrides are written into params.yaml (DVC's own function for that), the stale stages run,
and the result is saved with `dvc exp save`, so it shows up in `dvc exp show`.

Beyond one machine: when the project has a git remote and a default DVC remote (several
hosts share them, each a clone with a worker on one work pool), a run starts from what was
last pushed (a clean clone behind its upstream is fast-forwarded and `dvc pull`s the outputs
of the new dvc.lock; its log names the checkpoint it starts from), and every run that ran a
stage is saved as an experiment and pushed (`dvc exp push`: the git ref to the git remote,
its outputs to the DVC remote), so `dvc exp pull` + `dvc exp show` on any clone lists the
runs of all hosts. Without both remotes nothing of this happens.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipeline.errors import ConfigError, SegError
from stages import steps
from stages.progress import pct

_NO_CACHE = {"cache_policy": NO_CACHE, "persist_result": False}
# synth and preprocess read and write data on disks and network mounts: a second try usually
# works. Training is never retried (hours of compute; a rerun resumes from last.pt).
IO_STAGES = ("synth", "preprocess")
IO_RETRIES = 2
# collision strategies of a deployment's concurrency limit of 1, by the name users pick
COLLISIONS = ("skip", "queue")
# Without PREFECT_API_URL, Prefect starts a temporary server and waits 20 s for it
# (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); its first start creates and migrates a
# database, which took 30-37 s on a busy 2-core machine
EPHEMERAL_STARTUP_S = 120


class ServerUnreachable(SegError):
    """PREFECT_API_URL is set, but no Prefect API answers there."""


class StageFailed(SegError):
    """A DVC stage failed; `retryable` is False for a user error or a lock held elsewhere."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


# ----------------------------------------------------------------------------- server check


def check_server(timeout: float = 5.0) -> str | None:
    """The Prefect API URL when one is set and answers, None in ephemeral mode.

    Raises ServerUnreachable in one line before any work starts, instead of Prefect's retries
    and traceback once the first flow run is being created.
    """
    import httpx
    from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return None
    key = PREFECT_API_KEY.value()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    hint = "start one with `prefect server start --host 127.0.0.1`, or unset PREFECT_API_URL"
    try:
        r = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout, headers=headers)
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        raise ServerUnreachable(
            f"Prefect API at {url} is unreachable ({reason}): {hint} to run without a server"
        ) from None
    if r.status_code >= 400 and r.status_code not in (401, 403):
        raise ServerUnreachable(
            f"{url}/health answered HTTP {r.status_code}: not a Prefect API "
            "(PREFECT_API_URL usually ends in /api, e.g. http://127.0.0.1:4200/api)"
        )
    return url


@contextmanager
def ephemeral_startup(seconds: int = EPHEMERAL_STARTUP_S) -> Iterator[None]:
    """Give Prefect's ephemeral server at least `seconds` to start (a higher setting stays):
    in this context, and in the environment, which Prefect's worker threads and the runs'
    processes read."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as timeout
    from prefect.settings import temporary_settings

    value = max(timeout.value(), seconds)
    before = os.environ.get(timeout.name)
    os.environ[timeout.name] = str(value)
    try:
        with temporary_settings(updates={timeout: value}):
            yield
    finally:
        if before is None:
            os.environ.pop(timeout.name, None)
        else:
            os.environ[timeout.name] = before


# ----------------------------------------------------------------------------- the DVC side


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
        order = nx.lexicographical_topological_sort(graph, position.get)
        return [_address(root, s) for s in order]


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


def dvc_env() -> dict[str, str]:
    """The stage commands (`seg ...`) resolve to this environment's `seg`, and print at once."""
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    return env


def stage_changes(root: Path, stage: str) -> list:
    """What makes `stage` stale, from `dvc status STAGE --json` ({} when up to date)."""
    proc = subprocess.run(
        dvc_command("status", "--json", stage), cwd=root, env=dvc_env(),
        capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:  # e.g. its outputs are busy: another dvc is running it
        raise StageFailed(f"dvc stage {stage}: {_dvc_error(proc.stdout + proc.stderr)}")
    return json.loads(proc.stdout or "{}").get(stage, [])


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


def _dvc_error(output: str) -> str:
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
    root: Path, stage: str, logger, notes: list[str] | None = None
) -> tuple[str, float]:
    """`dvc repro --single-item STAGE`, its output streamed to `logger`. Returns how it went
    ("ran" or "restored from the run cache") and the seconds it took; `notes` collects the
    lines that say how training started (resumed from where, a new run and why, a damaged
    checkpoint set aside) for the run's stage table."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        dvc_command("repro", "--single-item", stage), cwd=root, env=dvc_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
    )  # fmt: skip
    lines: list[str] = []
    assert proc.stdout is not None
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
    seconds = time.perf_counter() - t0
    text = "\n".join(lines)
    if code != 0:
        user_error = any(line.startswith("error: ") for line in lines)
        busy = "is busy, it is being blocked by" in text or "Unable to acquire lock" in text
        raise StageFailed(
            f"dvc stage {stage}: {_dvc_error(text)}", retryable=not (user_error or busy)
        )
    cached = f"Stage '{stage}' is cached - skipping run" in text
    return ("restored from the run cache" if cached else "ran"), seconds


def stop_process_tree(pid: int, grace: float = 10.0) -> None:
    """SIGTERM a process and its descendants (dvc, the stage's `seg`, its DataLoader
    workers), SIGKILL what is left after `grace` seconds. A training stopped so keeps its
    last checkpoint (written atomically) and the next run resumes from it."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)


class ParentWatch(threading.Thread):
    """A run that a worker or `seg serve` started ends when that process dies.

    The process worker starts each flow run in a session of its own, so a worker killed
    with SIGKILL (OOM killer, `kill -9`, a crashed service manager) leaves the run going as
    an orphan that no worker supervises or can cancel. This thread notices the parent is
    gone (the run was re-parented) and sends the run SIGTERM: Prefect's handler turns that
    into a crash (state Crashed, "Execution was aborted by a termination signal"), the
    running stage's processes are stopped (`stop_process_tree`), and the next run resumes
    from last.pt. When the whole machine dies, nothing is left to report: the deployment's
    heartbeat automation (`crash_silent_runs`) marks the run Crashed instead.
    """

    def __init__(self, logger, every: float = 2.0) -> None:
        super().__init__(daemon=True, name="parent-watch")
        self.parent, self.logger, self.every = os.getppid(), logger, every
        self.done = threading.Event()
        self.context = contextvars.copy_context()  # the run's logger works in this thread

    @classmethod
    def start_if_supervised(cls, logger) -> ParentWatch | None:
        """Watch the parent of a run started by a worker or a runner (they set
        PREFECT__FLOW_RUN_ID in its environment); not `seg flow`, which runs in-process."""
        if not os.environ.get("PREFECT__FLOW_RUN_ID") or os.getppid() <= 1:
            return None
        watch = cls(logger)
        watch.start()
        return watch

    def run(self) -> None:
        self.context.run(self._watch)

    def _watch(self) -> None:
        while not self.done.wait(self.every):
            if os.getppid() == self.parent:
                continue
            # The worker held the read end of this process's stdout and stderr: a write
            # there now fails, and rich (Prefect's console log handler) turns that into
            # SystemExit in whichever thread logs. Point both at /dev/null first; the run's
            # logs still reach the API.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.close(devnull)
            # to the main thread: it sits in a blocking read of the stage's output, which
            # only a signal delivered to that thread interrupts
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
            with contextlib.suppress(Exception):
                self.logger.error(
                    "the worker that started this run (PID %d) is gone: ending the run; the "
                    "next run resumes from the last checkpoint",
                    self.parent,
                )
            return

    def stop(self) -> None:
        self.done.set()


# Runs of our deployments send a heartbeat every HEARTBEAT_S seconds (Prefect's minimum; its
# default is 180); a run that sends none, nor a final state, for CRASH_AFTER_S is marked
# Crashed by an automation on the server (`crash_silent_runs`): a worker's machine that died
# leaves no process to say so. Three heartbeats: a busy machine may delay one.
HEARTBEAT_S = 30
CRASH_AFTER_S = 90


def crash_silent_runs(deployment_id, deployment_name: str) -> str:
    """Create (or replace) the automation that marks a run of this deployment Crashed when
    its heartbeats stop (Prefect's documented zombie-run detection: a proactive trigger on
    `prefect.flow-run.heartbeat`). Returns the automation's name."""
    from datetime import timedelta

    from prefect.automations import (
        AutomationCore,
        ChangeFlowRunState,
        EventTrigger,
        Posture,
        ResourceSpecification,
    )
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    name = f"{deployment_name}: crash runs without heartbeats"
    automation = AutomationCore(
        name=name,
        description=(
            f"A run of deployment {deployment_name} that sends no heartbeat (every "
            f"{HEARTBEAT_S} s) and no final state for {CRASH_AFTER_S} s died with its "
            "machine or worker: mark it Crashed (made by `seg deploy` / `seg serve`)"
        ),
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },  # fmt: skip
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification(
                {
                    "prefect.resource.role": "deployment",
                    "prefect.resource.id": [f"prefect.deployment.{deployment_id}"],
                }
            ),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=CRASH_AFTER_S),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {CRASH_AFTER_S} s: its worker or machine died",
            )
        ],
    )
    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(name):
            client.delete_automation(old.id)
        client.create_automation(automation)
    return name


# ----------------------------------------------------------------------------- tasks


def _retry_stage(_task, _task_run, state) -> bool:
    """Retry a failed I/O stage, but not a user error or a lock held by another process."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, StageFailed) and exc.retryable


@task(name="dvc-stage", task_run_name="{stage}", retries=0, **_NO_CACHE)
def dvc_stage(root: str, stage: str, log_every: int = 50) -> dict:
    """Run one DVC stage if, and only if, DVC says it is stale."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    changes = stage_changes(Path(root), stage)
    if not changes:
        logger.info("%s: up to date, skipped (dvc status)", stage)
        return {"stage": stage, "result": "up to date", "why": "", "seconds": _since(t0)}
    why = describe_changes(changes)
    logger.info("%s: %s; running `dvc repro --single-item %s`", stage, why, stage)
    progress, notes = None, []
    if stage == "train":
        p = steps.load(Path(root) / "params.yaml")
        live = Path(root) / steps.train_dir(p) / "dvclive"
        progress = TrainProgress(live, p.train.iterations, log_every, logger)
        progress.start()
    try:
        result, _ = run_dvc_stage(Path(root), stage, logger, notes)
    finally:
        if progress is not None:
            progress.stop()
    logger.info("%s: %s in %.1f s", stage, result, _since(t0))
    return {
        "stage": stage, "result": result, "why": why, "seconds": _since(t0), "notes": notes
    }  # fmt: skip


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 2)


@task(name="set-params", **_NO_CACHE)
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


@task(name="save-experiment", **_NO_CACHE)
def save_experiment(root: str) -> str:
    """`dvc exp save`: the workspace's params, metrics and outputs as an experiment."""
    proc = subprocess.run(
        dvc_command("exp", "save"), cwd=root, env=dvc_env(), capture_output=True, text=True
    )
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise StageFailed(f"dvc exp save: {_dvc_error(text)}")
    found = re.search(r"Experiment has been saved as: (\S+)", text)
    name = found.group(1) if found else ""
    get_run_logger().info("saved experiment %s (dvc exp show lists it)", name)
    return name


# ----------------------------------------------------------------------------- remotes


def remotes(root: Path) -> tuple[str, str] | None:
    """(git remote, DVC remote) when the project has both: `origin` (or the only git remote)
    and DVC's default remote (`dvc remote add -d`). None otherwise: a run then stays local."""
    from dvc.repo import Repo

    proc = _git(root, "remote")
    names = proc.stdout.split() if proc.returncode == 0 else []
    if not names:
        return None
    with Repo(str(root)) as repo:
        dvc_remote = repo.config["core"].get("remote")
    if not dvc_remote:
        return None
    return ("origin" if "origin" in names else names[0]), dvc_remote


def _git(root: Path | str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def _checked(proc: subprocess.CompletedProcess, what: str) -> str:
    if proc.returncode != 0:
        raise StageFailed(f"{what}: {_dvc_error(proc.stdout + proc.stderr)}", retryable=True)
    return proc.stdout.strip()


def checkpoint_note(root: Path) -> str:
    """Which checkpoint the train stage would continue: its step (DVCLive's last row) and
    md5, and whether dvc.lock records it (pushed with its commit) or it is local only."""
    import hashlib

    import yaml

    p = steps.load(root / "params.yaml")
    last = steps.train_dir(p) / "last.pt"
    if not (root / last).is_file():
        return f"{last}: none yet (training starts a new run)"
    md5 = hashlib.md5((root / last).read_bytes()).hexdigest()
    step = "?"
    live = root / steps.train_dir(p) / "dvclive" / "metrics.json"
    if live.is_file():
        step = json.loads(live.read_text()).get("step", "?")
    recorded = None
    if (root / "dvc.lock").is_file():
        lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
        for o in (lock.get("stages", {}).get("train") or {}).get("outs", []):
            if o.get("path") == str(last):
                recorded = o.get("md5")
    where = "as dvc.lock records it" if recorded == md5 else "local, not in dvc.lock"
    return f"{last} at step {step} of {p.train.iterations}, md5 {md5} ({where})"


@task(name="start-from-remotes", **_NO_CACHE)
def start_from_remotes(root: str, git_remote: str) -> dict:
    """Start from what was last pushed: fetch the git remote; a clean workspace behind its
    upstream is fast-forwarded and pulls the outputs of the new dvc.lock (`dvc pull`). Local
    changes are never overwritten: the run then goes on from them, and says so."""
    logger = get_run_logger()
    _checked(_git(root, "fetch", "--quiet", git_remote), f"git fetch {git_remote}")
    head = _checked(_git(root, "rev-parse", "--short", "HEAD"), "git rev-parse")
    upstream_proc = _git(root, "rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{u}")
    upstream = upstream_proc.stdout.strip() if upstream_proc.returncode == 0 else None
    behind = 0
    if upstream:
        behind = int(_checked(_git(root, "rev-list", "--count", "HEAD..@{u}"), "git rev-list"))
    dirty = _checked(_git(root, "status", "--porcelain", "--untracked-files=no"), "git status")
    if not upstream:
        logger.info("at %s; the branch has no upstream on %s: nothing to update", head, git_remote)
    elif behind and dirty:
        files = ", ".join(line[3:] for line in dirty.splitlines())
        logger.warning(
            "%d commit(s) behind %s, but local changes (%s): going on from the local state",
            behind, upstream, files,
        )  # fmt: skip
    elif behind:
        _checked(_git(root, "merge", "--ff-only", "--quiet", "@{u}"), "git merge --ff-only")
        new = _checked(_git(root, "rev-parse", "--short", "HEAD"), "git rev-parse")
        proc = subprocess.run(
            dvc_command("pull", "--allow-missing"), cwd=root, env=dvc_env(),
            capture_output=True, text=True,
        )  # fmt: skip
        _checked(proc, "dvc pull")
        logger.info("updated %s -> %s (%s) and pulled its outputs (dvc pull)", head, new, upstream)
        head = new
    else:
        logger.info("at %s, up to date with %s", head, upstream)
    note = checkpoint_note(Path(root))
    logger.info("starting from %s", note)
    return {"revision": head, "checkpoint": note}


@task(name="push-experiment", retries=IO_RETRIES, retry_delay_seconds=5, **_NO_CACHE)
def push_experiment(root: str, git_remote: str, name: str) -> None:
    """`dvc exp push`: the experiment's git ref to the git remote, its outputs to the DVC
    remote; another clone gets it with `dvc exp pull`."""
    proc = subprocess.run(
        dvc_command("exp", "push", git_remote, name), cwd=root, env=dvc_env(),
        capture_output=True, text=True,
    )  # fmt: skip
    _checked(proc, f"dvc exp push {git_remote} {name}")
    get_run_logger().info(
        "pushed experiment %s to %s and the DVC remote (dvc exp pull %s %s)",
        name, git_remote, git_remote, name,
    )  # fmt: skip


@task(name="publish-metrics", **_NO_CACHE)
def publish_metrics(root: str, evaluated: bool) -> dict:
    """metrics.json -> a per-class IoU table and a markdown summary in the Prefect UI."""
    p = steps.load(Path(root) / "params.yaml")
    metrics_json = str(steps.eval_dir(p) / "metrics.json")
    m = json.loads((Path(root) / metrics_json).read_text())
    create_table_artifact(
        table=[
            {
                "class": name,
                "iou": _round(iou),
                "precision": _round(m["per_class_precision"].get(name)),
                "recall": _round(m["per_class_recall"].get(name)),
            }
            for name, iou in m["per_class_iou"].items()
        ],
        key="per-class-iou",
        description=f"Per-class IoU on the val shards (None: class absent); from {metrics_json}",
    )
    note = "evaluated in this run" if evaluated else "up to date: from an earlier run (dvc.lock)"
    create_markdown_artifact(
        markdown=summary_markdown(m, metrics_json, note),
        key="evaluation-summary",
        description="mIoU, pixel accuracy and provenance of the current evaluation",
    )
    return {"miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"], "metrics": metrics_json}


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


def summary_markdown(m: dict, metrics_json: str, note: str = "") -> str:
    prov = m.get("provenance", {})
    git = prov.get("git") or {}
    data = prov.get("data") or {}
    ckpt = prov.get("checkpoint") or {}
    dirty = {True: " (dirty)", False: "", None: " (unknown)"}[git.get("dirty")]
    lines = [
        f"# Evaluation: mIoU {pct(m['miou'])}",
        "",
        *([f"_{note}_", ""] if note else []),
        "| metric | value |",
        "| --- | --- |",
        f"| mIoU (%) | {pct(m['miou'])} |",
        f"| pixel accuracy (%) | {pct(m['pixel_accuracy'])} |",
        f"| mean accuracy (%) | {pct(m.get('mean_accuracy'))} |",
        f"| images | {m.get('num_images', '-')} |",
        "",
        "## Provenance",
        "",
        f"- git revision: `{git.get('revision') or 'unknown'}`{dirty}",
        f"- params hash: `{prov.get('params_hash')}`",
        f"- train params hash: `{prov.get('train_params_hash')}`",
        f"- data: `{data.get('path')}` sha256 `{data.get('sha256')}`"
        + (f", dvc md5 `{data['dvc_md5']}`" if data.get("dvc_md5") else ""),
        f"- checkpoint: `{ckpt.get('path')}` (step {ckpt.get('step')}) sha256 `{ckpt.get('sha256')}`",
        f"- time: {prov.get('time')}",
        f"- metrics file: `{metrics_json}`",
    ]
    return "\n".join(lines) + "\n"


def stages_markdown(results: list[dict], planned: list[str], failed: str | None = None) -> str:
    """The run's stage table: what DVC ran, what was up to date, and why."""
    done = {r["stage"]: r for r in results}
    ran = sum(r["result"] != "up to date" for r in results)
    lines = [
        f"# DVC stages: {ran} ran, {len(results) - ran} up to date"
        + (f", failed at {failed}" if failed else ""),
        "",
        "| stage | result | why | seconds | notes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for stage in planned:
        r = done.get(stage)
        if r is not None:
            notes = "<br>".join(n.replace("|", "\\|") for n in r.get("notes") or []) or "-"
            lines.append(
                f"| {stage} | {r['result']} | {r['why'] or '-'} | {r['seconds']:.1f} | {notes} |"
            )
        else:
            lines.append(f"| {stage} | {'failed' if stage == failed else 'not run'} | - | - | - |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the flow


@flow(name="seg-pipeline", persist_result=False)
def pipeline_flow(
    targets: list[str] | None = None,
    overrides: list[str] | None = None,
    log_every: int = 50,
) -> dict:
    """Run the stale stages of dvc.yaml up to `targets` (default: all), one task per stage.

    `overrides` (`section.key=value`) make the run an experiment (`dvc exp save`)."""
    logger = get_run_logger()
    watch = ParentWatch.start_if_supervised(logger)
    try:
        return _pipeline(targets, overrides, log_every, logger)
    finally:
        if watch is not None:
            watch.stop()


def _pipeline(targets, overrides, log_every: int, logger) -> dict:
    root = project_root()
    steps.load(root / "params.yaml", overrides)  # a bad override fails here, before any work
    planned = stage_plan(root, targets)
    logger.info("project %s; stages in order: %s", root, ", ".join(planned))
    team = remotes(root)  # (git remote, DVC remote): runs travel between hosts
    if team:
        start_from_remotes(str(root), team[0])
    if overrides:
        set_params(str(root), overrides)
    results: list[dict] = []
    try:
        for stage in planned:
            retrying = stage.split("@")[0] in IO_STAGES
            run = dvc_stage.with_options(
                retries=IO_RETRIES if retrying else 0,
                retry_delay_seconds=5,
                retry_condition_fn=_retry_stage,
            )
            results.append(run(str(root), stage, log_every))
    finally:
        failed = next((s for s in planned if s not in {r["stage"] for r in results}), None)
        create_markdown_artifact(
            markdown=stages_markdown(results, planned, failed),
            key="dvc-stages",
            description="Each DVC stage of this run: ran or up to date, and why",
        )
    out: dict = {"stages": {r["stage"]: r["result"] for r in results}}
    ran = [r["stage"] for r in results if r["result"] != "up to date"]
    if (overrides or team) and ran:
        out["experiment"] = save_experiment(str(root))
        if team:
            push_experiment(str(root), team[0], out["experiment"])
    if "evaluate" in planned:
        out.update(publish_metrics(str(root), evaluated="evaluate" in ran))
    return out


# ----------------------------------------------------------------------------- deployments


def _schedule(cron: str, timezone: str | None):
    from prefect.client.schemas.schedules import CronSchedule

    try:
        return CronSchedule(cron=cron, timezone=timezone)  # validated: one-line errors
    except ValueError as exc:
        msg = exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc)  # pydantic's
        msg = msg.removeprefix("Value error, ")
        raise ConfigError(f"--cron {cron!r} --timezone {timezone!r}: {msg}") from None


def concurrency(collision: str = "skip"):
    """At most one run of the deployment at a time. `skip`: a run due while another is still
    running is cancelled ("Deployment concurrency limit reached."); the next scheduled run
    catches up, and DVC reruns whatever became stale. `queue`: it waits for the slot
    (AwaitingConcurrencySlot) and runs after, usually finding everything up to date."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    strategies = {
        "skip": ConcurrencyLimitStrategy.CANCEL_NEW,
        "queue": ConcurrencyLimitStrategy.ENQUEUE,
    }
    if collision not in strategies:
        raise ConfigError(f"--collision {collision!r}: valid: {', '.join(COLLISIONS)}")
    return ConcurrencyLimitConfig(limit=1, collision_strategy=strategies[collision])


def _deployment_kwargs(cron, timezone, overrides, collision) -> dict:
    from prefect.types.entrypoint import EntrypointType

    return {
        "schedules": [_schedule(cron, timezone)],
        "concurrency_limit": concurrency(collision),
        "parameters": {"overrides": list(overrides or [])},
        "description": "The DVC graph on a schedule: stale stages run, the rest are skipped.",
        "tags": ["seg"],
        # `stages.flows.pipeline_flow` imports from the installed package in any project
        # folder; the run's working directory is the project (dvc.yaml, params.yaml)
        "entrypoint_type": EntrypointType.MODULE_PATH,
    }


def deployment(
    name: str = "nightly",
    cron: str = "0 3 * * *",
    timezone: str | None = None,
    overrides: list[str] | None = None,
    collision: str = "skip",
):
    """The pipeline flow as a deployment on a cron schedule (what `seg serve` serves); its
    runs execute in the serving process's working directory."""
    return pipeline_flow.to_deployment(
        name, **_deployment_kwargs(cron, timezone, overrides, collision)
    )


def workdir_variable(workdir: Path | str) -> str | None:
    """`$NAME` (an environment variable each worker sets to its clone) -> NAME, else None."""
    text = str(workdir)
    if not text.startswith("$"):
        return None
    name = text[1:].strip("{}")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ConfigError(f"--workdir {text!r}: expected $NAME, an environment variable name")
    return name


def deploy(
    pool: str,
    name: str = "nightly",
    cron: str = "0 3 * * *",
    timezone: str | None = None,
    overrides: list[str] | None = None,
    collision: str = "skip",
    workdir: Path | str = ".",
):
    """Register the deployment on work pool `pool`: its runs execute on the pool's workers
    (`prefect worker start --pool POOL`), in `workdir` on the worker's machine (a clone of
    the project with this package installed). `workdir` `$NAME`: wherever the environment
    variable NAME points on the worker that picks the run up (clones at different paths: a
    pull step `set_working_directory` to `{{ $NAME }}`, resolved by each worker's flow-run
    process). Returns the deployment id."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            raise ConfigError(
                f"work pool {pool!r} not found: create it with "
                f"`prefect work-pool create {pool} --type process`"
            ) from None
    # `flow.deploy` would also list the pool's workers, a request this server version
    # rejects (422 on the client's null limit); registering the deployment is all it needs
    variable = workdir_variable(workdir)
    job_variables = {"env": heartbeat_env()}  # runs send heartbeats (crash_silent_runs)
    if not variable:
        job_variables["working_dir"] = str(workdir)
    deployment = pipeline_flow.to_deployment(
        name, work_pool_name=pool, job_variables=job_variables,
        **_deployment_kwargs(cron, timezone, overrides, collision),
    )  # fmt: skip
    deployment_id = deployment.apply(work_pool_name=pool)
    if variable:
        step = {"prefect.deployments.steps.set_working_directory": {
            "directory": "{{ $" + variable + " }}"}}  # fmt: skip
        with get_client(sync_client=True) as client:
            client.update_deployment(deployment_id, DeploymentUpdate(pull_steps=[step]))
    crash_silent_runs(deployment_id, f"{pipeline_flow.name}/{name}")
    return deployment_id


def heartbeat_env() -> dict[str, str]:
    """The environment that makes a run send heartbeats every HEARTBEAT_S seconds."""
    return {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}

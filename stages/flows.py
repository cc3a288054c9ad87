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
from stages import runs, steps
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
    """The Prefect API URL when one is set and answers, None in ephemeral mode. The URL is
    returned for display: without user info or query (`api_display`).

    Raises ServerUnreachable in one line before any work starts, instead of Prefect's retries
    and traceback once the first flow run is being created: no server there, not a Prefect
    API, or credentials it refuses. `/health` answers without authentication, so the
    credentials are tried on an endpoint that needs them (`/admin/version`), the way Prefect's
    client sends them (PREFECT_API_AUTH_STRING, PREFECT_API_KEY, or user:password in the URL).
    """
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return None
    shown = api_display(url)
    hint = "start one with `prefect server start --host 127.0.0.1`, or unset PREFECT_API_URL"
    base = url.rstrip("/")
    try:
        r = httpx.get(f"{base}/health", timeout=timeout)
        if r.status_code < 400:
            r = httpx.get(f"{base}/admin/version", timeout=timeout, headers=_auth_headers())
    except httpx.HTTPError as exc:
        reason = api_display(str(exc)) if "://" in str(exc) else str(exc)
        raise ServerUnreachable(
            f"Prefect API at {shown} is unreachable ({reason or type(exc).__name__}): {hint} to "
            "run without a server"
        ) from None
    if r.status_code in (401, 403):
        raise ServerUnreachable(
            f"Prefect API at {shown} refused the credentials (HTTP {r.status_code}): set "
            "PREFECT_API_AUTH_STRING=user:password (a server with PREFECT_SERVER_API_AUTH_STRING) "
            "or PREFECT_API_KEY (Prefect Cloud)"
        )
    if r.status_code >= 400:
        raise ServerUnreachable(
            f"{shown}/health answered HTTP {r.status_code}: not a Prefect API "
            "(PREFECT_API_URL usually ends in /api, e.g. http://127.0.0.1:4200/api)"
        )
    return shown


def _auth_headers() -> dict[str, str]:
    """The Authorization header Prefect's client sends (its auth string first, else its API
    key); none: httpx takes user:password from the URL, as Prefect's client does."""
    import base64

    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY

    auth, key = PREFECT_API_AUTH_STRING.value(), PREFECT_API_KEY.value()
    if auth:
        return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}
    return {"Authorization": f"Bearer {key}"} if key else {}


def api_display(url: str) -> str:
    """A URL as it may be printed: no user:password, no query (pipeline.store.display)."""
    from pipeline.store import display

    return display(url)


def ui_url() -> str | None:
    """The UI's URL for "View at ..." lines: Prefect builds it from PREFECT_API_URL, user and
    password included; this one is without them (None without a server, or when the user
    set PREFECT_UI_URL)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    url = PREFECT_API_URL.value()
    if not url or os.environ.get(PREFECT_UI_URL.name):
        return None
    shown = api_display(url).rstrip("/")
    return shown.removesuffix("/api")


@contextmanager
def safe_urls() -> Iterator[None]:
    """PREFECT_UI_URL without credentials, in Prefect's settings and in the environment (the
    processes a run starts, the runs `seg serve` starts), for the block's duration."""
    from prefect.settings import PREFECT_UI_URL, temporary_settings

    url = ui_url()
    if url is None:
        yield
        return
    os.environ[PREFECT_UI_URL.name] = url
    try:
        with temporary_settings(updates={PREFECT_UI_URL: url}):
            yield
    finally:
        os.environ.pop(PREFECT_UI_URL.name, None)


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
        raise StageFailed(f"{what}: {_dvc_error(proc.stdout + proc.stderr)}")
    return json.loads(proc.stdout or "{}")


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


class RunWatch(threading.Thread):
    """A run that a worker or `seg serve` started ends when that process dies, or when the
    server says it is no longer running.

    1. The parent. The process worker starts each flow run in a session of its own, so a
    worker killed with SIGKILL (OOM killer, `kill -9`, a crashed service manager) leaves the
    run going as an orphan that no worker supervises or can cancel. This thread notices the
    parent is gone (the run was re-parented) and sends the run SIGTERM: Prefect's handler
    turns that into a crash (state Crashed, "Execution was aborted by a termination
    signal"), the running stage's processes are stopped (`stop_process_tree`), and the next
    run resumes from the last checkpoint it pushed. When the whole machine dies, nothing is
    left to report: the deployment's heartbeat automation (`crash_silent_runs`) marks the
    run Crashed instead.

    2. The slot. A run that the server marked Crashed or Cancelled while it was alive (its
    heartbeats were late: a stalled machine, a server down for a minute; or an operator) has
    lost the deployment's slot, and another run may hold it now. Every `state_every` seconds
    this thread reads the run's state; one that is no longer Running stops the run the same
    way, saying why, so two runs never go on side by side. A server that does not answer
    changes nothing: the run goes on.
    """

    def __init__(self, logger, every: float = 2.0, state_every: float = 15.0) -> None:
        super().__init__(daemon=True, name="run-watch")
        self.parent, self.logger = os.getppid(), logger
        self.every, self.state_every = every, state_every
        self.run_id = os.environ.get("PREFECT__FLOW_RUN_ID")
        self.done = threading.Event()
        self.context = contextvars.copy_context()  # the run's logger and settings work here

    @classmethod
    def start_if_supervised(cls, logger) -> RunWatch | None:
        """Watch a run started by a worker or a runner (they set PREFECT__FLOW_RUN_ID in its
        environment); not `seg flow`, which runs in-process."""
        if not os.environ.get("PREFECT__FLOW_RUN_ID") or os.getppid() <= 1:
            return None
        watch = cls(logger)
        watch.start()
        return watch

    def run(self) -> None:
        self.context.run(self._watch)

    def _watch(self) -> None:
        last_state = time.monotonic()
        while not self.done.wait(self.every):
            if os.getppid() != self.parent:
                self._parent_gone()
                return
            if time.monotonic() - last_state >= self.state_every:
                last_state = time.monotonic()
                why = self._not_running()
                if why:
                    self._stop(
                        f"this run was marked {why} on the server while it was still running "
                        "(its slot may be another run's now): stopping it, so that two runs "
                        "never go on side by side; the next run resumes from its last pushed "
                        "checkpoint"
                    )
                    return

    def _not_running(self) -> str | None:
        """The run's state name and message when the server has it in a final state (or
        cancelling); None while Running, or when the server does not answer."""
        from prefect.client.orchestration import get_client

        try:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(self.run_id).state
        except Exception:  # a server down for a while: the run goes on
            return None
        if state is None or not (state.is_final() or state.is_cancelling()):
            return None
        return f"{state.name}" + (f" ({state.message})" if state.message else "")

    def _parent_gone(self) -> None:
        # The worker held the read end of this process's stdout and stderr: a write there now
        # fails, and rich (Prefect's console log handler) turns that into SystemExit in
        # whichever thread logs. Point both at /dev/null first; the run's logs still reach
        # the API.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
        self._stop(
            f"the worker that started this run (PID {self.parent}) is gone: ending the run; "
            "the next run resumes from the last checkpoint"
        )

    def _stop(self, message: str) -> None:
        with contextlib.suppress(Exception):
            self.logger.error("%s", message)
        # to the main thread: it sits in a blocking read of the stage's output, which only a
        # signal delivered to that thread interrupts
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

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
        result, _ = run_dvc_stage(Path(root), stage, logger, notes, lim.stage, env)
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
def save_experiment(root: str, name: str | None = None, limit: float = runs.Limits.dvc) -> str:
    """`dvc exp save [-n NAME]`: the workspace's params, metrics and outputs as an
    experiment; returns its name."""
    done = runs.call(
        dvc_command("exp", "save", *(["--name", name] if name else [])), root, limit,
        "dvc exp save", "dvc", env=dvc_env(), check=False,
    )  # fmt: skip
    text = done.stdout + done.stderr
    if done.returncode != 0:
        raise StageFailed(f"dvc exp save: {_dvc_error(text)}")
    found = re.search(r"Experiment has been saved as: (\S+)", text)
    name = found.group(1) if found else (name or "")
    get_run_logger().info("saved experiment %s (dvc exp show lists it)", name)
    return name


# ----------------------------------------------------------------------------- remotes


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


@task(name="push-experiment", retries=IO_RETRIES, retry_delay_seconds=5, **_NO_CACHE)
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


@task(name="reuse-experiment", retries=IO_RETRIES, retry_delay_seconds=5, **_NO_CACHE)
def reuse_experiment(root: str, commit: str, limit: float = runs.Limits.git) -> str | None:
    """DVC's run cache for whole runs: when an experiment of the same commit has exactly the
    params this run has (params.yaml after its overrides), its dvc.lock and the files it
    keeps in git (metrics, plots) are checked out into the workspace, so DVC finds its
    outputs up to date and reruns only what they lack (a run that stopped at `train` leaves
    `evaluate` to this one). The newest such experiment of origin (or of the clone) counts.
    Returns its name, or None."""
    import yaml

    logger = get_run_logger()
    refs = f"refs/exps/{commit[:2]}/{commit[2:]}"
    runs.git(root, "fetch", "--quiet", "--no-tags", "origin", f"+{refs}/*:{refs}/*",
             limit=limit, what="git fetch origin (experiments)")  # fmt: skip
    listed = runs.git(
        root, "for-each-ref", "--sort=-committerdate", "--format=%(refname)", refs, limit=limit
    ).split()
    mine = yaml.safe_load((Path(root) / "params.yaml").read_text())
    for ref in listed:
        shown = runs.git(root, "show", f"{ref}:params.yaml", limit=limit, check=False)
        if not shown or yaml.safe_load(shown) != mine:
            continue
        runs.git(root, "checkout", ref, "--", ".", limit=limit)
        name = ref.rsplit("/", 1)[-1]
        logger.info(
            "experiment %s of this commit has these params: its dvc.lock and metrics checked "
            "out, so DVC reruns only what its outputs lack", name,
        )  # fmt: skip
        return name
    return None


@task(name="restore-outputs", retries=IO_RETRIES, retry_delay_seconds=5, **_NO_CACHE)
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
    return _since(t0)


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
    commit: str | None = None,
    branch: str | None = None,
    limits: dict[str, float] | None = None,
) -> dict:
    """Run the stale stages of dvc.yaml up to `targets` (default: all), one task per stage,
    with `overrides` (`section.key=value`, as `dvc exp run -S`).

    A deployment's run (a worker's, `seg serve`'s) is an experiment at a pinned commit: in a
    workspace of its own (stages/runs.py) at `commit`, or at the tip of `branch` when it
    starts (default: the branch it was deployed from), with that commit's code; it never
    changes the host's clone. Called directly (`seg flow`), it runs in the project itself,
    as `dvc exp run` does. `limits`: seconds per kind of command (runs.Limits)."""
    from prefect.runtime import deployment

    logger = get_run_logger()
    watch = RunWatch.start_if_supervised(logger)
    try:
        lim = runs.Limits.parse(limits)
        if deployment.get_id():
            return _in_workspace(targets, overrides, log_every, commit, branch, lim, logger)
        if commit or branch:
            raise ConfigError("commit and branch pin a deployment's runs; `seg flow` runs here")
        return _pipeline(project_root(), targets, overrides, log_every, lim, logger)
    finally:
        if watch is not None:
            watch.stop()


def _in_workspace(targets, overrides, log_every, commit, branch, lim, logger) -> dict:
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
        code = runs.load_flows(ws.path)
        enter = getattr(code, "run_in_workspace", None)
        if enter is None:
            raise ConfigError(
                f"commit {ws.commit[:12]}: its stages/flows.py has no run_in_workspace (a commit "
                "from before per-run workspaces): run it with `seg flow` in a checkout of it"
            )
        return enter(
            workspace=str(ws.path), clone=str(clone), commit=ws.commit, source=ws.source,
            name=name, targets=targets, overrides=list(overrides or []), log_every=log_every,
            limits=lim.as_dict(), setup_seconds=ws.seconds,
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
            setup_seconds,
        )  # fmt: skip
    finally:
        os.chdir(here)


def _run_in_workspace(
    workspace, clone, commit, source, name, targets, overrides, log_every, limits, setup_seconds
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
    out["experiment"] = save_experiment(workspace, name, lim.dvc)
    push_experiment(workspace, "origin", name, outputs=dvc_remote is not None, limit=lim.dvc)
    if "evaluate" in planned:
        out.update(publish_metrics(workspace, evaluated="evaluate" in _ran(results)))
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
    try:
        for stage in planned:
            retrying = stage.split("@")[0] in IO_STAGES
            run = dvc_stage.with_options(
                retries=IO_RETRIES if retrying else 0,
                retry_delay_seconds=5,
                retry_condition_fn=_retry_stage,
            )
            fresh = first is not None and not upstream.get(stage, set()) & ran
            known = first.get(stage, []) if fresh else None
            results.append(run(str(root), stage, log_every, lim.as_dict(), env, known))
            if results[-1]["result"] != "up to date":
                ran.add(stage)
    finally:
        failed = next((s for s in planned if s not in {r["stage"] for r in results}), None)
        create_markdown_artifact(
            markdown=stages_markdown(results, planned, failed),
            key="dvc-stages",
            description="Each DVC stage of this run: ran or up to date, and why",
        )
    return results


def _ran(results: list[dict]) -> list[str]:
    return [r["stage"] for r in results if r["result"] != "up to date"]


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.get_id()


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


def run_markdown(run: dict, out: dict, setup_s: float, restore_s: float) -> str:
    """The run's own artifact: what it was and where its results went."""
    over = ", ".join(f"`{o}`" for o in run["overrides"]) or "none"
    miou = f"{pct(out['miou'])} %" if "miou" in out else "not evaluated (not a target)"
    lines = [
        f"# Run {run['name']}",
        "",
        "| | |",
        "| --- | --- |",
        f"| commit | `{run['commit']}` ({run['source']}) |",
        f"| overrides | {over} |",
        f"| targets | {', '.join(run['targets'] or []) or 'all'} |",
        f"| experiment | `{out.get('experiment')}` (`dvc exp show`, `dvc exp pull origin "
        f"{out.get('experiment')}`) |",
        f"| host | {run['host']} |",
        f"| mIoU | {miou} |",
        f"| stages that ran | {', '.join(_ran_names(out)) or 'none: all up to date'} |",
        f"| workspace | made in {setup_s:.1f} s, outputs restored in {restore_s:.1f} s |",
        f"| checkpoints | {run['checkpoints']} |",
    ]
    return "\n".join(lines) + "\n"


def _ran_names(out: dict) -> list[str]:
    return [s for s, r in out["stages"].items() if r != "up to date"]


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


def _deployment_kwargs(cron, timezone, overrides, collision, branch=None, limits=None) -> dict:
    from prefect.types.entrypoint import EntrypointType

    parameters: dict = {"overrides": list(overrides or [])}
    if branch:
        parameters["branch"] = branch
    if limits:
        parameters["limits"] = runs.Limits.parse(limits).as_dict()
    return {
        "schedules": [_schedule(cron, timezone)],
        "concurrency_limit": concurrency(collision),
        "parameters": parameters,
        "description": "The DVC graph on a schedule: stale stages run, the rest are skipped.",
        "tags": ["seg"],
        # `stages.flows.pipeline_flow` imports from the installed package in any project
        # folder; the run's working directory is the project (dvc.yaml, params.yaml)
        "entrypoint_type": EntrypointType.MODULE_PATH,
    }


def deployment(
    name: str,
    cron: str = "0 3 * * *",
    timezone: str | None = None,
    overrides: list[str] | None = None,
    collision: str = "skip",
    branch: str | None = None,
    limits: list[str] | None = None,
):
    """The pipeline flow as a deployment on a cron schedule (what `seg serve` serves); each
    run works in a workspace of its own made from the serving process's clone."""
    return pipeline_flow.to_deployment(
        name, **_deployment_kwargs(cron, timezone, overrides, collision, branch, limits)
    )


def check_options(cron: str, timezone: str | None, collision: str, limits) -> None:
    """A deployment's options, checked before anything else (one line each)."""
    _schedule(cron, timezone)
    concurrency(collision)
    runs.Limits.parse(limits)


def default_name(root: Path) -> str:
    """A deployment's name when none is given: the repository's (its git remote's last path
    part, else the project folder's), so that two projects on one server do not share one
    deployment while every clone of one repository does."""
    remote = runs.git_remote(root, runs.Limits())
    base = remote[1].rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1] if remote else root.name
    base = base.removesuffix(".git")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-") or "pipeline"


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
    name: str,
    cron: str = "0 3 * * *",
    timezone: str | None = None,
    overrides: list[str] | None = None,
    collision: str = "skip",
    workdir: Path | str = ".",
    branch: str | None = None,
    limits: list[str] | None = None,
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
    job_variables = {"env": run_env()}  # heartbeats (crash_silent_runs), a clean UI URL
    if not variable:
        job_variables["working_dir"] = str(workdir)
    deployment = pipeline_flow.to_deployment(
        name, work_pool_name=pool, job_variables=job_variables,
        **_deployment_kwargs(cron, timezone, overrides, collision, branch, limits),
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


def run_env() -> dict[str, str]:
    """A deployment's runs' environment: heartbeats, and a UI URL without credentials (a
    worker's PREFECT_API_URL may hold user:password; Prefect would print it in "View at")."""
    url = ui_url()
    return {**heartbeat_env(), **({"PREFECT_UI_URL": url} if url else {})}

"""A run's processes, supervised: a stage's whole process tree stopped with the run; a run
that outlives its worker, or that the server no longer counts as running, stops itself
(`RunWatch`); runs of a deployment send heartbeats, and an automation marks a run Crashed
when they stop (its machine died)."""

from __future__ import annotations

import contextlib
import contextvars
import os
import signal
import threading
import time


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


def heartbeat_env() -> dict[str, str]:
    """The environment that makes a run send heartbeats every HEARTBEAT_S seconds."""
    return {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}

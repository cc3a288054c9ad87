"""Helpers several test modules share: one copy of each (processes, polling, dvc.lock, Prefect
run states and logs, the credentials grep). Plain functions; fixtures live in conftest.py,
servers.py and s3server.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import yaml

# ----------------------------------------------------------------------------- processes


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    """A process in a session of its own (so `stop` reaches its children), its output
    appended to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT) -> None:
    """Stop a process we started and its children (Ctrl-C for `seg serve` and workers);
    SIGKILL after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def eventually(check: Callable[[], object], timeout: float = 30.0, every: float = 0.5):
    """Poll until `check` passes (returns its value), re-raising its last AssertionError after
    `timeout` s: runs, task-run states and logs reach the API in the background."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(every)


# ----------------------------------------------------------------------------- dvc.lock


def lock_out(proj: Path, out: str) -> dict:
    """The entry of output `out` (its path as dvc.yaml writes it) in the project's dvc.lock."""
    for stage in yaml.safe_load((proj / "dvc.lock").read_text())["stages"].values():
        for o in stage.get("outs", []):
            if o["path"] == out:
                return o
    raise AssertionError(f"{out} is not an output in dvc.lock")


def lock_md5(proj: Path, out: str) -> str:
    """The md5 dvc.lock records for output `out`."""
    return lock_out(proj, out)["md5"]


# ----------------------------------------------------------------------------- Prefect runs


def wait_final(client, run_id, timeout: float = 400, every: float = 0.5):
    """The flow run once it is in a final state (Completed, Failed, Cancelled, Crashed)."""

    def final():
        r = client.read_flow_run(run_id)
        assert r.state.is_final(), r.state
        return r

    return eventually(final, timeout=timeout, every=every)


def run_logs(client, run_id, until: str | None = None, timeout: float = 30) -> str:
    """All log lines of a flow run (pages of 200, the server's limit); with `until`, once that
    text is among them (logs reach the API in batches, after the state)."""

    def read() -> str:
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        lines: list[str] = []
        while True:
            page = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
                limit=200, offset=len(lines),
            )  # fmt: skip
            lines += [log.message for log in page]
            if len(page) < 200:
                text = "\n".join(lines)
                assert until is None or until in text, text
                return text

    return eventually(read, timeout=timeout) if until is not None else read()


def run_states(client, run_id) -> list:
    """A flow run's states, oldest first."""
    return sorted(client.read_flow_run_states(run_id), key=lambda s: s.timestamp)


def running_intervals(client, run_id) -> list[tuple]:
    """(start, end) of each time the run was Running, from its state history: a Running state
    until the next state (end None: still Running)."""
    states = run_states(client, run_id)
    return [
        (s.timestamp, after.timestamp if after else None)
        for s, after in zip(states, [*states[1:], None], strict=True)
        if s.is_running()
    ]


# ----------------------------------------------------------------------------- credentials


def no_secret(s3, folders: list[Path], texts: list[str]) -> int:
    """Neither the S3 secret key nor its key id in `texts` or in any file under `folders`;
    returns how many files were read."""
    for text in texts:
        assert s3.secret not in text and s3.key_id not in text
    n = 0
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                assert s3.secret.encode() not in data, path
                assert s3.key_id.encode() not in data, path
                n += 1
    return n

"""Prefect faults, against a real `prefect server`, real process workers and real `dvc`: a
worker killed mid-training, its machine lost mid-training, the server restarted mid-training,
and (SEG_FAULTS_LONG=1, which benchmarks/faults.sh sets) 20 queued runs in a row.

Every faulted run trains the same 120 steps (a separable head, amp off) of one committed
project, each run in a workspace of its own (stages/runs.py), its checkpoints pushed to the
store of that commit; the run never interrupted is `dvc repro` on a copy of the project, and
every faulted sequence must end at its mIoU. The processes these tests start get PYTHONPATH=the
project, whose pipeline/ and stages/ are this checkout's (a clone's own code, as installed).
Set SEG_FAULTS_REPORT=FILE to collect one line per case with what was measured.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import eventually as _eventually
from helpers import run_logs, wait_final
from helpers import start as _start
from helpers import stop as _stop_group
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from servers import PrefectServer
from test_dvc import _copy, _env, _new_project, git

from stages import runs, supervise

# minutes of killed workers and restarted servers: `make test-slow` (and CI) runs them
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BIN = Path(sys.executable).parent
# enough steps that each fault lands mid-training however fast a step is (with 40, a quiet
# machine once trained to the end between two polls, and the next fault found the run done)
ITERATIONS = 120
TRAIN = {
    "iterations": ITERATIONS, "checkpoint_interval": 5, "val_interval": 1000, "log_every": 5,
    "amp": "off",
}  # fmt: skip
CONSOLE_LINE = "resumed from outputs/train/last.pt at step"


# ----------------------------------------------------------------------------- helpers


def report(case: str, detail: str) -> None:
    """One line for benchmarks/faults.sh: the case and what it measured."""
    path = os.environ.get("SEG_FAULTS_REPORT")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" (")[0]
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "case": case, "detail": detail}) + "\n")
    print(f"{case}: {detail}")


def _proc_env(proj: Path, api: str, **extra: str) -> dict[str, str]:
    home = proj.parent / f"{proj.name}-home"
    home.mkdir(exist_ok=True)
    (home / ".gitconfig").write_text("[user]\n\tname = t\n\temail = t@t\n")
    env = {**_env(home), "PYTHONPATH": str(proj), **extra}
    if api:
        env["PREFECT_API_URL"] = api
    return env


def _worker(proj: Path, api: str, pool: str, log: Path) -> subprocess.Popen:
    env = _proc_env(
        proj, api, PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="1"
    )
    cmd = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"]
    return _start(cmd, proj.parent, env, log)


def _deploy(proj: Path, api: str, pool: str, name: str, *args: str) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as c:
        try:
            c.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        except Exception:  # ObjectAlreadyExists: a second test on the same server
            pass
    done = subprocess.run(
        [str(BIN / "seg"), "deploy", "--pool", pool, "--name", name, *args],
        cwd=proj, env=_proc_env(proj, api), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def _dvc(proj: Path, *args: str) -> subprocess.CompletedProcess:
    """`dvc ARGS` in the project, its stage commands on the project's own code."""
    done = subprocess.run(
        [str(BIN / "dvc"), *args], cwd=proj, env=_proc_env(proj, ""), capture_output=True,
        text=True, timeout=600, start_new_session=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _stage_processes(proj: Path) -> list[str]:
    """Live processes working in the project (dvc, seg train, DataLoader workers)."""
    found = []
    for p in psutil.process_iter(["pid", "cwd", "cmdline", "status"]):
        cwd = p.info.get("cwd") or ""
        if cwd.startswith(str(proj)) and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(f"{p.info['pid']}: {' '.join(p.info['cmdline'] or [])[:120]}")
    return found


def _stored_step(proj: Path) -> int:
    """The newest step a run pushed to the project's checkpoint store (where the next run of
    the same commit starts from; 0 if none yet)."""
    found = proj.glob(".dvc/tmp/seg/checkpoints/*/step-*.pt")
    return max((int(p.name.split(".")[0].removeprefix("step-")) for p in found), default=0)


def _wait_for_checkpoint(proj: Path, step: int, run_id, client) -> int:
    """Until the run has pushed a checkpoint at `step` or later (it is training)."""

    def written():
        state = client.read_flow_run(run_id).state
        assert not state.is_final(), f"the run ended before the fault: {state}"
        got = _stored_step(proj)
        assert got >= step, f"pushed up to step {got}"
        return got

    return _eventually(written, timeout=300, every=0.3)


def _workspace_file(proj: Path, rel: str) -> Path | None:
    """`rel` in the newest workspace of a run of the project (None when there is none)."""
    found = sorted(proj.glob(f".dvc/tmp/seg/runs/*/{rel}"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _exp_miou(proj: Path, run) -> float:
    """The mIoU of a flow run's experiment, as it landed in the project (a ref)."""
    name = runs.experiment_name(run.name, str(run.id))
    refs = git(proj, "for-each-ref", "--format=%(refname)", "refs/exps").split()
    (ref,) = [r for r in refs if r.endswith(f"/{name}")]
    return json.loads(git(proj, "show", f"{ref}:outputs/eval/metrics.json"))["miou"]


def _miou(proj: Path) -> float:
    return json.loads((proj / "outputs/eval/metrics.json").read_text())["miou"]


def _consistent(proj: Path, stale: bool = False) -> None:
    """`dvc status` clean (`stale`: as committed, its changed train params not run: the runs
    ran in workspaces of their own), no workspace of a run left, and no DVC lock held by a
    live process (a killed dvc leaves its entries in .dvc/tmp/rwlock; DVC ignores those of
    processes that are gone)."""
    status = json.loads(_dvc(proj, "status", "--json").stdout)
    current = {"working_point": ["always changed"]}  # it runs at every repro
    assert (set(status) == {"params", "train", *current}) if stale else status == current, status
    assert git(proj, "status", "--porcelain") == ""
    assert not list(proj.glob(".dvc/tmp/seg/runs/*")), list(proj.glob(".dvc/tmp/seg/runs/*"))
    rwlock = proj / ".dvc" / "tmp" / "rwlock"
    held = json.loads(rwlock.read_text() or "{}") if rwlock.exists() else {}
    holders = [h for hs in held.get("read", {}).values() for h in hs]
    holders += list(held.get("write", {}).values())
    live = [h for h in holders if psutil.pid_exists(h["pid"])]
    assert not live, live


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(scratch) -> Iterator[PrefectServer]:
    s = PrefectServer(scratch("prefect-server"))
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def faulted(scratch) -> tuple[Path, float]:
    """(a committed project whose train and evaluate are stale: ITERATIONS steps to train, the
    mIoU those steps reach when never interrupted: `dvc repro` on a copy)."""
    root = scratch("faults")
    proj = _new_project(root / "proj", **{"train.amp": "off", "evaluate.amp": "off"})
    _dvc(proj, "repro")
    raw = yaml.safe_load((proj / "params.yaml").read_text())
    raw["train"].update(TRAIN)
    raw["train"]["model"]["separable_head"] = True  # 38 MB checkpoints instead of 94 MB
    (proj / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    git(proj, "add", "-A")
    git(proj, "commit", "-q", "-m", f"repro, then {ITERATIONS} steps to train")
    whole = _copy(proj, root / "whole")
    _dvc(whole, "repro")
    return proj, _miou(whole)


@pytest.fixture
def proj(faulted, tmp_path) -> Path:
    return _copy(faulted[0], tmp_path / "proj")


# ----------------------------------------------------------------------------- the cases


def test_worker_killed_machine_lost_server_restarted_and_nothing_lost(
    server, faulted, proj, tmp_path
):
    """1. The worker alone is SIGKILLed mid-training: its run notices (RunWatch), stops its
    stage, removes its workspace and ends Crashed within seconds; no process is left. 2. The
    machine dies (worker, run, dvc and seg train SIGKILLed at once): nothing is left to
    report, the deployment's heartbeat automation marks the run Crashed after CRASH_AFTER_S
    without a heartbeat; its workspace stays behind. 3. The next run removes that workspace,
    resumes from the checkpoint the dead run pushed; while it trains the server is stopped
    and started again: training goes on (a DVC stage needs no server) and the state arrives
    after the restart (Completed). Its experiment ends at the uninterrupted mIoU, and the
    project is as committed. Logs and heartbeats sent while the server was down are lost
    (Prefect's clients drop what they cannot send)."""
    api, pool, name = server.url, "faults", "faulted"
    _deploy(proj, api, pool, name)
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as c:
        deployment = c.read_deployment_by_name(f"seg-pipeline/{name}")

        # 1. a worker killed alone
        worker = _worker(proj, api, pool, tmp_path / "worker-1.log")
        try:
            run = c.create_flow_run_from_deployment(deployment.id)
            _wait_for_checkpoint(proj, 5, run.id, c)
            os.kill(worker.pid, signal.SIGKILL)
            killed = time.monotonic()
            worker.wait()
            r = wait_final(c, run.id, timeout=120)
            took1 = time.monotonic() - killed
            assert r.state.is_crashed(), r.state
            assert r.state.message == "Execution was aborted by a termination signal.", r.state
            assert f"the worker that started this run (PID {worker.pid}) is gone" in run_logs(
                c, run.id
            )
            _eventually(lambda: _no_processes(proj), timeout=30)
            assert not list(proj.glob(".dvc/tmp/seg/runs/*"))  # its workspace removed
            step1 = _stored_step(proj)  # nothing pushes any more
        finally:
            _stop_group(worker, signal.SIGKILL)
        report(
            "worker SIGKILLed mid-training",
            f"run Crashed {took1:.1f} s after the kill (RunWatch: SIGTERM to itself), "
            f"checkpoint pushed at step {step1}, no process or workspace left",
        )

        # 2. the machine lost: the worker and everything under it at once
        worker = _worker(proj, api, pool, tmp_path / "worker-2.log")
        try:
            run = c.create_flow_run_from_deployment(deployment.id)
            _wait_for_checkpoint(proj, step1 + 5, run.id, c)
            tree = [worker.pid, *(p.pid for p in psutil.Process(worker.pid).children(True))]
            for pid in tree:
                os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            step2 = _stored_step(proj)  # all dead: nothing pushes any more
            (left,) = proj.glob(".dvc/tmp/seg/runs/*")  # a lost machine cleans nothing up
            r = wait_final(c, run.id, timeout=supervise.CRASH_AFTER_S + 90)
            took2 = time.monotonic() - killed
        finally:
            _stop_group(worker, signal.SIGKILL)
        assert r.state.is_crashed(), r.state
        assert r.state.message.startswith(f"no heartbeat for {supervise.CRASH_AFTER_S} s"), r.state
        assert took2 <= supervise.CRASH_AFTER_S + 30, took2
        report(
            "machine lost mid-training (worker and run SIGKILLed)",
            f"run Crashed {took2:.0f} s after the kill (heartbeat every {supervise.HEARTBEAT_S} s, "
            f"automation: none for {supervise.CRASH_AFTER_S} s), checkpoint pushed at step {step2}",
        )

        # 3. the next run resumes; the server is stopped and started again while it trains
        worker = _worker(proj, api, pool, tmp_path / "worker-3.log")
        try:
            run = c.create_flow_run_from_deployment(deployment.id)
            at_stop = _wait_for_checkpoint(proj, step2 + 5, run.id, c)
            logged_at_stop = _logged_step(proj)
            t0 = time.monotonic()
            server.stop()
            time.sleep(5)
            server.start()
            down = time.monotonic() - t0
            logged_at_start = _logged_step(proj)
            r = wait_final(c, run.id, timeout=600)
        finally:
            _stop_group(worker)
        assert r.state.is_completed(), (r.state, (tmp_path / "worker-3.log").read_text()[-3000:])

        # the run's logs up to the stop are on the server; what it logged while the server was
        # down may be lost (the rest of training and evaluate can end in those seconds); its
        # `dvc-stages` artifact, written at its end, says what each stage did
        text = run_logs(c, run.id)
        rows = _stage_rows(c, run.id)
    assert f"removed the workspaces of 1 run(s) that are gone: {left.name}" in text, text
    assert f"(step {step2}, pushed by run {left.name})" in text, text
    assert f"{CONSOLE_LINE} {step2} of {ITERATIONS}" in text, text
    assert f"{CONSOLE_LINE} {step2} of {ITERATIONS}" in rows["train"][4], rows
    assert (rows["train"][1], rows["evaluate"][1]) == ("ran", "ran"), rows
    miou = _exp_miou(proj, r)
    assert miou == faulted[1]
    _consistent(proj, stale=True)
    report(
        "server stopped and restarted mid-training",
        f"down {down:.0f} s while the run trained (logged step {logged_at_stop} when it "
        f"stopped, {logged_at_start} when it was back: training went on); the run Completed "
        "after the restart, its artifacts whole",
    )
    report(
        "next run after the faults",
        f"resumed from the checkpoint pushed at step {step2} of {ITERATIONS}, mIoU "
        f"{100 * miou:.2f} = the uninterrupted run's, the project as committed, no workspace or "
        f"DVC lock left (checkpoint pushed at step {at_stop} before the restart)",
    )


def _logged_step(proj: Path) -> int:
    """The last training step DVCLive logged (every train.log_every steps) in the run's
    workspace."""
    tsv = _workspace_file(proj, "outputs/train/dvclive/plots/metrics/train/loss.tsv")
    rows = tsv.read_text().splitlines()[1:] if tsv else []
    return int(rows[-1].split("\t")[0]) if rows else 0


def _no_processes(proj: Path) -> None:
    left = _stage_processes(proj)
    assert not left, left


def _stage_rows(client, run_id) -> dict[str, list[str]]:
    """The `dvc-stages` artifact's rows: stage -> [stage, result, why, seconds, notes]."""
    from test_flows import _artifacts

    art = _artifacts(client, run_id)["dvc-stages"]
    rows = [line.split("|")[1:-1] for line in art.data.splitlines() if line.startswith("| ")]
    return {
        r[0].strip(): [c.strip() for c in r] for r in rows if r[0].strip() not in ("stage", "---")
    }


@pytest.mark.skipif(
    not os.environ.get("SEG_FAULTS_LONG"),
    reason="20 runs take minutes: benchmarks/faults.sh runs it (SEG_FAULTS_LONG=1)",
)
def test_twenty_queued_runs_in_a_row(server, faulted, tmp_path):
    """`prefect deployment run` 20 times on `seg serve --collision queue` with nothing
    changed: every run Completed, each under 60 s, no process, temporary folder, workspace or
    DVC lock left, dvc status clean, and the serving process's memory after run 20 within 20 % of
    after run 1."""
    proj = _copy(faulted[0], tmp_path / "proj")
    _dvc(proj, "repro")  # up to date first, and committed: the 20 runs change nothing
    git(proj, "add", "-A")
    git(proj, "commit", "-q", "-m", "repro")
    tmp = tmp_path / "serve-tmp"
    tmp.mkdir()
    # the runner proposes every queued run at each poll (20 queued runs, polled every second,
    # kept the server too busy to answer `prefect deployment run` within 120 s): every 5 s
    env = _proc_env(proj, server.url, TMPDIR=str(tmp), PREFECT_RUNNER_POLL_FREQUENCY="5")
    serve = _start(
        [str(BIN / "seg"), "serve", "--name", "queued", "--cron", "0 3 * * *", "--collision",
         "queue"], proj, env, tmp_path / "serve.log",
    )  # fmt: skip
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.url}):
            with get_client(sync_client=True) as c:

                def registered():
                    try:
                        return c.read_deployment_by_name("seg-pipeline/queued")
                    except Exception as exc:
                        raise AssertionError(str(exc)) from None

                _eventually(registered, timeout=120)
                asked, ids = [], []  # (the cron schedule adds runs of its own: not these)

                def run_now() -> None:
                    t0 = time.monotonic()
                    done = subprocess.run(
                        [str(BIN / "prefect"), "deployment", "run", "seg-pipeline/queued"],
                        cwd=proj, env=env, capture_output=True, text=True, timeout=300,
                    )  # fmt: skip
                    assert done.returncode == 0, done.stdout + done.stderr
                    asked.append(time.monotonic() - t0)
                    ids.append(re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1))

                serving = psutil.Process(serve.pid)
                run_now()
                first = _eventually(lambda: _one_more_final(c, ids, 1), timeout=300)
                rss1, tmp1 = serving.memory_info().rss, _tree(tmp)
                for _ in range(19):  # they queue behind each other (AwaitingConcurrencySlot)
                    run_now()
                finals = _eventually(lambda: _one_more_final(c, ids, 20), timeout=1800, every=1)
                rss20, tmp20 = serving.memory_info().rss, _tree(tmp)

                def no_children():  # the last run's process is reaped a moment after its end
                    children = [p for p in serving.children(recursive=True) if p.is_running()]
                    assert not children, children

                _eventually(no_children, timeout=30)
    finally:
        _stop_group(serve)
    assert all(r.state.is_completed() for r in finals), [r.state for r in finals]
    took = [(r.end_time - r.start_time).total_seconds() for r in finals]
    assert max(took) < 60, took  # each in a workspace of its own, saved as an experiment
    # the runner's own folder (runner_storage/<id>) is there from its start; runs add nothing
    assert tmp20 == tmp1, (tmp1, tmp20)
    _consistent(proj)
    growth = rss20 / rss1 - 1
    assert abs(growth) <= 0.20, (rss1, rss20)
    report(
        "20 queued runs in a row, nothing changed",
        f"all Completed, {min(took):.1f}-{max(took):.1f} s each; serving process "
        f"{rss1 / 2**20:.0f} MiB after run 1 ({first.name}), {rss20 / 2**20:.0f} MiB after run 20 "
        f"({100 * growth:+.1f} %); no process, temporary folder or DVC lock left; "
        f"`prefect deployment run` took {min(asked):.0f}-{max(asked):.0f} s",
    )


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _one_more_final(client, ids, n: int):
    """Once at least `n` of the runs are final: the first one (n = 1) or all of them."""
    runs = [client.read_flow_run(i) for i in ids]
    final = [r for r in runs if r.state.is_final()]
    assert len(final) >= n, f"{len(final)} of {len(ids)} final"
    return final[0] if n == 1 else runs

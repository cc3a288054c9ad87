"""The Prefect flow over the DVC graph, against a real `prefect server` and real `dvc`.

A module-scoped project runs `dvc repro` once on `tiny_params()` and is committed; every test
works on a copy. Scheduled runs come from a real `seg serve` (cron with a seconds field, so
runs fall seconds apart, or runs made due at a chosen time), work-pool runs from a real
`prefect worker start`. A deployment's run works in a workspace of its own at the project's
committed tip and leaves the project as it was, but for the experiment it adds; `seg flow`
runs in the project itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from helpers import eventually as _eventually
from helpers import free_port as _free_port
from helpers import lock_md5 as _lock_md5
from helpers import run_states, running_intervals, wait_final
from helpers import start as _start
from helpers import stop as _stop
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Scheduled
from test_dvc import DVC, _copy, _env, _new_project, dvc, git
from typer.testing import CliRunner

from stages.cli import app

BIN = Path(sys.executable).parent
# dvc.yaml's stages in graph order (the k-fold ones run and write "off" files with folds: 0)
STAGES = ["params", "working_point", "synth", "preprocess@train", "preprocess@val", "train"]
STAGES += ["evaluate", "kfold_split", "kfold_summary"]
# `seg flow train`
TRAIN_PLAN = ["working_point", "synth", "preprocess@train", "preprocess@val", "train"]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(prefect_server) -> str:
    """The session's real `prefect server` (tests/servers.py)."""
    return prefect_server.url


@pytest.fixture(scope="module")
def base(scratch) -> Path:
    """A tiny project after `dvc repro`, committed: everything up to date (copy it first)."""
    path = _new_project(scratch("flows") / "proj")
    dvc(path, "repro")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "dvc repro")
    return path


@pytest.fixture
def proj(base: Path, tmp_path: Path, monkeypatch) -> Path:
    """A copy of `base`, the cwd of the test; HOME, git identity and DVC's config in tmp."""
    path = _copy(base, tmp_path / "proj")
    for key, value in _proc_env(path).items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    for key in ("VIRTUAL_ENV", "PYTHONPATH", "DVC_EXP_NAME", "DVC_STAGE", "DVC_ROOT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(path)
    return path


def _proc_env(proj: Path, **extra: str) -> dict[str, str]:
    home = proj.parent / f"{proj.name}-home"
    home.mkdir(exist_ok=True)
    (home / ".gitconfig").write_text("[user]\n\tname = t\n\temail = t@t\n")
    return {**_env(home), **extra}


def _set_param(proj: Path, section: str, key: str, value) -> None:
    raw = yaml.safe_load((proj / "params.yaml").read_text())
    raw[section][key] = value
    (proj / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _fingerprint(path: Path) -> tuple:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size, _sha256(path)


def _assert_consistent(proj: Path, stale: tuple[str, ...] = ()) -> None:
    """`dvc status` is clean but for the `stale` stages (not run: not asked for), and the
    outputs are the ones dvc.lock records."""
    # working_point: always changed (it runs at every repro), and nothing else
    assert set(json.loads(dvc(proj, "status", "--json").stdout)) == {"working_point", *stale}
    for out in ("outputs/train/best.pt", "outputs/train/last.pt"):
        assert _md5(proj / out) == _lock_md5(proj, out), out
    if "evaluate" in stale:
        return
    metrics = json.loads((proj / "outputs/eval/metrics.json").read_text())
    assert metrics["provenance"]["checkpoint"]["sha256"] == _sha256(proj / "outputs/train/best.pt")


def _artifacts(client, flow_run_id) -> dict:
    """The artifacts of a flow run (its own and its tasks'), by key."""
    from prefect.client.schemas.objects import Artifact

    # the client sends null flow-run/task-run filters, which this server rejects (422)
    body = {
        "artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}},
        "limit": 50,
        "offset": 0,
        "sort": "KEY_ASC",
    }
    arts = Artifact.model_validate_list(
        client.request("POST", "/artifacts/filter", json=body).json()
    )
    return {a.key: a for a in arts}


def _stage_table(client, flow_run_id) -> dict[str, str]:
    """The `dvc-stages` artifact of a flow run: stage -> result."""
    arts = list(_artifacts(client, flow_run_id).values())
    tables = [a for a in arts if a.key == "dvc-stages"]
    assert len(tables) == 1, f"{len(tables)} dvc-stages artifacts yet"
    table = tables[0]
    rows = [line.split("|")[1:3] for line in table.data.splitlines() if line.startswith("| ")]
    return {s.strip(): r.strip() for s, r in rows if s.strip() not in ("stage", "---")}


def _describe(client, runs) -> str:
    """Each run's due time and state history (repeats counted), for failure messages."""
    lines = []
    for r in runs:
        steps: list[list] = []  # [name, first timestamp, count]
        for s in run_states(client, r.id):
            if steps and steps[-1][0] == s.name:
                steps[-1][2] += 1
            else:
                steps.append([s.name, s.timestamp, 1])
        lines.append(
            f"{r.name}: due {r.expected_start_time:%H:%M:%S.%f}: "
            + " -> ".join(f"{n}{f' x{k}' if k > 1 else ''} {t:%H:%M:%S.%f}" for n, t, k in steps)
        )
    return "\n".join(lines)


def _deployment_runs(client, deployment_id) -> list:
    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        limit=100,
        sort=FlowRunSort.EXPECTED_START_TIME_ASC,
    )


def _serve(
    proj: Path, server: str, name: str, *args: str, cron: str = "* * * * * */10"
) -> subprocess.Popen:
    """`seg serve` in the project, polling for due runs every second."""
    env = _proc_env(proj, PREFECT_API_URL=server, PREFECT_RUNNER_POLL_FREQUENCY="1")
    cmd = [str(BIN / "seg"), "serve", "--name", name, "--cron", cron, *args]
    return _start(cmd, proj, env, proj.parent / f"serve-{name}.log")


def _deployment_id(client, name: str):
    def registered():
        try:
            return client.read_deployment_by_name(f"seg-pipeline/{name}").id
        except Exception as exc:  # ObjectNotFound until `seg serve` has registered it
            raise AssertionError(str(exc)) from None

    return _eventually(registered, timeout=120)


# ----------------------------------------------------------------------------- no server


@pytest.mark.parametrize(
    "command", [["flow", "evaluate"], ["flow"], ["serve"], ["deploy", "--pool", "gpu"]]
)
def test_unreachable_server_is_one_line_error_before_any_work(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        (Path(__file__).resolve().parents[1] / "params.yaml").read_text()
    )
    dead = f"http://127.0.0.1:{_free_port()}/api"
    with temporary_settings(updates={PREFECT_API_URL: dead}):
        result = CliRunner().invoke(app, command)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: Prefect API at " + dead + " is unreachable")
    assert "prefect server start" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing was run


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cron", "61 * * * *"],
         "error: --cron '61 * * * *' --timezone None: Invalid cron string: \"61 * * * *\""),
        (["--collision", "later"], "error: --collision 'later': valid: skip, queue"),
    ],
)  # fmt: skip
def test_serve_rejects_bad_options_in_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        (Path(__file__).resolve().parents[1] / "params.yaml").read_text()
    )
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [message]


def test_ephemeral_server_gets_two_minutes_to_start(monkeypatch):
    """`seg flow` and `seg serve` without PREFECT_API_URL: Prefect's 20 s for its temporary
    server become 120 s, in Prefect's settings and for its threads and run processes (the
    environment); a longer setting stays, and both are as before afterwards."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as timeout

    from stages import deployments

    monkeypatch.delenv(timeout.name, raising=False)
    with temporary_settings(updates={timeout: 20}):
        with deployments.ephemeral_startup():
            assert (timeout.value(), os.environ[timeout.name]) == (120, "120")
        assert timeout.value() == 20 and timeout.name not in os.environ
    monkeypatch.setenv(timeout.name, "600")
    with temporary_settings(updates={timeout: 600}), deployments.ephemeral_startup():
        assert (timeout.value(), os.environ[timeout.name]) == (600, "600")


@pytest.mark.e2e
def test_unknown_stage_and_missing_project_fail_in_one_line(proj, tmp_path, monkeypatch):
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = CliRunner().invoke(app, ["flow", "trian"])
        assert result.exit_code == 1
        assert result.output.strip().splitlines() == [
            "error: unknown stage 'trian'; valid: " + ", ".join(STAGES)
        ]
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "params.yaml").write_text((proj / "params.yaml").read_text())
        monkeypatch.chdir(elsewhere)
        result = CliRunner().invoke(app, ["flow"])
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: {elsewhere}: not in a DVC project"), line


# ----------------------------------------------------------------------------- real server


@pytest.mark.e2e
def test_scheduled_run_with_nothing_changed_skips_every_stage(server, proj):
    ckpt = {name: _fingerprint(proj / "outputs/train" / name) for name in ("last.pt", "best.pt")}
    lock = (proj / "dvc.lock").read_text()
    before = _project_state(proj)
    # every 30 s: the first run (~10-15 s here) is stopped before the next one is due
    serve = _serve(proj, server, "idle", cron="* * * * * */30")
    try:
        with temporary_settings(updates={PREFECT_API_URL: server}):
            with get_client(sync_client=True) as client:
                deployment_id = _deployment_id(client, "idle")

                def finished():
                    # the first run that started (runs due while it runs are skipped)
                    runs = _deployment_runs(client, deployment_id)
                    started = [r for r in runs if r.run_count > 0]
                    assert started and started[0].state.is_final(), "no finished run yet"
                    return started[0]

                run = _eventually(finished, timeout=180, every=1)
                _stop(serve)
                assert run.state.is_completed(), run.state
                # from the time the schedule set to the end: picking it up, starting a
                # process, its workspace (git, outputs linked from the cache), eight `dvc
                # status`, the experiment saved into the project, the metrics artifacts
                took = (run.end_time - run.expected_start_time).total_seconds()
                print(f"no-change scheduled run: {took:.1f} s after its scheduled time")
                assert took < 60, took
                assert _eventually(lambda: _stage_table(client, run.id)) == {
                    s: "up to date" for s in STAGES
                }
                tasks = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                    limit=50,
                    sort=TaskRunSort.EXPECTED_START_TIME_ASC,
                )
                assert [t.name for t in tasks if t.task_key.startswith("dvc_stage")] == STAGES
    finally:
        _stop(serve)
    # no training happened: the checkpoints are the same files, untouched
    assert {n: _fingerprint(proj / "outputs/train" / n) for n in ckpt} == ckpt
    assert (proj / "dvc.lock").read_text() == lock
    _assert_consistent(proj)
    _unchanged(proj, before)
    # the run is an experiment of the project's commit, with its params
    (exp,) = _experiments(proj).values()
    assert exp["params"] == yaml.safe_load((proj / "params.yaml").read_text())
    (ref,) = git(proj, "for-each-ref", "--format=%(refname)", "refs/exps").split()
    files = git(proj, "ls-tree", "-r", "--name-only", ref).split()
    assert ".seg-run.lock" not in files  # the workspace's liveness lock is not a result


@pytest.fixture
def cpu_load() -> Iterator[int]:
    """A busy loop per core beside the test: every process of the test (server, `seg serve`,
    the run's process, `dvc`, `seg train`) gets a share of a saturated CPU."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    procs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores or 2)
    ]
    try:
        yield len(procs)
    finally:
        for p in procs:
            p.kill()
            p.wait()


NEWCOMERS = 3


def _overlap(server: str, proj: Path, collision: str) -> tuple:
    """`seg serve --collision COLLISION` on a project whose train stage is stale (a changed
    train param): a run due now; once its train stage runs (DVC's write lock on last.pt),
    NEWCOMERS more runs due within 2 s, so they come due while it trains and the runner
    fetches them together. The runs bring train up to date (`targets`), no more. Returns
    (first, newcomers, the first's train task run), all ended, and stops serving. The
    deployment's own cron never fires during the test."""
    _set_param(proj, "train", "iterations", 6)
    git(proj, "commit", "-q", "-am", "6 iterations")  # a run takes the branch's tip
    serve = _serve(proj, server, collision, "--collision", collision, cron="0 0 1 1 *")
    try:
        with get_client(sync_client=True) as client:
            deployment_id = _deployment_id(client, collision)
            only_train = {"targets": ["train"]}
            first = client.create_flow_run_from_deployment(deployment_id, parameters=only_train)
            _wait_for_train(proj, serve, proj.parent / f"serve-{collision}.log")
            due = datetime.now(UTC)
            newcomers = [
                client.create_flow_run_from_deployment(
                    deployment_id,
                    parameters=only_train,
                    state=Scheduled(scheduled_time=due + timedelta(seconds=i)),
                )
                for i in range(NEWCOMERS)
            ]

            def ended():
                runs = [client.read_flow_run(r.id) for r in (first, *newcomers)]
                assert all(r.state.is_final() for r in runs), _describe(client, runs)
                return runs

            first, *newcomers = _eventually(ended, timeout=480, every=1)

            def train_ended():
                tasks = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[first.id])),
                    limit=50,
                    sort=TaskRunSort.EXPECTED_START_TIME_ASC,
                )
                (train,) = [t for t in tasks if t.name == "train"]
                assert train.end_time, train.state
                return train

            return first, newcomers, _eventually(train_ended)
    finally:
        _stop(serve)


def _assert_never_overlapped(client, runs, newcomers, train) -> tuple:
    """The newcomers came due while the first trained; no two runs were ever Running at
    the same time, as each run's state history says. Returns the first's Running span."""
    for r in newcomers:
        assert train.start_time < r.expected_start_time < train.end_time, _describe(client, runs)
    spans = sorted(span for r in runs for span in running_intervals(client, r.id))
    assert all(end is not None for _, end in spans), _describe(client, runs)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), _describe(
        client, runs
    )
    (first_span,) = running_intervals(client, runs[0].id)
    took = (train.end_time - train.start_time).total_seconds()
    # shown by `pytest -s`: how long train took, the order the runs took the slot
    print(f"train stage: {took:.1f} s\n{_describe(client, runs)}")
    return first_span


def _trained_six(proj: Path) -> list[dict]:
    """The project's experiments that trained the committed 6 iterations."""
    exps = _experiments(proj).values()
    return [e for e in exps if e["params"]["train"]["iterations"] == 6]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.soak  # past CI's budget (make test-soak): two minutes under a CPU load
def test_overlapping_scheduled_runs_skip_the_newcomer(server, proj, cpu_load):
    with temporary_settings(updates={PREFECT_API_URL: server}):
        first, newcomers, train = _overlap(server, proj, "skip")
        with get_client(sync_client=True) as client:
            runs = [first, *newcomers]
            assert first.state.is_completed(), _describe(client, runs)
            _assert_never_overlapped(client, runs, newcomers, train)
            for r in newcomers:
                # turned away at once, while the first still trained, and never started
                assert r.state.is_cancelled(), _describe(client, runs)
                assert r.state.message == "Deployment concurrency limit reached."
                assert r.state.timestamp < train.end_time
                assert r.run_count == 0 and not running_intervals(client, r.id)
            table = _eventually(lambda: _stage_table(client, first.id))
    assert table == {s: "ran" if s == "train" else "up to date" for s in TRAIN_PLAN}
    # the first run is the one experiment; the project itself is as committed
    assert len(_trained_six(proj)) == 1, _experiments(proj)
    assert not list(proj.glob(".dvc/tmp/seg/runs/*"))
    assert git(proj, "status", "--porcelain") == ""


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.soak  # past CI's budget (make test-soak): two minutes under a CPU load
def test_overlapping_scheduled_runs_queue_the_newcomer(server, proj, cpu_load):
    with temporary_settings(updates={PREFECT_API_URL: server}):
        first, newcomers, train = _overlap(server, proj, "queue")
        with get_client(sync_client=True) as client:
            runs = [first, *newcomers]
            assert all(r.state.is_completed() for r in runs), _describe(client, runs)
            _, first_end = _assert_never_overlapped(client, runs, newcomers, train)
            for r in newcomers:
                # it waited for the slot while the first ran, then ran after it (in any
                # order among themselves: each retries for the slot on its own)
                waits = [
                    s.timestamp
                    for s in run_states(client, r.id)
                    if s.name == "AwaitingConcurrencySlot"
                ]
                assert waits and min(waits) < first_end, _describe(client, runs)
                (span,) = running_intervals(client, r.id)
                assert span[0] >= first_end
                # and found everything up to date: the first run's experiment, of the same
                # commit and params, was reused
                assert _eventually(lambda r=r: _stage_table(client, r.id)) == {
                    s: "up to date" for s in TRAIN_PLAN
                }
    # one experiment a run, all of the committed params; the project itself as committed
    assert len(_trained_six(proj)) == 1 + NEWCOMERS, _experiments(proj)
    assert not list(proj.glob(".dvc/tmp/seg/runs/*"))
    assert git(proj, "status", "--porcelain") == ""


@pytest.mark.e2e
def test_changed_param_reruns_train_and_evaluate_as_an_experiment(server, proj):
    shards = {s: _fingerprint(proj / f"data/shards/{s}/manifest.parquet") for s in ("train", "val")}
    metrics_before = _md5(proj / "outputs/eval/metrics.json")
    with temporary_settings(updates={PREFECT_API_URL: server}):
        result = CliRunner().invoke(app, ["flow", "-S", "train.lr=0.02", "--log-every", "2"])
        assert result.exit_code == 0, result.output
        APILogWorker.drain_all(timeout=20)
        EventsWorker.drain_all(timeout=20)
        with get_client(sync_client=True) as client:
            (run,) = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(is_null_=True)
                ),
                limit=1,
                sort=FlowRunSort.START_TIME_DESC,
            )
            assert run.parameters == {
                "targets": None, "overrides": ["train.lr=0.02"], "log_every": 2,
                "commit": None, "branch": None, "limits": None, "workspace": False,
                "trial": None, "promote": None,
            }  # fmt: skip
            table = _eventually(lambda: _stage_table(client, run.id))

            def train_logs():
                logs = client.read_logs(
                    log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])),
                    limit=200,
                    offset=0,
                )
                text = "\n".join(log.message for log in logs)
                assert "step 4: val mIoU" in text, text
                return text

            text = _eventually(train_logs)
            artifacts = _artifacts(client, run.id)
    # only train and evaluate reran (and `params`, the check of params.yaml itself)
    assert table == {
        "params": "ran", "working_point": "up to date", "synth": "up to date",
        "preprocess@train": "up to date",
        "preprocess@val": "up to date", "train": "ran", "evaluate": "ran",
        "kfold_split": "up to date", "kfold_summary": "up to date",
    }  # fmt: skip
    assert "train: ran" in result.output and "synth: up to date" in result.output
    assert {s: _fingerprint(proj / f"data/shards/{s}/manifest.parquet") for s in shards} == shards
    # training progress reached the run logs every --log-every steps
    assert "step 2/4" in text and "step 4/4" in text and "step 3/4" not in text
    assert "params.yaml: train modified" in text  # why train ran, from dvc status

    # dvc.lock records the new metrics
    metrics = proj / "outputs/eval/metrics.json"
    lock = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]["evaluate"]
    (recorded,) = [o["md5"] for o in lock["outs"] if o["path"] == "outputs/eval/metrics.json"]
    assert recorded == _md5(metrics) != metrics_before
    assert yaml.safe_load((proj / "params.yaml").read_text())["train"]["lr"] == 0.02
    _assert_consistent(proj)

    # the experiment, as `dvc exp show` lists it
    name = re.search(r"experiment (\S+) \(dvc exp show\)", result.output).group(1)
    rows = json.loads(dvc(proj, "exp", "show", "--json").stdout)
    (head,) = [r for r in rows if r["rev"] != "workspace"]
    exps = {e["name"]: e for group in head["experiments"] for e in group["revs"]}
    data = exps[name]["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["lr"] == 0.02
    miou = json.loads(metrics.read_text())["miou"]
    assert data["metrics"]["outputs/eval/metrics.json"]["data"]["miou"] == miou

    # the UI's artifacts: the stage table, the per-class IoU table and the summary
    assert {"dvc-stages", "per-class-iou", "evaluation-summary"} <= set(artifacts)
    assert f"mIoU {100 * miou:.2f}" in artifacts["evaluation-summary"].data
    assert "evaluated in this run" in artifacts["evaluation-summary"].data


@pytest.mark.e2e
def test_deployment_on_a_process_work_pool_runs_on_a_worker(server, proj, tmp_path):
    from prefect.client.schemas.actions import WorkPoolCreate

    pool = "cpu-pool"
    with temporary_settings(updates={PREFECT_API_URL: server}):
        with get_client(sync_client=True) as client:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        env = _proc_env(proj, PREFECT_API_URL=server)
        deployed = subprocess.run(
            [str(BIN / "seg"), "deploy", "--pool", pool, "--name", "gpu-nightly",
             "--cron", "0 3 * * *", "--timezone", "Europe/Berlin"],
            cwd=proj, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        assert f"on work pool '{pool}'" in deployed.stdout + deployed.stderr
        # a clone per host (--workdir '$NAME'): the pull step comes with the deployment's first
        # request (applied, then updated, a run picked up between went to a temporary folder)
        pooled = subprocess.run(
            [str(BIN / "seg"), "deploy", "--pool", pool, "--name", "pooled", "--workdir",
             "$SEG_CLONE"], cwd=proj, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert pooled.returncode == 0, pooled.stdout + pooled.stderr
        with get_client(sync_client=True) as client:
            d = client.read_deployment_by_name("seg-pipeline/pooled")
            assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {
                "directory": "{{ $SEG_CLONE }}"}}]  # fmt: skip
            assert "working_dir" not in d.job_variables and not d.path
        # the worker runs elsewhere; the deployment says where the project is
        elsewhere = tmp_path / "worker-cwd"
        elsewhere.mkdir()
        worker = _start(
            [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
            elsewhere,
            {**env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"},
            tmp_path / "worker.log",
        )
        try:
            with get_client(sync_client=True) as client:
                d = client.read_deployment_by_name("seg-pipeline/gpu-nightly")
                assert d.work_pool_name == pool
                assert d.job_variables == {
                    "working_dir": str(proj),
                    "env": {
                        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",  # zombie-run detection
                        "PREFECT_UI_URL": server.removesuffix("/api"),  # no credentials
                    },
                }
                assert d.entrypoint == "stages.flows.pipeline_flow"
                assert d.global_concurrency_limit.limit == 1
                assert d.concurrency_options.collision_strategy == "CANCEL_NEW"
                [schedule] = d.schedules
                assert (schedule.schedule.cron, schedule.schedule.timezone) == (
                    "0 3 * * *", "Europe/Berlin",
                )  # fmt: skip
                run = client.create_flow_run_from_deployment(d.id)
                r = wait_final(client, run.id, timeout=180, every=1)
                log = (tmp_path / "worker.log").read_text()
                assert r.state.is_completed(), f"{r.state}\n{log}"
                assert r.work_pool_name == pool
                assert _eventually(lambda: _stage_table(client, r.id)) == {
                    s: "up to date" for s in STAGES
                }
        finally:
            _stop(worker)
    assert "seg-pipeline" in log


def _rwlock_holder(proj: Path, out: str) -> dict | None:
    """Who holds DVC's write lock on `out` (a stage that writes it is running), if anyone: in
    the project itself, or in the workspace of one of its deployment's runs."""
    for rwlock in [proj / ".dvc/tmp/rwlock", *proj.glob(".dvc/tmp/seg/runs/*/.dvc/tmp/rwlock")]:
        try:
            lock = json.loads(rwlock.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        holder = next((v for k, v in lock.get("write", {}).items() if k.endswith(out)), None)
        if holder:
            return holder
    return None


def _experiments(proj: Path) -> dict[str, dict]:
    """The project's experiments (`dvc exp show`): name -> {"params", "metrics"}."""
    rows = json.loads(dvc(proj, "exp", "show", "--json").stdout)
    return {
        e["name"]: {
            "params": e["data"]["params"]["params.yaml"]["data"],
            "metrics": {k: v["data"] for k, v in e["data"]["metrics"].items()},
        }
        for row in rows if row["rev"] != "workspace"
        for group in row.get("experiments") or [] for e in group["revs"]
    }  # fmt: skip


def _unchanged(proj: Path, before: tuple) -> None:
    """The project is as it was (HEAD, branches, index, working copy, dvc.lock), and no
    workspace of a run is left."""
    assert _project_state(proj) == before
    assert not list(proj.glob(".dvc/tmp/seg/runs/*")), list(proj.glob(".dvc/tmp/seg/runs/*"))


def _project_state(proj: Path) -> tuple:
    refs = [r for r in git(proj, "for-each-ref").splitlines() if "refs/exps/" not in r]
    return (git(proj, "status", "--porcelain"), refs, (proj / "dvc.lock").read_bytes(),
            (proj / "params.yaml").read_bytes())  # fmt: skip


def _wait_for_train(proj: Path, proc: subprocess.Popen, log: Path) -> dict:
    def training():
        assert proc.poll() is None, log.read_text()
        holder = _rwlock_holder(proj, "outputs/train/last.pt")
        assert holder, "train is not running yet"
        return holder

    return _eventually(training, timeout=180, every=0.2)


@pytest.mark.e2e
def test_manual_dvc_repro_during_a_flow_fails_naming_what_holds_the_lock(server, proj):
    _set_param(proj, "train", "iterations", 6)
    log = proj.parent / "flow.log"
    flow = _start([str(BIN / "seg"), "flow"], proj, _proc_env(proj, PREFECT_API_URL=server), log)
    try:
        holder = _wait_for_train(proj, flow, log)
        assert "repro --single-item train" in holder["cmd"], holder
        manual = dvc(proj, "repro", check=False)
        assert flow.wait(timeout=300) == 0, log.read_text()
    finally:
        _stop(flow)
    assert manual.returncode != 0
    text = manual.stdout + manual.stderr
    # it stopped at the first stage that touches what the flow's train holds (DVC locks a
    # stage's deps and outs before checking whether it changed), naming the holder
    assert re.search(
        r"ERROR: failed to reproduce '[^']+': '[^']+' is busy, it is being blocked by:", text
    ), text
    assert f"(PID {holder['pid']}): {holder['cmd']}" in text, text
    assert "train: ran" in log.read_text()
    _assert_consistent(proj)  # the flow's results are whole and in dvc.lock


@pytest.mark.e2e
@pytest.mark.slow  # `make test-slow` (and CI) runs it
def test_flow_during_a_manual_dvc_repro_fails_in_one_line(server, proj):
    _set_param(proj, "train", "iterations", 6)
    log = proj.parent / "repro.log"
    manual = _start([DVC, "repro"], proj, _proc_env(proj), log)
    try:
        _wait_for_train(proj, manual, log)
        with temporary_settings(updates={PREFECT_API_URL: server}):
            result = CliRunner().invoke(app, ["flow"])
        assert manual.wait(timeout=300) == 0, log.read_text()
    finally:
        _stop(manual)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    # the first stage whose files the manual run holds: train (its outputs are being written)
    assert re.fullmatch(
        rf"error: dvc stage train: '{re.escape(str(proj.resolve()))}/outputs/train/[^']+' is "
        rf"busy, it is being blocked by \(PID {manual.pid}\): {re.escape(DVC)} repro",
        errors[0],
    ), errors[0]
    _assert_consistent(proj)  # the manual repro's results are whole and in dvc.lock


@pytest.mark.e2e
@pytest.mark.slow  # `make test-slow` (and CI) runs it
def test_flow_trains_on_several_processes_when_the_stage_command_says_so(server, proj):
    """Multi-GPU under the flow is the train stage's command (`--gpus N`, torchrun); here 2
    gloo processes on CPU. DVC sees the changed command and reruns train, nothing before it."""
    graph = (proj / "dvc.yaml").read_text()
    assert "cmd: seg train --auto-resume\n" in graph
    (proj / "dvc.yaml").write_text(
        graph.replace("cmd: seg train --auto-resume\n", "cmd: seg train --auto-resume --gpus 2\n")
    )
    _set_param(proj, "train", "batch_size", 4)  # 2 images per process
    log = proj.parent / "flow.log"
    flow = _start(
        [str(BIN / "seg"), "flow", "train"], proj, _proc_env(proj, PREFECT_API_URL=server), log
    )
    assert flow.wait(timeout=300) == 0, log.read_text()
    text = log.read_text()
    assert "train: changed command" in text or "train: changed deps" in text, text
    # torchrun's banner, printed only when it starts more than one process
    assert "Setting OMP_NUM_THREADS environment variable for each process" in text, text
    assert "train: ran" in text and "synth: up to date" in text, text
    assert "evaluate" not in text.split("stages in order:")[1].splitlines()[0]
    stale = json.loads(dvc(proj, "status", "--json").stdout)
    # not asked for, as with `dvc repro train`: evaluate (its checkpoint changed) and the
    # params check (params.yaml changed)
    assert set(stale) == {"params", "evaluate", "working_point"}, stale


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"PREFECT_API_URL": "http://seg:p%40ss@h:4200/api"},
         {"PREFECT_API_URL": "http://h:4200/api", "PREFECT_API_AUTH_STRING": "seg:p@ss"}),
        ({"PREFECT_API_URL": "http://seg:pw@h/api", "PREFECT_API_AUTH_STRING": "a:b"},
         {"PREFECT_API_URL": "http://h/api", "PREFECT_API_AUTH_STRING": "a:b"}),
        ({"PREFECT_API_URL": "http://h:4200/api"}, {"PREFECT_API_URL": "http://h:4200/api"}),
        ({}, {}),
    ],
)  # fmt: skip
def test_credentials_in_the_api_url_move_to_the_auth_string(env, expected):
    """Prefect's event stream (a served deployment's runner) reads credentials only from
    PREFECT_API_AUTH_STRING: `seg` moves them there from the URL before Prefect starts."""
    from stages.cli import credentials_out_of_the_url

    credentials_out_of_the_url(env)
    assert env == expected


@pytest.fixture(scope="module")
def auth_server(scratch) -> Iterator[tuple[int, str]]:
    """A real `prefect server` that wants Basic credentials (PREFECT_SERVER_API_AUTH_STRING):
    (its port, the password)."""
    from servers import PrefectServer

    password = "s3cret-pw-42"
    server = PrefectServer(
        scratch("prefect-auth"), PREFECT_SERVER_API_AUTH_STRING=f"seg:{password}"
    )
    server.start()
    try:
        yield server.port, password
    finally:
        server.stop()


@pytest.mark.e2e
@pytest.mark.slow
# past CI's budget (make test-soak): a server of its own, 90 s here; CI's fast tier checks the
# credentials' move out of the URL (test_credentials_in_the_api_url_move_to_the_auth_string)
@pytest.mark.soak
def test_credentials_in_the_api_url_are_never_printed(auth_server, proj, tmp_path):
    """PREFECT_API_URL=http://user:password@host/api: `seg flow`, `seg deploy` and `seg serve`
    work and print the URL without the password (Prefect's own "View at" lines too); a wrong
    password is one line before any work."""
    from prefect.client.schemas.actions import WorkPoolCreate

    port, password = auth_server
    api = f"http://seg:{password}@127.0.0.1:{port}/api"
    env = _proc_env(proj, PREFECT_API_URL=api, PREFECT_RUNNER_POLL_FREQUENCY="1")
    with temporary_settings(updates={PREFECT_API_URL: api}):
        with get_client(sync_client=True) as client:
            client.create_work_pool(WorkPoolCreate(name="auth-pool", type="process"))

    def seg(*args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "seg"), *args], cwd=proj, env={**env, **kw},
                              capture_output=True, text=True, timeout=300)  # fmt: skip

    outputs = []
    done = seg("flow", "evaluate")
    outputs.append(done.stdout + done.stderr)
    assert done.returncode == 0, outputs[-1]
    assert f"runs at http://127.0.0.1:{port}/api" in outputs[-1]
    assert f"View at http://127.0.0.1:{port}/runs/flow-run/" in outputs[-1]
    done = seg("deploy", "--pool", "auth-pool", "--name", "auth")
    outputs.append(done.stdout + done.stderr)
    assert done.returncode == 0, outputs[-1]
    assert f"at http://127.0.0.1:{port}/api" in outputs[-1]
    serve = _start([str(BIN / "seg"), "serve", "--name", "auth-served", "--cron", "0 3 * * *"],
                   proj, env, tmp_path / "serve.log")  # fmt: skip
    try:
        with temporary_settings(updates={PREFECT_API_URL: api}):
            with get_client(sync_client=True) as client:
                deployment_id = _deployment_id(client, "auth-served")
                run = client.create_flow_run_from_deployment(deployment_id)

                def finished():
                    r = client.read_flow_run(run.id)
                    assert r.state.is_final(), r.state
                    return r

                assert _eventually(finished, timeout=180, every=1).state.is_completed()
    finally:
        _stop(serve)
    outputs.append((tmp_path / "serve.log").read_text())
    assert f"View at http://127.0.0.1:{port}/runs/flow-run/" in outputs[-1], outputs[-1]
    for text in outputs:
        assert password not in text, text
    # a wrong password: one line, before any work
    wrong = f"http://seg:nope@127.0.0.1:{port}/api"
    for args in (["flow"], ["deploy", "--pool", "auth-pool"], ["serve"]):
        done = seg(*args, PREFECT_API_URL=wrong)
        assert done.returncode == 1, done.stdout + done.stderr
        assert (done.stdout + done.stderr).strip().splitlines() == [
            f"error: Prefect API at http://127.0.0.1:{port}/api refused the credentials (HTTP "
            "401): set PREFECT_API_AUTH_STRING=user:password (a server with "
            "PREFECT_SERVER_API_AUTH_STRING) or PREFECT_API_KEY (Prefect Cloud)"
        ], done.stdout + done.stderr
        assert "nope" not in done.stdout + done.stderr


@pytest.mark.e2e
def test_a_stale_dvc_lock_of_a_reused_pid_does_not_block_seg_flow(server, proj):
    """DVC's rwlock names a PID that now belongs to another process (after a reboot): DVC
    counts it alive and every run would stop at "is busy"; `seg flow` removes the entry,
    says so, and runs."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        time.sleep(0.5)
        rwlock = proj / ".dvc" / "tmp" / "rwlock"
        rwlock.parent.mkdir(parents=True, exist_ok=True)
        entry = {"pid": other.pid, "cmd": f"{DVC} repro"}
        rwlock.write_text(json.dumps({"write": {str(proj / "outputs/train/last.pt"): entry}}))
        os.utime(rwlock, (time.time() - 3600, time.time() - 3600))  # written before it started
        busy = dvc(proj, "status", "train", check=False)
        assert busy.returncode != 0 and f"(PID {other.pid})" in busy.stdout + busy.stderr
        with temporary_settings(updates={PREFECT_API_URL: server}):
            result = CliRunner().invoke(app, ["flow", "train"])
    finally:
        other.kill()
        other.wait()
    assert result.exit_code == 0, result.output
    assert "train: up to date" in result.output
    assert f"named PID {other.pid} ({DVC} repro), a process that is gone: the PID started " in (
        result.output
    ), result.output
    lock = json.loads(rwlock.read_text())
    assert lock["write"] == {}, lock

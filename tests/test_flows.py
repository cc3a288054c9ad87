"""The Prefect flows against a real local Prefect server: the pipeline's runs, logs and
artifacts read back through the API, a scheduled deployment, and a one-line error when the
server is down."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    LogFilter,
    LogFilterFlowRunId,
    TaskRunFilter,
)
from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort, TaskRunSort
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, temporary_settings
from typer.testing import CliRunner

from stages.cli import app

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _eventually(check: Callable[[], object], timeout: float = 30.0):
    """Task-run states and logs reach the API in the background: poll until `check` passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    # what `seg flow` sets with os.environ.setdefault; set here so it is undone after each test
    monkeypatch.setenv("PREFECT_LOGGING_EXTRA_LOGGERS", "seg")


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    """A project folder with params.yaml shrunk to seconds of CPU work; the cwd of the test."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["synth"].update(train=4, val=2, height=64, width=128)
    raw["preprocess"]["workers"] = 1
    raw["train"].update(
        iterations=4, batch_size=2, crop_size=[64, 64], val_interval=4, checkpoint_interval=2,
        workers=0,
    )  # fmt: skip
    raw["evaluate"]["batch_size"] = 2
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(proj)
    return proj


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny convolutions on a shared CPU: more torch threads than free cores is 5-10x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    """A real `prefect server start` on a free loopback port, with its own home and database."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
    }
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(port), "--no-ui", "--analytics-off"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prefect server exited {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server not healthy after 90 s:\n{log.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn/service children
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ----------------------------------------------------------------------------- no server


@pytest.mark.parametrize("command", [["flow", "evaluate"], ["flow"], ["serve"]])
def test_unreachable_server_is_one_line_error_before_any_work(project, command):
    dead = f"http://127.0.0.1:{_free_port()}/api"
    with temporary_settings(updates={PREFECT_API_URL: dead}):
        result = CliRunner().invoke(app, command)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: Prefect API at " + dead + " is unreachable")
    assert "prefect server start" in lines[0]
    assert sorted(p.name for p in project.iterdir()) == ["params.yaml"]  # nothing was run


def test_serve_rejects_a_bad_cron_in_one_line(project):
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = CliRunner().invoke(app, ["serve", "--cron", "61 * * * *"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: --cron '61 * * * *' --timezone None: Invalid cron string: \"61 * * * *\""
    ]


# ----------------------------------------------------------------------------- real server


@pytest.mark.e2e
def test_pipeline_flow_runs_show_up_with_logs_and_artifacts(server, project, one_thread):
    with temporary_settings(updates={PREFECT_API_URL: server}):
        result = CliRunner().invoke(app, ["flow", "pipeline", "--log-every", "2"])
        assert result.exit_code == 0, result.output
        metrics = json.loads((project / "outputs/eval/metrics.json").read_text())

        # send queued logs and task-run events now, while the server is up (and not at exit)
        APILogWorker.drain_all(timeout=20)
        EventsWorker.drain_all(timeout=20)
        with get_client(sync_client=True) as client:
            # limit and sort spelled out: this server answers 422 to the client's nulls
            flow_runs = client.read_flow_runs(limit=50, sort=FlowRunSort.START_TIME_ASC)
            runs = {client.read_flow(r.flow_id).name: r for r in flow_runs}
            assert set(runs) == {
                "seg-pipeline", "seg-synth", "seg-preprocess", "seg-train", "seg-evaluate",
            }  # fmt: skip
            assert all(r.state.is_completed() for r in runs.values())
            assert runs["seg-pipeline"].parameters == {
                "params": "params.yaml", "overrides": [], "resume": True, "log_every": 2, "gpus": 0,
            }  # fmt: skip
            assert runs["seg-pipeline"].parent_task_run_id is None
            assert runs["seg-evaluate"].parent_task_run_id is not None  # a subflow

            def task_runs():
                tasks = {
                    t.name.rsplit("-", 1)[0]: t
                    for t in client.read_task_runs(
                        limit=50, sort=TaskRunSort.EXPECTED_START_TIME_ASC
                    )
                }
                assert {"synthesize", "write-shards", "train-model", "publish-metrics"} <= set(
                    tasks
                ), tasks
                return tasks

            tasks = _eventually(task_runs)
            assert tasks["write-shards"].empirical_policy.retries == 2  # I/O may fail
            assert tasks["train-model"].empirical_policy.retries == 0  # resume, don't retry

            def train_logs():
                logs = client.read_logs(
                    log_filter=LogFilter(
                        flow_run_id=LogFilterFlowRunId(any_=[runs["seg-train"].id])
                    ),
                    limit=200,
                    offset=0,
                )
                text = "\n".join(log.message for log in logs)
                assert "step 4: val mIoU" in text, text
                return text

            text = _eventually(train_logs)
            assert "step 2/4" in text and "step 4/4" in text
            assert "step 3/4" not in text  # every --log-every steps, not every step

            artifacts = {
                a.key: a
                for a in client.read_artifacts(
                    artifact_filter=ArtifactFilter(),
                    flow_run_filter=FlowRunFilter(),
                    task_run_filter=TaskRunFilter(),
                    limit=50,
                    offset=0,
                    sort=ArtifactSort.KEY_ASC,
                )
            }
    table, summary = artifacts["per-class-iou"], artifacts["evaluation-summary"]
    assert (table.type, summary.type) == ("table", "markdown")
    assert table.flow_run_id == summary.flow_run_id == runs["seg-evaluate"].id
    data = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [row["class"] for row in data] == list(metrics["per_class_iou"])
    prov = metrics["provenance"]
    assert f"mIoU {100 * metrics['miou']:.2f}" in summary.data
    for value in (prov["checkpoint"]["sha256"], prov["params_hash"], prov["data"]["sha256"]):
        assert value in summary.data


@pytest.mark.e2e
def test_deployment_has_the_cron_schedule(server):
    from stages import flows

    with temporary_settings(updates={PREFECT_API_URL: server}):
        deployment = flows.deployment(
            "nightly", "0 3 * * *", "Europe/Berlin", overrides=["train.lr=0.02"]
        )
        deployment_id = deployment.apply()
        with get_client(sync_client=True) as client:
            d = client.read_deployment_by_name("seg-pipeline/nightly")
    assert d.id == deployment_id
    assert d.entrypoint == "stages.flows.pipeline_flow"
    assert d.parameters == {"params": "params.yaml", "overrides": ["train.lr=0.02"]}
    [schedule] = d.schedules
    assert schedule.active
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 3 * * *", "Europe/Berlin")


@pytest.mark.e2e
def test_server_schedules_runs_of_the_deployment(server):
    from stages import flows

    with temporary_settings(updates={PREFECT_API_URL: server}):
        deployment_id = flows.deployment("every-minute", "* * * * *").apply()

        def scheduled():
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                    limit=5,
                    sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                )
            assert runs, "no scheduled runs yet"
            return runs

        runs = _eventually(scheduled, timeout=30)
    assert all(r.state.is_scheduled() for r in runs)
    assert all(r.parameters == {"params": "params.yaml", "overrides": []} for r in runs)

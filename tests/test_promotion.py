"""Scheduled runs through the promotion gate, end to end: a real `prefect server` (the
session's), a process worker, a bare git origin, a DVC remote in a folder and a webhook
receiver on 127.0.0.1. The deployment (`seg deploy --promote prod --notify URL`) registers
each run's experiment as a version and gates it against prod's holder:

    run 1  the learned recipe                      -> the first version takes prod
    run 2  the same recipe, another seed           -> not promoted (ΔmIoU's interval spans 0)
    run 3  twice the steps                         -> promoted; its tag on origin; another
                                                      clone's `seg predict --model deeplab#prod`
                                                      uses its weights and names its version
    run 4  lr 1e-6 (nothing learned)               -> a regression: the run fails, the
                                                      webhook gets exactly one call
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import LEARN
from helpers import eventually, run_logs, start, stop, wait_final
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from test_dvc import _env, _new_project, dvc, git

# four scheduled runs through the gate: 6.5 min here, past CI's budget (make test-soak)
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.soak]

BIN = Path(sys.executable).parent
# the learned recipe at half its steps (150): a run learns in seconds; run 3 doubles it
RECIPE = {**LEARN, "train.iterations": 150, "train.val_interval": 150,
          "train.checkpoint_interval": 150}  # fmt: skip


class Hook(BaseHTTPRequestHandler):
    calls: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        Hook.calls.append({"path": self.path, "body": body.decode(errors="replace")})
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    server = HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Hook.calls = []
    try:
        yield f"http://127.0.0.1:{server.server_port}/hook"
    finally:
        server.shutdown()


def test_scheduled_runs_promote_only_what_the_gate_passes(prefect_server, webhook, tmp_path):
    api = prefect_server.url
    origin, storage = tmp_path / "origin.git", tmp_path / "dvc-storage"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    a = _new_project(tmp_path / "A", **RECIPE)
    dvc(a, "remote", "add", "-d", "storage", str(storage))
    dvc(a, "repro", "synth", "preprocess@train", "preprocess@val")  # the data, in the commit
    git(a, "add", "-A")
    git(a, "commit", "-q", "-m", "data")
    git(a, "remote", "add", "origin", f"file://{origin}")
    git(a, "push", "-q", "-u", "origin", "main")
    dvc(a, "push")
    (a / "outputs").mkdir(exist_ok=True)
    home = tmp_path / "A-home"
    env = {**_env(home), "PREFECT_API_URL": api, "PYTHONPATH": str(a)}
    with temporary_settings(updates={PREFECT_API_URL: api}):
        from prefect.client.schemas.actions import WorkPoolCreate

        with get_client(sync_client=True) as client:
            client.create_work_pool(WorkPoolCreate(name="gate-pool", type="process"))
    deployed = subprocess.run(
        [str(BIN / "seg"), "deploy", "--pool", "gate-pool", "--name", "gated", "--promote",
         "prod", "--notify", webhook, "--collision", "queue"],
        cwd=a, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    worker = start(
        [str(BIN / "prefect"), "worker", "start", "--pool", "gate-pool", "--type", "process"],
        tmp_path, {**env, "PREFECT_WORKER_QUERY_SECONDS": "1"}, tmp_path / "worker.log",
    )  # fmt: skip
    runs = {}
    try:
        with temporary_settings(updates={PREFECT_API_URL: api}):
            with get_client(sync_client=True) as client:
                d = client.read_deployment_by_name("seg-pipeline/gated")
                plan = [("first", []), ("seed", ["train.seed=1"]),
                        ("longer", ["train.iterations=300", "train.val_interval=300",
                                    "train.checkpoint_interval=300"]),
                        ("nothing learned", ["train.lr=1e-6", "train.min_lr=0"])]  # fmt: skip
                for what, overrides in plan:
                    made = client.create_flow_run_from_deployment(
                        d.id, parameters={"overrides": overrides}
                    )
                    r = wait_final(client, made.id, timeout=600)
                    # the run's last line before its state's: its workspace removed
                    runs[what] = (r, run_logs(client, r.id, " removed\n", timeout=60))
                hooked = eventually(lambda: _one(Hook.calls), timeout=60)
    finally:
        stop(worker)
    first, seed, longer, broken = (runs[k] for k in ("first", "seed", "longer", "nothing learned"))
    assert first[0].state.is_completed(), first[1]
    assert "registered deeplab@v0.1.0" in first[1] and "deeplab#prod" in first[1], first[1]
    assert seed[0].state.is_completed(), seed[1]
    assert seed[0].state.message.startswith("not promoted: ΔmIoU "), seed[0].state
    assert "(min_gain 0.0)" in seed[0].state.message
    assert longer[0].state.is_completed() and longer[0].state.message in (None, ""), longer[1]
    assert broken[0].state.is_failed(), broken[1]
    assert "regression: ΔmIoU " in broken[0].state.message, broken[0].state
    assert hooked["path"] == "/hook" and "regression" in hooked["body"], hooked
    # prod's tag on origin is run 3's version; another clone predicts with its weights
    tags = subprocess.run(["git", "ls-remote", "--tags", str(origin)], capture_output=True,
                          text=True, check=True).stdout  # fmt: skip
    assert "refs/tags/deeplab@v0.1.2" in tags and "refs/tags/deeplab#prod#2" in tags, tags
    c = tmp_path / "C"
    subprocess.run(["git", "clone", "-q", f"file://{origin}", str(c)], check=True)
    c_env = {**_env(tmp_path / "C-home"), "PYTHONPATH": str(c)}
    subprocess.run([str(BIN / "dvc"), "pull", "-q", "synth"], cwd=c, env=c_env, check=True)
    frames = sorted((c / "data/synthetic/leftImg8bit/val").rglob("*.png"))[:1]
    out = tmp_path / "pred"
    done = subprocess.run(
        [str(BIN / "seg"), "predict", str(frames[0]), "--model", "deeplab#prod", "--out",
         str(out)], cwd=c, env=c_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["registry"]["version"] == "v0.1.2", prov
    lock = yaml.safe_load(git(c, "show", "deeplab@v0.1.2:dvc.lock"))
    (md5,) = [o["md5"] for o in lock["stages"]["train"]["outs"]
              if o["path"] == "outputs/train/best.pt"]  # fmt: skip
    used = Path(prov["model"]["path"])
    used = used if used.is_absolute() else c / used
    assert hashlib.md5(used.read_bytes()).hexdigest() == md5


def _one(calls: list[dict]) -> dict:
    assert len(calls) == 1, calls
    return calls[0]

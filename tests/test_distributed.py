"""Multi-process training and evaluation (torchrun, gloo on CPU) through the real entry points.

The slow tests start real torchrun process groups on a tiny project (8 train / 4 val frames
of 64x128, 4 steps of a global batch of 4): two processes train and checkpoint, two
processes evaluate a checkpoint exactly like one, and a run started on two processes is
resumed on one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_project
from typer.testing import CliRunner

from stages import launch

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # a hang (one rank waiting for a batch or a collective) fails instead of blocking


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _seg(*args: str) -> list[str]:
    return [sys.executable, "-m", "stages.cli", *args]


@pytest.fixture(scope="module")
def proj(tmp_path_factory) -> Path:
    """A tiny project: shrunk params.yaml, synthetic frames, train and val shards."""
    return make_project(
        tmp_path_factory.mktemp("ddp") / "proj",
        **{"synth.train": 8, "synth.val": 4, "train.batch_size": 4, "train.val_interval": 4},
        **{"train.device": "cpu", "evaluate.batch_size": 1},
    )


@pytest.fixture(scope="module")
def trained(proj: Path) -> Path:
    """`seg train --gpus 2 -S train.device=cpu`: two gloo processes through torchrun."""
    _run(_seg("train", "--gpus", "2", "-S", "train.device=cpu"), proj)
    return proj / "outputs" / "train"


# ----------------------------------------------------------------------------- fast


def test_torchrun_command_one_node_uses_a_free_port():
    t = launch.Topology(nproc_per_node=2)
    cmd = launch.torchrun_command(t, launch.train_args("p.yaml", ["train.lr=0.1"], True))
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--master-port" not in cmd
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    i = cmd.index("-m", 3)
    assert cmd[i + 1 :] == [
        "stages.cli", "train", "--params", "p.yaml", "--set", "train.lr=0.1", "--resume",
    ]  # fmt: skip


def test_torchrun_command_multi_node():
    t = launch.Topology(8, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29501)
    cmd = launch.torchrun_command(t, ["train"])
    flags = dict(zip(cmd[3:-3:2], cmd[4:-3:2], strict=True))
    assert flags == {
        "--nproc-per-node": "8", "--nnodes": "2", "--node-rank": "1",
        "--master-addr": "10.0.0.1", "--master-port": "29501",
    }  # fmt: skip
    assert "--standalone" not in cmd


def test_bad_topology_is_rejected():
    with pytest.raises(launch.ConfigError, match="--master-addr"):
        launch.check_topology(launch.Topology(2, nnodes=2), "cpu")
    with pytest.raises(launch.ConfigError, match="--node-rank"):
        launch.check_topology(launch.Topology(2, nnodes=2, node_rank=2, master_addr="h"), "cpu")


def test_launch_propagates_the_exit_code():
    assert launch.run([sys.executable, "-c", "raise SystemExit(3)"]) == 3


def test_init_from_env_is_a_no_op_outside_torchrun(monkeypatch):
    from pipeline.engine import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    info = distributed.init_from_env("cpu")
    assert (info.rank, info.world_size, info.backend) == (0, 1, None)
    assert not torch.distributed.is_initialized()
    assert distributed.is_main() and not distributed.in_worker()
    distributed.cleanup()  # nothing to clean: no error


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_gpus_without_cuda_says_how_to_run_on_cpu(proj: Path):
    from stages.cli import app

    res = CliRunner().invoke(
        app, ["train", "--gpus", "2", "-p", str(proj / "params.yaml"), "-S", "train.device=auto"]
    )
    assert res.exit_code == 1
    assert "no CUDA device" in res.output and "train.device=cpu" in res.output


# ----------------------------------------------------------------------------- torchrun


def test_two_processes_train_and_checkpoint(trained: Path):
    from pipeline.engine.checkpoint import load

    ckpt = load(trained / "last.pt")
    assert ckpt["step"] == 4
    assert [h["step"] for h in ckpt["history"]] == [1, 2, 3, 4]
    assert "val_miou" in ckpt["history"][-1]  # the distributed val pass ran at step 4
    assert (trained / "best.pt").is_file() and (trained / "summary.json").is_file()
    assert not any(k.startswith("module.") for k in ckpt["model"])  # saved unwrapped from DDP


def test_two_process_eval_equals_one_process(trained: Path, proj: Path, tmp_path: Path):
    import json

    from pipeline.engine.distributed import evaluate_checkpoint

    ckpt, shards = trained / "best.pt", proj / "data" / "shards" / "val"
    t = launch.Topology(nproc_per_node=2)
    args = ["eval", "--checkpoint", str(ckpt), "--shards", str(shards), "--out", str(tmp_path)]
    _run(
        launch.torchrun_command(t, [*args, "--device", "cpu"], "pipeline.engine.distributed"), proj
    )
    dist_metrics = json.loads((tmp_path / "metrics.json").read_text())
    dist_confusion = json.loads((tmp_path / "confusion.json").read_text())["matrix"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1): same float sums
    try:
        metrics, acc = evaluate_checkpoint(ckpt, shards, device="cpu")
    finally:
        torch.set_num_threads(threads)
    assert dist_metrics["world_size"] == 2
    assert dist_metrics["images"] == metrics["images"] == 4
    assert dist_confusion == acc.confusion.cpu().tolist()
    assert dist_metrics["miou"] == metrics["miou"]


def test_resume_two_processes_on_one(proj: Path, tmp_path: Path):
    """Stop a 2-process run after step 2 (its checkpoint), resume it with 1 process to the end."""
    from pipeline.engine.checkpoint import load

    worker = tmp_path / "train_until.py"
    worker.write_text(
        "import sys\n"
        "from pipeline.engine import distributed\n"
        "from stages import steps\n"
        "distributed.init_from_env('cpu')\n"
        "try:\n"
        "    steps.train(steps.load('params.yaml', sys.argv[2:]), stop_after=int(sys.argv[1]))\n"
        "finally:\n"
        "    distributed.cleanup()\n"
    )
    out = tmp_path / "outputs"
    override = f"data.outputs={out}"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    _run([*torchrun, "--nproc-per-node", "2", str(worker), "2", override], proj)
    first = load(out / "train" / "last.pt")
    assert first["step"] == 2

    _run(_seg("train", "--resume", "-S", override), proj)
    last = load(out / "train" / "last.pt")
    assert last["step"] == 4
    # the first two steps are the 2-process run's (a fresh 1-process run would log other losses)
    assert last["history"][:2] == first["history"]
    assert [h["step"] for h in last["history"]] == [1, 2, 3, 4]

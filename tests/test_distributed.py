"""Multi-process training and evaluation (torchrun, gloo on CPU) through the real entry points.

The slow tests start real torchrun process groups on a tiny project (8 train / 4 val frames
of 64x128, 4 steps of a global batch of 4): two processes train and checkpoint, two
processes evaluate a checkpoint exactly like one, and a run started on two processes is
resumed on one.
"""

from __future__ import annotations

import os
import re
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
def proj(scratch) -> Path:
    """A tiny project: shrunk params.yaml, synthetic frames, train and val shards."""
    return make_project(
        scratch("ddp") / "proj",
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
    cmd = launch.torchrun_command(t, launch.train_args("p.yaml", ["train.lr=0.1"], "continue"))
    assert cmd[:3] == [sys.executable, "-m", "stages.launch"]  # torchrun, one-line failures
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


def test_a_lost_peer_is_told_apart_from_other_errors():
    reset = RuntimeError(
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
        "[127.0.0.1]:42890: Connection reset by peer. This is typically caused by a remote "
        "worker hanging"
    )
    assert launch.lost_peer(reset) == (
        "rank ? of ?: another process of the group is gone (gloo: Connection reset by peer), "
        "a node or a worker stopped; stopping too (restart all nodes with --auto-resume)"
    )
    assert launch.lost_peer(RuntimeError("CUDA out of memory")) is None
    assert launch.lost_peer(ValueError("gloo")) is None


def test_a_worker_killed_by_a_signal_is_one_line_from_torchrun(tmp_path):
    script = tmp_path / "die.py"
    script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "stages.launch", "--standalone", "--nproc-per-node", "1",
         str(script)], capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.fullmatch(
        r"error: torchrun: rank 0 \(pid \d+\) was killed by SIGKILL", errors[0]
    ), proc.stderr


def test_launch_propagates_the_exit_code():
    assert launch.run([sys.executable, "-c", "raise SystemExit(3)"]) == 3


def test_init_from_env_is_a_no_op_outside_torchrun(monkeypatch):
    from pipeline.engine import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    info = distributed.init_from_env("cpu")
    assert (info.rank, info.world_size, info.backend) == (0, 1, None)
    assert not torch.distributed.is_initialized()
    assert distributed.rank_world() == (0, 1) and not distributed.in_worker()
    distributed.cleanup()  # nothing to clean: no error


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_gpus_without_cuda_says_how_to_run_on_cpu(proj: Path):
    from stages.cli import app

    res = CliRunner().invoke(
        app, ["train", "--gpus", "2", "-p", str(proj / "params.yaml"), "-S", "train.device=auto"]
    )
    assert res.exit_code == 1
    assert "no CUDA device" in res.output and "train.device=cpu" in res.output
    res = CliRunner().invoke(  # eval names its own key
        app, ["eval", "--gpus", "2", "-p", str(proj / "params.yaml"), "-S", "evaluate.device=auto"]
    )
    assert res.exit_code == 1
    assert "no CUDA device" in res.output and "evaluate.device=cpu" in res.output


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
    """`seg eval --gpus 2`: the same stage function as `seg eval`, each rank a slice; rank 0
    writes metrics with provenance and appends to the run history."""
    import json

    from stages.history import read_runs

    one, two = tmp_path / "one", tmp_path / "two"
    eval_args = ["--checkpoint", str(trained / "best.pt"), "-S", "evaluate.device=cpu"]
    _run(_seg("eval", *eval_args, "--out", str(two), "--gpus", "2"), proj)
    _run(_seg("eval", *eval_args, "--out", str(one)), proj)
    dist_metrics = json.loads((two / "metrics.json").read_text())
    metrics = json.loads((one / "metrics.json").read_text())
    assert dist_metrics["provenance"]["world_size"] == 2
    assert dist_metrics["images"] == metrics["images"] == 4
    confusion = [json.loads((d / "confusion.json").read_text())["matrix"] for d in (two, one)]
    assert confusion[0] == confusion[1]
    assert dist_metrics["miou"] == metrics["miou"]
    assert dist_metrics["provenance"]["checkpoint"] == metrics["provenance"]["checkpoint"]
    # each frame's counts, gathered from both ranks: the same frames and counts as one process
    from pipeline.compare import FILE, read_frame_counts

    frames = [read_frame_counts(d / FILE) for d in (two, one)]
    assert frames[0].keys == frames[1].keys and len(frames[0].keys) == 4
    assert (frames[0].counts == frames[1].counts).all()
    assert frames[0].counts.sum(0)[:, :-1].tolist() == confusion[1]
    runs = read_runs(proj / "outputs" / "runs.parquet")
    assert [r["miou"] for r in runs[-2:]] == [metrics["miou"]] * 2


@pytest.fixture(scope="module")
def half(proj: Path, scratch) -> Path:
    """A 2-process run stopped after step 2 (its checkpoint): the outputs folder."""
    tmp = scratch("half")
    worker = tmp / "train_until.py"
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
    out = tmp / "outputs"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    _run([*torchrun, "--nproc-per-node", "2", str(worker), "2", f"data.outputs={out}"], proj)
    return out


def test_resume_two_processes_on_one(proj: Path, half: Path, tmp_path: Path, monkeypatch):
    """Stop a 2-process run after step 2 (its checkpoint), resume it with 1 process to the end:
    it continues from the 2-process weights and optimizer state, deterministically."""
    import shutil

    from pipeline.engine.checkpoint import load
    from stages import steps

    out = tmp_path / "outputs"
    shutil.copytree(half, out)
    override = f"data.outputs={out}"
    first = load(out / "train" / "last.pt")
    assert first["step"] == 2
    assert len(first["rng"]) == 2  # every rank's RNG state

    again = tmp_path / "again"
    shutil.copytree(out, again)
    _run(_seg("train", "--resume", "-S", override), proj)
    last = load(out / "train" / "last.pt")
    assert last["step"] == 4
    assert [h["step"] for h in last["history"]] == [1, 2, 3, 4]

    def final_weights(outputs: Path, resume) -> dict:
        monkeypatch.chdir(proj)
        p = steps.load("params.yaml", [f"data.outputs={outputs}"])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the subprocess (OMP_NUM_THREADS=1): the same float sums
        try:
            steps.train(p, resume=resume)
        finally:
            torch.set_num_threads(threads)
        return load(outputs / "train" / "last.pt")["model"]

    # the same checkpoint resumed again in this process: the same final weights
    resumed = final_weights(again, steps.Resume.CONTINUE)
    assert all(torch.equal(resumed[k], last["model"][k]) for k in resumed)
    # ... which the step-2 state decided: a fresh 1-process run ends elsewhere
    fresh = final_weights(tmp_path / "fresh", steps.Resume.NEW)
    assert not all(torch.equal(fresh[k], last["model"][k]) for k in fresh)


def test_ranks_resume_with_their_own_rng(proj: Path, half: Path, trained: Path, tmp_path: Path):
    """Stopped at step 2 and resumed on 2 processes, a run ends with the weights of the run
    never stopped: each rank continues its own RNG stream (ASPP dropout), not rank 0's."""
    import shutil

    from pipeline.engine.checkpoint import load

    out = tmp_path / "outputs"
    shutil.copytree(half, out)
    _run(_seg("train", "--gpus", "2", "--resume", "-S", "train.device=cpu",
              "-S", f"data.outputs={out}"), proj)  # fmt: skip
    resumed = load(out / "train" / "last.pt")["model"]
    uninterrupted = load(trained / "last.pt")["model"]
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


PROBE = Path(__file__).with_name("ddp_probe.py")


@pytest.mark.parametrize("world", [1, 2])
def test_os8_switch_under_ddp(proj: Path, tmp_path: Path, world: int):
    """DDP (gloo) trains past the OS16 -> OS8 switch with BatchNorm frozen from there on,
    gradients averaged over the ranks, and one all-reduce per step with grad_accum 2."""
    from pipeline.engine.checkpoint import load

    out, probe = tmp_path / "outputs", tmp_path / "probe"
    over = [f"data.outputs={out}", "train.os8_from=2", "train.grad_accum=2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    _run([*torchrun, "--nproc-per-node", str(world), str(PROBE), str(probe), *over], proj)
    last = load(out / "train" / "last.pt")
    assert last["step"] == 4 and last["output_stride"] == 8
    ranks = [torch.load(probe / f"{r}.pt", weights_only=True) for r in range(world)]
    frozen = ranks[0]["bn_at_switch"]  # DDP broadcasts rank 0's buffers at each forward
    assert frozen
    for r in ranks:
        assert r["rounds"] == 4  # one gradient all-reduce per step, not per micro-batch
        assert all(torch.equal(r["model"][k], v) for k, v in frozen.items())
    for name in ranks[0]["parameters"]:  # gradients averaged: the ranks stay equal
        assert all(torch.equal(r["model"][name], ranks[0]["model"][name]) for r in ranks)

"""Multi-process runs: build the torchrun command line and run it (`seg train|eval --gpus N`).

    seg train --gpus 4                      # one node, 4 processes (one per GPU)
    seg train --gpus 8 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500
    seg train --gpus 8 --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 29500
    seg eval --gpus 4                       # each GPU scores a quarter of the val split

Each worker runs `python -m stages.cli train|eval ...` with torchrun's env vars set; the
command sees RANK, joins the process group (pipeline.engine.distributed.init_from_env) and
does its share. One node without --master-port uses `--standalone` (a free local port), so
two runs on one machine never collide on 29500. `--gpus 1` is a one-process group: the
multi-GPU code path (NCCL, DDP, SyncBatchNorm) on one GPU.

torchrun runs through `python -m stages.launch` (torch's own `torch.distributed.run`, whose
failure report is one line instead of its traceback). When a node dies, the others stop
with one line each: a killed process closes its sockets, so a worker's next collective fails
at once (gloo: "Connection reset by peer"; NCCL: its error), and `seg train` says the group
lost a peer; a node that vanishes without closing them (power, network) is given up after
the process group's timeout (`GROUP_TIMEOUT_S`, given to init_from_env). Nodes
that never join are given up after static rendezvous' 600 s (torchrun's `timeout`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError

# How long a collective waits for a peer that neither answers nor closes its connection (its
# node lost power or network) before the process group gives up: 10 min, NCCL's own default
# (gloo's is 30). The longest wait a healthy run has is rank 0 saving a checkpoint or a
# snapshot while the others wait at the next all-reduce: seconds, minutes on slow storage.
GROUP_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Topology:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def check_topology(t: Topology, device: str, device_key: str = "train.device") -> None:
    """Fail before starting any process when the topology cannot run here.

    `device` is train.device (auto | cpu | cuda). CPU processes (gloo) are only started
    when asked for explicitly with train.device=cpu: on a machine without CUDA, --gpus N is
    almost always a mistake, and N CPU processes sharing the cores are slower than one.
    """
    import torch

    if t.nproc_per_node < 1 or t.nnodes < 1:
        raise ConfigError(f"--gpus {t.nproc_per_node} --nnodes {t.nnodes}: both must be >= 1")
    if not 0 <= t.node_rank < t.nnodes:
        raise ConfigError(f"--node-rank {t.node_rank}: must be in [0, {t.nnodes})")
    if t.nnodes > 1 and not t.master_addr:
        raise ConfigError("--nnodes > 1 needs --master-addr (the address of node 0)")
    if device == "cpu":
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            f"--gpus {t.nproc_per_node}: no CUDA device on this machine. To run "
            f"{t.nproc_per_node} CPU processes (gloo backend) instead, add -S {device_key}=cpu"
        )
    n = torch.cuda.device_count()
    if t.nproc_per_node > n:
        raise ConfigError(f"--gpus {t.nproc_per_node}: this node has only {n} CUDA device(s)")


def torchrun_command(
    t: Topology, module_args: Sequence[str], module: str = "stages.cli"
) -> list[str]:
    """`python -m stages.launch ... -m <module> <module_args...>`: torchrun's arguments, run by
    `torch.distributed.run` (see `main`)."""
    cmd = [sys.executable, "-m", "stages.launch", "--nproc-per-node", str(t.nproc_per_node)]
    if t.nnodes > 1 or t.master_addr or t.master_port:
        cmd += ["--nnodes", str(t.nnodes), "--node-rank", str(t.node_rank)]
        cmd += ["--master-addr", t.master_addr or "127.0.0.1"]
        cmd += ["--master-port", str(t.master_port or 29500)]
    else:
        cmd += ["--standalone"]
    return [*cmd, "-m", module, *module_args]


def worker_args(
    command: str, params: Path | str, overrides: Sequence[str] | None, *extra: str
) -> list[str]:
    """The `seg COMMAND` arguments each worker gets (no --gpus: a worker never re-launches)."""
    args = [command, "--params", str(params)]
    for item in overrides or ():
        args += ["--set", item]
    return [*args, *extra]


def train_args(
    params: Path | str,
    overrides: Sequence[str] | None,
    resume: str,
    precision_change: bool = False,
) -> list[str]:
    """`seg train` for each worker; `resume` is a stages.resume.Resume value."""
    flag = {"auto": ["--auto-resume"], "continue": ["--resume"]}.get(
        getattr(resume, "value", resume), []
    )
    if precision_change:
        flag.append("--allow-precision-change")
    return worker_args("train", params, overrides, *flag)


def run(cmd: Sequence[str], env: dict | None = None) -> int:
    """Run the command in the foreground; its exit code is ours. Ctrl-C reaches torchrun,
    which stops its workers."""
    full_env = {**os.environ, **(env or {})}
    try:
        return subprocess.call(list(cmd), env=full_env)
    except KeyboardInterrupt:
        return 130


def launch(t: Topology, args: Sequence[str], device: str, device_key: str) -> int:
    """Check the topology, then run `seg ARGS` under torchrun; returns torchrun's exit code.
    `device_key` is the param that holds `device` (train.device, evaluate.device)."""
    check_topology(t, device, device_key)
    return run(torchrun_command(t, args))


def check_same_params(p) -> None:
    """Every process of the group trains with the same train params, else a one-line error
    naming what differs (nodes with different params.yaml files would each step with their
    own lr or batch and silently train a model nobody asked for)."""
    import dataclasses

    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mine = {"data.dataset": p.data.dataset, **{
        f"train.{k}": v for k, v in dataclasses.asdict(p.train).items()}}  # fmt: skip
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone):
        differ = sorted(k for k in mine if theirs.get(k) != everyone[0].get(k))
        if differ:
            what = ", ".join(f"{k}={everyone[0][k]!r} on rank 0, {theirs[k]!r} on rank {rank}"
                             for k in differ[:3])  # fmt: skip
            raise ConfigError(
                f"the processes have different params ({what}): every node needs the same "
                "params.yaml and -S overrides"
            )


# ----------------------------------------------------------------------------- failures


def lost_peer(exc: BaseException) -> str | None:
    """What a worker says when a collective failed because another process of the group is
    gone (killed, crashed, its node down), or None for any other error."""
    import torch.distributed as dist

    kinds = tuple(
        getattr(dist, name) for name in ("DistBackendError", "DistNetworkError", "DistError")
        if hasattr(dist, name)
    )  # fmt: skip
    text = str(exc)
    gone = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "timed out")
    if not isinstance(exc, kinds) and not (
        isinstance(exc, RuntimeError) and ("gloo" in text or "NCCL" in text)
    ):
        return None
    reason = next((g for g in gone if g.lower() in text.lower()), type(exc).__name__)
    backend = "NCCL" if "NCCL" in text else "gloo" if "gloo" in text else "torch.distributed"
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else ("?", "?")
    return (
        f"rank {rank} of {world}: another process of the group is gone ({backend}: {reason}), "
        "a node or a worker stopped; stopping too (restart all nodes with --auto-resume)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """torchrun (`torch.distributed.run`) with its failure report in one line: a worker that
    exits 1 has printed its own error (`error: ...`); a worker killed by a signal or exiting
    otherwise is named here."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    # the agent's own "failed (exitcode: 1) local_rank: 0 ..." line: said once, below
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        torchrun(parse_args(list(argv if argv is not None else sys.argv[1:])))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode != 1:
            how = (
                f"was killed by {failure.signal_name()}"
                if failure.exitcode < 0
                else f"exited with code {failure.exitcode}"
            )
            print(f"error: torchrun: rank {rank} (pid {failure.pid}) {how}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

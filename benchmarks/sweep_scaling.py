"""A sweep over the pool: one worker against two, on the same 6-trial grid of the demo.

    python benchmarks/sweep_scaling.py [--iterations 150] [--out FILE.md]

Builds a project from this checkout (the demo's params, `train.iterations` shortened), a
bare origin, a real `prefect server` and a process work pool; then runs the grid
`train.lr=0.1,0.15,0.2` x `train.seed=0,1` twice, each trial with one torch thread
(OMP_NUM_THREADS=1): with one worker (`--parallel 1`), then with two (`--parallel 2`, two
workers of `--limit 1`), each time at a commit of its own (an empty commit between them:
no trial reuses the other sweep's experiments). Reports each sweep's wall time, their ratio
and whether every trial's val mIoU is the same in both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GRID = ["-S", "train.lr=0.1,0.15,0.2", "-S", "train.seed=0,1"]


def sh(cmd: list[str], cwd: Path, env: dict, timeout: float = 3600) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def project(root: Path, env: dict, **sections: dict) -> Path:
    """This checkout's files in `root`/proj, params.yaml's sections updated from `sections`
    (train={...}, evaluate={...}, synth={...}), a git repository with the demo's data made by
    DVC and committed."""
    proj = checkout_copy(root / "proj", env)
    raw = yaml.safe_load((proj / "params.yaml").read_text())
    for name, values in sections.items():
        raw[name].update(values)
    (proj / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for cmd in (["git", "init", "-q", "-b", "main"],  # .dvc/ came with the checkout's files
                [str(BIN / "dvc"), "repro", "synth", "preprocess@train", "preprocess@val"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "demo data"]):  # fmt: skip
        sh(cmd, proj, env)
    return proj


def checkout_copy(proj: Path, env: dict) -> Path:
    """This checkout's files (tracked and untracked, not ignored; no docs or results) in `proj`."""
    proj.mkdir(parents=True)
    listed = sh(["git", "ls-files", "-co", "--exclude-standard"], REPO, env).split("\n")
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file() and not name.startswith(("docs/", "benchmarks/results")):
            (proj / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, proj / name)
    return proj


def with_origin(proj: Path, env: dict) -> Path:
    """A bare origin beside the project, its main pushed there."""
    origin = proj.parent / "origin.git"
    sh(["git", "init", "-q", "--bare", "-b", "main", str(origin)], proj.parent, env)
    sh(["git", "remote", "add", "origin", f"file://{origin}"], proj, env)
    sh(["git", "push", "-q", "-u", "origin", "main"], proj, env)
    return proj


def bench_env(prefix: str, root: Path | None = None) -> tuple[Path, dict]:
    """A root (a new temporary one, or `root`, kept) with its own HOME, PREFECT_HOME and git
    identity; the environment for a `prefect server` on a free port of 127.0.0.1 and this
    venv's commands."""
    root = Path(tempfile.mkdtemp(prefix=prefix)) if root is None else root
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    (home / ".gitconfig").write_text("[user]\n\tname = b\n\temail = b@b\n")
    env = {**os.environ, "HOME": str(home), "PREFECT_HOME": str(home / ".prefect"),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip
    env.pop("PYTHONPATH", None)
    return root, env


def prefect_server(root: Path, env: dict, log: Path) -> subprocess.Popen:
    """`prefect server start` at env's PREFECT_API_URL, once it answers /health."""
    import httpx

    url = env["PREFECT_API_URL"]
    port = url.rsplit(":", 1)[1].split("/")[0]
    server = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                    "--port", port, "--no-ui"], root, env, log)  # fmt: skip
    for _ in range(240):
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(server)
    raise SystemExit(f"prefect server did not answer at {url} in 2 minutes: {log}")


def report(lines: list[str], out: Path | None, root: Path | None) -> None:
    """Print the markdown report, write it to `out` (if given), remove the temporary root
    (None: keep it)."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        out.write_text(text)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


def machine() -> str:
    """`lscpu`'s model name, the cores, and whether AVX-512 and native bf16 are there."""
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines()
                  if ln.startswith("Model name")), "?")  # fmt: skip
    flags = next((ln for ln in cpu.splitlines() if ln.startswith("Flags")), "")
    bf16 = ", native bf16" if "avx512_bf16" in flags or "amx_bf16" in flags else ""
    return (f"{model}, {os.cpu_count()} cores, "
            f"{'AVX-512' if 'avx512f' in flags else 'AVX2 only'}{bf16}")  # fmt: skip


def sweep(
    proj: Path, env: dict, name: str, workers: int, logs: Path, grid: list[str] = GRID
) -> tuple[float, dict]:
    """Run `grid` (-S arguments) on the pool with `workers` workers of one torch thread each;
    (seconds, trial -> val mIoU)."""
    sh(["git", "commit", "-q", "--allow-empty", "-m", f"sweep {name}"], proj, env)
    sh(["git", "push", "-q"], proj, env)
    wenv = {**env, "SEG_PROJECT": str(proj), "PREFECT_WORKER_QUERY_SECONDS": "1",
            "OMP_NUM_THREADS": "1"}  # fmt: skip
    procs = [start([str(BIN / "prefect"), "worker", "start", "--pool", "bench", "--type",
                    "process", "--limit", "1"], proj.parent, wenv, logs / f"{name}-w{i}.log")
             for i in range(workers)]  # fmt: skip
    try:
        t0 = time.monotonic()
        sh([str(BIN / "seg"), "sweep", name, "--pool", "bench", "--parallel", str(workers),
            *grid], proj, env, timeout=12 * 3600)  # fmt: skip
        took = time.monotonic() - t0
    finally:
        for p in procs:
            stop(p)
    rows = json.loads(sh([str(BIN / "seg"), "sweep", "show", name, "--json"], proj, env))
    return took, {r["overrides"]: r["val_miou"] for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    root, env = bench_env("seg-sweep-bench-")
    logs = root / "logs"
    logs.mkdir()
    server = prefect_server(root, env, logs / "server.log")
    try:
        n = args.iterations
        train = dict(iterations=n, val_interval=n, checkpoint_interval=n, amp="off", workers=0)
        evaluate = dict(amp="off", workers=0)
        proj = with_origin(project(root, env, train=train, evaluate=evaluate), env)
        sh([str(BIN / "prefect"), "work-pool", "create", "bench", "--type", "process"], root, env)
        one, res1 = sweep(proj, env, "one-worker", 1, logs)
        two, res2 = sweep(proj, env, "two-workers", 2, logs)
    finally:
        stop(server)
    same = res1 == res2
    lines = [
        f"# Sweep on the pool: one worker against two ({time.strftime('%Y-%m-%d')})", "",
        f"Machine: {machine()}; torch {__import__('torch').__version__}; "
        "each trial OMP_NUM_THREADS=1.",
        f"Command: `python benchmarks/sweep_scaling.py --iterations {args.iterations}`", "",
        f"Grid: {' '.join(GRID[1::2])} (6 trials of the demo at {args.iterations} iterations, "
        "fp32)", "",
        "| workers | wall time (s) |", "| --- | --- |",
        f"| 1 | {one:.0f} |", f"| 2 | {two:.0f} |", "",
        f"Ratio two/one: **{two / one:.2f}** (goal: at most 0.6). Same val mIoU in every trial: "
        f"**{same}**.", "", "| trial | one worker | two workers |", "| --- | --- | --- |",
        *[f"| `{k}` | {v} | {res2.get(k)} |" for k, v in sorted(res1.items())],
    ]  # fmt: skip
    report(lines, args.out, root)


if __name__ == "__main__":
    main()

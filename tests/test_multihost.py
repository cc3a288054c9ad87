# ruff: noqa: F811  (fixtures imported from other test modules, then taken as arguments)
"""Beyond one machine, on one machine: real servers on 127.0.0.1 only.

An S3 API server (moto, auth on: tests/s3server.py) holds the shards and the DVC remote; a
real `prefect server` (tests/test_flows.py's fixture) and a bare git repository (`file://`,
as origin) are all two "hosts" share. Each host is a clone with its own working copy, HOME,
DVC config and Prefect process worker on one work pool; its processes run its own copy of
the code (PYTHONPATH = the clone), configured as a user configures S3: AWS_ENDPOINT_URL and
the AWS credential variables.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import tiny_params
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.client.schemas.sorting import FlowRunSort
from prefect.settings import PREFECT_API_URL, temporary_settings
from s3server import S3Server, free_port, s3  # noqa: F401
from test_dvc import _env, _new_project
from test_flows import _eventually, _stage_table, _start, _stop

from stages import flows

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
POOL = "team"
DEPLOYMENT = "seg-pipeline/shared"
# tiny params, amp off (AVX2-only CPUs run bf16 30x slower), shards in the bucket
PARAMS = {"train.amp": "off", "evaluate.amp": "off"}


@pytest.fixture(scope="module")
def server(scratch):
    """A real `prefect server start` on a free loopback port, its own home and database. A
    queued run retries for its slot every 2 s (default 30 s)."""
    import httpx

    home = scratch("prefect-server")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
    }
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
           "--port", str(port), "--no-ui", "--analytics-off"]  # fmt: skip
    proc = _start(cmd, home, env, home / "server.log")
    url = f"http://127.0.0.1:{port}/api"

    def healthy():
        assert proc.poll() is None, (home / "server.log").read_text()
        try:
            assert httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError as exc:
            raise AssertionError(str(exc)) from None

    try:
        _eventually(healthy, timeout=120)
        yield url
    finally:
        _stop(proc, signal.SIGTERM)


@dataclass
class Host:
    """A clone with its own working copy, HOME and environment."""

    path: Path
    env: dict[str, str]

    def run(self, *args: str, check: bool = True, timeout: float = 300, **extra: str):
        proc = subprocess.run(
            list(args), cwd=self.path, env={**self.env, **extra}, capture_output=True,
            text=True, timeout=timeout,
        )  # fmt: skip
        if check and proc.returncode != 0:
            pytest.fail(f"{self.path.name}: {' '.join(args)} exited {proc.returncode}\n"
                        f"{proc.stdout}\n{proc.stderr}")  # fmt: skip
        return proc

    def dvc(self, *args: str, **kw):
        return self.run(str(BIN / "dvc"), *args, **kw)

    def git(self, *args: str, **kw):
        return self.run("git", *args, **kw)

    def seg(self, *args: str, **kw):
        return self.run(str(BIN / "seg"), *args, **kw)

    def worker(self, log: Path, pool: str = POOL) -> subprocess.Popen:
        """`prefect worker start --pool POOL` on this host, polling every second; the
        deployment's pull step sends its runs to $SEG_PROJECT, this clone."""
        env = {**self.env, "SEG_PROJECT": str(self.path), "PREFECT_WORKER_QUERY_SECONDS": "1",
               "PREFECT_WORKER_PREFETCH_SECONDS": "1"}  # fmt: skip
        elsewhere = self.path.parent / f"{self.path.name}-worker"
        elsewhere.mkdir(exist_ok=True)
        cmd = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"]
        return _start(cmd, elsewhere, env, log)


def host(path: Path, s3: S3Server, api: str) -> Host:
    """The environment of a host whose clone is (or will be) at `path`."""
    home = path.parent / f"{path.name}-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / ".gitconfig").write_text(
        "[user]\n\tname = t\n\temail = t@t\n[init]\n\tdefaultBranch = main\n"
    )
    empty = home / "aws-empty"  # no profile or config file of the user's is read
    empty.write_text("")
    env = {**_env(home), **s3.env(), "PREFECT_API_URL": api, "PYTHONPATH": str(path)}
    env.update(AWS_CONFIG_FILE=str(empty), AWS_SHARED_CREDENTIALS_FILE=str(empty))
    for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        env.pop(key, None)
    return Host(path, env)


def wait_final(client, run_id, timeout: float = 400):
    def final():
        r = client.read_flow_run(run_id)
        assert r.state.is_final(), r.state
        return r

    return _eventually(final, timeout=timeout, every=1)


def run_logs(client, run_id, until: str = "pushed experiment") -> str:
    """All log lines of a flow run (pages of 200, the server's limit), once `until` is among
    them (logs reach the API in batches, after the state)."""

    def read() -> str:
        lines: list[str] = []
        while True:
            page = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
                limit=200, offset=len(lines),
            )  # fmt: skip
            lines += [log.message for log in page]
            if len(page) < 200:
                text = "\n".join(lines)
                assert until in text, text
                return text

    return _eventually(read, timeout=30)


def running_intervals(client, run_id) -> list[tuple]:
    """(start, end) of each Running state in a run's state history."""
    states = sorted(client.read_flow_run_states(run_id), key=lambda s: s.timestamp)
    spans = []
    for state, after in zip(states, [*states[1:], None], strict=True):
        if state.is_running():
            spans.append((state.timestamp, after.timestamp if after else None))
    return spans


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and everything under it, as a machine that goes down (torchrun
    starts its workers in sessions of their own, so a process group is not enough)."""
    try:
        root = psutil.Process(proc.pid)
        victims = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def no_secret(s3: S3Server, folders: list[Path], texts: list[str]) -> int:
    """Neither the secret key nor the key id in any file under `folders` or in `texts`."""
    n = 0
    for text in texts:
        assert s3.secret not in text and s3.key_id not in text
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                assert s3.secret.encode() not in data, path
                assert s3.key_id.encode() not in data, path
                n += 1
    return n


def train_nodes(hosts: list[Host], port: int, *args: str) -> list[subprocess.Popen]:
    """`seg train --gpus 1 --nnodes N --node-rank i` on each host, as separate processes."""
    procs = []
    for rank, h in enumerate(hosts):
        cmd = [str(BIN / "seg"), "train", "--gpus", "1", "--nnodes", str(len(hosts)),
               "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port",
               str(port), *args]  # fmt: skip
        log = h.path.parent / f"{h.path.name}-node{rank}.log"
        procs.append(_start(cmd, h.path, {**h.env, "OMP_NUM_THREADS": "1"}, log))
    return procs


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


# ----------------------------------------------------------------------------- the whole path


def host_a(tmp_path: Path, s3: S3Server, server: str, name: str) -> tuple[Host, Path, str]:
    """(host A, a bare origin, the bucket): a project with its shards in a new bucket
    (data.store; data/shards holds the pointers DVC tracks) and its DVC remote on the same
    server, nothing committed yet."""
    bucket = s3.make_bucket(name)
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    a = host(tmp_path / "A", s3, server)
    _new_project(a.path, **PARAMS, **{"data.store": f"s3://{bucket}/shards"})
    a.dvc("remote", "add", "-d", "storage", f"s3://{bucket}/dvc")
    a.dvc("remote", "modify", "storage", "endpointurl", s3.endpoint)
    return a, origin, bucket


@pytest.mark.slow  # minutes: `make test-slow` (and CI) runs it
def test_two_hosts_one_bucket_one_pool_and_two_nodes(s3, server, tmp_path, tmp_path_factory):
    t0 = time.monotonic()
    # host A: the project, shards in the bucket, a DVC remote on the same server, origin
    a, origin, bucket = host_a(tmp_path, s3, server, "team")
    a.git("add", "-A")
    a.git("commit", "-q", "-m", "shards and DVC remote in S3")
    a.git("remote", "add", "origin", f"file://{origin}")
    a.git("push", "-q", "-u", "origin", "main")

    # one work pool, one deployment (at most one run at a time), each worker in its clone
    with temporary_settings(updates={PREFECT_API_URL: server}):
        from prefect.client.schemas.actions import WorkPoolCreate

        with get_client(sync_client=True) as client:
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
        deployed = a.seg("deploy", "--pool", POOL, "--name", "shared", "--workdir",
                         "$SEG_PROJECT", "--collision", "queue")  # fmt: skip
        assert "SEG_PROJECT=/path/to/clone prefect worker start" in deployed.stderr, deployed
        outputs = [deployed.stdout + deployed.stderr]
        worker_a = a.worker(tmp_path / "worker-A.log")
        try:
            with get_client(sync_client=True) as client:
                d = client.read_deployment_by_name(DEPLOYMENT)
                # no fixed working_dir (each worker's $SEG_PROJECT), heartbeats (flows)
                assert d.job_variables == {"env": flows.heartbeat_env()}
                assert d.global_concurrency_limit.limit == 1
                assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {
                    "directory": "{{ $SEG_PROJECT }}"}}]  # fmt: skip
                run_a = wait_final(client, client.create_flow_run_from_deployment(d.id).id)
                log_a = run_logs(client, run_a.id)
                assert run_a.state.is_completed(), f"{run_a.state}\n{log_a}"
                table_a = _eventually(lambda: _stage_table(client, run_a.id))
        finally:
            _stop(worker_a)
        assert f"project {a.path}" in log_a
        assert "starting from outputs/train/last.pt: none yet" in log_a, log_a
        assert all(table_a[s] == "ran" for s in ("synth", "preprocess@train", "train", "evaluate"))
        assert "pushed experiment" in log_a
        for split in ("train", "val"):  # preprocessed into the bucket, manifest and all; a
            keys = s3.keys(bucket, f"shards/{split}/")  # pointer in the clone
            assert any(k.endswith("/manifest.parquet") for k in keys), keys
            pointer = a.path / "data" / "shards" / split
            assert sorted(p.name for p in pointer.iterdir()) == ["manifest.parquet", "store.json"]

        # host A pushes its results: git (dvc.lock) and the DVC remote (outputs)
        a.git("add", "-A")
        a.git("commit", "-q", "-m", "results of host A")
        a.git("push", "-q")
        outputs.append(a.dvc("push").stdout)

        # host B: a second clone pulls, finds nothing stale, and reruns nothing
        b = host(tmp_path / "B", s3, server)
        subprocess.run(["git", "clone", "-q", f"file://{origin}", str(b.path)], check=True,
                       env=b.env)  # fmt: skip
        outputs.append(b.dvc("pull").stdout)
        assert json.loads(b.dvc("status", "--json").stdout) == {}
        repro = b.dvc("repro")
        assert "Running stage" not in repro.stdout and "up to date" in repro.stdout, repro.stdout
        outputs.append(repro.stdout)

        # a changed param, run on host B's worker
        worker_b = b.worker(tmp_path / "worker-B.log")
        try:
            with get_client(sync_client=True) as client:
                made = client.create_flow_run_from_deployment(
                    d.id, parameters={"overrides": ["train.lr=0.02"]}
                )
                run_b = wait_final(client, made.id)
                log_b = run_logs(client, run_b.id)
                assert run_b.state.is_completed(), f"{run_b.state}\n{log_b}"
                table_b = _eventually(lambda: _stage_table(client, run_b.id))
                prefect_texts = [log_a, log_b] + [
                    json.dumps(art)
                    for r in (run_a, run_b)
                    for art in client.request(
                        "POST", "/artifacts/filter",
                        json={"artifacts": {"flow_run_id": {"any_": [str(r.id)]}}, "limit": 50,
                              "offset": 0, "sort": "KEY_ASC"},
                    ).json()
                ]  # fmt: skip
        finally:
            _stop(worker_b)
        assert f"project {b.path}" in log_b and "pushed experiment" in log_b
        assert "starting from outputs/train/last.pt at step 4 of 4" in log_b, log_b
        assert table_b["train"] == "ran" and table_b["evaluate"] == "ran"
        assert table_b["synth"] == table_b["preprocess@train"] == "up to date"

        # both workers up, a run triggered from each side at once: they land on either
        # worker, and the deployment's limit of 1 holds across both (the state histories'
        # Running intervals do not intersect)
        workers = [a.worker(tmp_path / "worker-A2.log"), b.worker(tmp_path / "worker-B2.log")]
        try:
            triggers = [
                subprocess.Popen(
                    [str(BIN / "prefect"), "deployment", "run", DEPLOYMENT, "--param",
                     f'overrides=["train.iterations={n}"]', "--flow-run-name", f"from-{h.path.name}"],
                    cwd=h.path, env=h.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True,
                )
                for h, n in ((a, 5), (b, 6))
            ]  # fmt: skip
            for t in triggers:
                assert t.wait(timeout=120) == 0, t.stdout.read()
            with get_client(sync_client=True) as client:
                both = [
                    r
                    for r in client.read_flow_runs(limit=20, sort=FlowRunSort.START_TIME_DESC)
                    if r.name in ("from-A", "from-B")
                ]
                assert len(both) == 2
                done = [wait_final(client, r.id) for r in both]
                assert all(r.state.is_completed() for r in done), [r.state for r in done]
                spans = sorted(span for r in done for span in running_intervals(client, r.id))
                assert len(spans) == 2 and spans[0][1] <= spans[1][0], spans
                waited = [
                    s.name for r in done for s in client.read_flow_run_states(r.id)
                    if s.name == "AwaitingConcurrencySlot"
                ]  # fmt: skip
                assert waited, "the second run never waited for the slot"
                ran_on = sorted(
                    "A" if f"project {a.path}" in text else "B"
                    for text in (run_logs(client, r.id, "Finished in state") for r in done)
                )
                prefect_texts += [run_logs(client, r.id, "Finished in state") for r in done]
        finally:
            for w in workers:
                _stop(w)
        print(f"the two runs triggered at once ran on hosts {ran_on}")

    # a third clone sees the runs of both hosts
    c = host(tmp_path / "C", s3, server)
    subprocess.run(["git", "clone", "-q", f"file://{origin}", str(c.path)], check=True, env=c.env)
    c.dvc("exp", "pull", "--all-commits", "origin")
    rows = json.loads(c.dvc("exp", "show", "--all-commits", "--json").stdout)
    exps = sorted(
        (train["iterations"], train["lr"])
        for row in rows if row["rev"] != "workspace"
        for group in row.get("experiments") or [] for e in group["revs"]
        if e["data"]["metrics"].get("outputs/eval/metrics.json")
        for train in [e["data"]["params"]["params.yaml"]["data"]["train"]]
    )  # fmt: skip
    # host A's first run, host B's changed lr, the two runs triggered at once
    base = tiny_params()["train"]["lr"]
    assert [it for it, _ in exps] == [4, 4, 5, 6] and exps[:2] == [(4, 0.02), (4, base)], exps

    # two nodes (node 0 on host A, node 1 on host B, shards from the bucket) against one node
    # with two processes and the same global batch: the same weights. First with another lr
    # in host B's params.yaml: the nodes refuse to train apart, in one line each
    train = ["-S", "train.device=cpu", "-S", "train.batch_size=4"]
    for h in (a, b):
        h.git("checkout", "--", "params.yaml")
    raw = yaml.safe_load((b.path / "params.yaml").read_text())
    raw["train"]["lr"] = 0.02
    (b.path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    nodes = train_nodes([a, b], free_port(), *train)
    try:
        assert [proc.wait(timeout=300) for proc in nodes] == [1, 1]
    finally:
        for proc in nodes:
            kill_tree(proc)
    for rank, h in enumerate((a, b)):
        text = (h.path.parent / f"{h.path.name}-node{rank}.log").read_text()
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert errors == [
            f"error: the processes have different params (train.lr={base} on rank 0, 0.02 on "
            "rank 1): every node needs the same params.yaml and -S overrides"
        ], text
        assert "Traceback" not in text, text
    b.git("checkout", "--", "params.yaml")
    b_outputs = {f: f.stat().st_mtime_ns for f in (b.path / "outputs").rglob("*")}
    nodes = train_nodes([a, b], free_port(), *train)
    try:
        for proc in nodes:
            assert proc.wait(timeout=300) == 0, (a.path.parent / "A-node0.log").read_text()
    finally:
        for proc in nodes:
            kill_tree(proc)
    c.seg("train", "--gpus", "2", *train, OMP_NUM_THREADS="1")
    two, one = weights(a.path / "outputs/train/last.pt"), weights(c.path / "outputs/train/last.pt")
    assert two["step"] == one["step"] == 4
    assert all(torch.equal(two["model"][k], one["model"][k]) for k in one["model"])
    assert {f: f.stat().st_mtime_ns for f in (b.path / "outputs").rglob("*")} == b_outputs

    # the credentials reached no file (clones, caches, dvc.lock, metrics, logs, the Prefect
    # server's database) and no log or artifact
    prefect_home = [p for p in tmp_path_factory.getbasetemp().glob("prefect-server*")]
    texts = outputs + prefect_texts + [
        p.read_text(errors="replace") for p in tmp_path.glob("*.log")
    ]  # fmt: skip
    assert no_secret(s3, [tmp_path, *prefect_home], texts) > 100
    took = time.monotonic() - t0
    print(f"two hosts, one bucket, one pool, two nodes: {took:.0f} s")
    assert took < 600


# ----------------------------------------------------------------------------- a node dies


# node 1 dying runs in `make test`, node 0 dying in `make test-slow` (and CI)
@pytest.mark.parametrize("dies", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_a_node_that_dies_stops_the_other_in_one_line(s3, dies, tmp_path, monkeypatch):
    """Two nodes train from the bucket; one is killed with all its processes (as a machine
    that goes down): the other's next collective fails at once (gloo sees the connection
    reset or closed), and it exits 1 with one line, within a bound."""
    from conftest import tiny_params

    from stages import steps

    bucket = s3.make_bucket(f"nodes-{dies}")
    raw = tiny_params(**PARAMS, **{"data.shards": f"s3://{bucket}/shards"})
    raw["train"].update(iterations=400, checkpoint_interval=2, device="cpu", batch_size=4)
    nodes = [host(tmp_path / f"node{r}", s3, "http://127.0.0.1:1/api") for r in (0, 1)]
    for h in nodes:
        h.path.mkdir()
        (h.path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        h.env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])  # this checkout's code
    steps.synth(tmp_path / "synthetic", {"train": 6, "val": 2}, 64, 128, 0, 1)
    for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in nodes[0].env.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    for split in ("train", "val"):
        steps.preprocess(tmp_path / "synthetic", split, f"s3://{bucket}/shards/{split}",
                         samples_per_shard=4, workers=1)  # fmt: skip
    procs = train_nodes(nodes, free_port())

    def training():  # node 0 wrote its first checkpoint (step 2 of 400), both still run
        assert (nodes[0].path / "outputs/train/last.pt").is_file()
        assert all(p.poll() is None for p in procs), [p.poll() for p in procs]

    try:
        _eventually(training, timeout=240)
        t0 = time.monotonic()
        kill_tree(procs[dies])
        survivor = procs[1 - dies]
        code = survivor.wait(timeout=120)
        took = time.monotonic() - t0
    finally:
        for p in procs:
            kill_tree(p)
    log = (nodes[1 - dies].path.parent / f"node{1 - dies}-node{1 - dies}.log").read_text()
    assert code == 1, log
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in log, log
    assert errors[0].startswith(f"error: rank {1 - dies} of 2: another process of the group is "
                                "gone (gloo: Connection "), errors  # fmt: skip
    print(f"node {dies} killed: node {1 - dies} exited in {took:.1f} s")
    assert took < 60


# ----------------------------------------------------------------------------- a worker dies


def _lock_md5(path: Path, out: str) -> str:
    for stage in yaml.safe_load((path / "dvc.lock").read_text())["stages"].values():
        for o in stage.get("outs", []):
            if o["path"] == out:
                return o["md5"]
    raise AssertionError(out)


@pytest.mark.slow  # `make test-slow` (and CI) runs it
def test_a_killed_worker_s_next_run_starts_on_the_other_host_from_what_was_pushed(
    s3, server, tmp_path
):
    a, origin, bucket = host_a(tmp_path, s3, server, "killed")
    a.dvc("repro")
    a.git("add", "-A")
    a.git("commit", "-q", "-m", "first results")
    a.git("remote", "add", "origin", f"file://{origin}")
    a.git("push", "-q", "-u", "origin", "main")
    a.dvc("push")
    b = host(tmp_path / "B", s3, server)
    subprocess.run(["git", "clone", "-q", f"file://{origin}", str(b.path)], check=True, env=b.env)
    b.dvc("pull")
    # host A moves on and pushes: host B is now a commit behind
    raw = yaml.safe_load((a.path / "params.yaml").read_text())
    raw["train"]["lr"] = 0.04
    (a.path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    a.dvc("repro")
    a.git("commit", "-q", "-am", "lr 0.04")
    a.git("push", "-q")
    a.dvc("push")
    pushed = _lock_md5(a.path, "outputs/train/last.pt")

    with temporary_settings(updates={PREFECT_API_URL: server}):
        from prefect.client.schemas.actions import WorkPoolCreate

        pool = "team-killed"  # the module's server is shared with the other tests
        with get_client(sync_client=True) as client:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        a.seg("deploy", "--pool", pool, "--name", "killed", "--workdir", "$SEG_PROJECT",
              "--collision", "queue")  # fmt: skip
        long = {"overrides": ["train.iterations=400", "train.val_interval=400"]}
        worker_a = a.worker(tmp_path / "worker-A.log", pool)
        try:
            with get_client(sync_client=True) as client:
                d = client.read_deployment_by_name("seg-pipeline/killed")
                killed = client.create_flow_run_from_deployment(d.id, parameters=long)

                def training() -> int:  # the run's train stage is 10 steps in
                    assert client.read_flow_run(killed.id).state.is_running()
                    loss = a.path / "outputs/train/dvclive/plots/metrics/train/loss.tsv"
                    steps = len(loss.read_text().splitlines()) - 1 if loss.is_file() else 0
                    assert steps >= 10, steps
                    assert _lock_md5(a.path, "outputs/train/last.pt") == pushed
                    return steps

                partial = _eventually(training, timeout=300, every=1)
        finally:
            kill_tree(worker_a)  # the worker, its flow run, dvc, seg train: the host is gone
        t_kill = time.monotonic()

        worker_b = b.worker(tmp_path / "worker-B.log", pool)
        try:
            with get_client(sync_client=True) as client:
                nxt = client.create_flow_run_from_deployment(
                    d.id, parameters={"overrides": ["train.iterations=6"]}
                )

                def queued():  # the dead run still holds the deployment's one slot
                    assert client.read_flow_run(killed.id).state.is_running()
                    names = [st.name for st in client.read_flow_run_states(nxt.id)]
                    assert "AwaitingConcurrencySlot" in names, names

                _eventually(queued, timeout=120)
                # Nothing tells the server that the run died: it stays Running, and its slot
                # lease (renewed by the flow run for 300 s at a time, prefect/flow_engine.py)
                # frees the slot up to 5 min later (measured twice: the next run ended 336 s
                # and 337 s after the kill). Marking it Crashed, as an operator (or a
                # zombie-run automation) does, frees the slot at once.
                from prefect.states import Crashed

                client.set_flow_run_state(
                    killed.id, Crashed(message="host A went down"), force=True
                )
                done = wait_final(client, nxt.id, timeout=400)
                log = run_logs(client, nxt.id)
                assert done.state.is_completed(), f"{done.state}\n{log}"
        finally:
            _stop(worker_b)
    waited = time.monotonic() - t_kill
    print(f"killed at step {partial}; the next run finished on host B {waited:.0f} s later")
    assert f"project {b.path}" in log
    # from what was last pushed: host B fast-forwarded to A's pushed commit and pulled its
    # outputs; the log names that checkpoint (not the killed run's, which never left host A)
    head = a.git("rev-parse", "--short", "origin/main").stdout.strip()
    assert f"-> {head} (origin/main) and pulled its outputs (dvc pull)" in log, log
    assert (
        f"starting from outputs/train/last.pt at step 4 of 4, md5 {pushed} (as dvc.lock "
        "records it)" in log
    ), log
    # nothing pushed is lost: origin still ends at A's commit, B's run is an experiment there
    refs = subprocess.run(["git", "ls-remote", str(origin)], capture_output=True, text=True)
    assert f"{a.git('rev-parse', 'HEAD').stdout.strip()}\trefs/heads/main" in refs.stdout
    assert refs.stdout.count("refs/exps/") == 1, refs.stdout

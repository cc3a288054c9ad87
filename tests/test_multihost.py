# ruff: noqa: F811  (fixtures imported from other test modules, then taken as arguments)
"""Beyond one machine, on one machine: real servers on 127.0.0.1 only.

An S3 API server (moto, auth on, versioning on: tests/s3server.py) holds the DVC remote and
the runs' checkpoint stores; a real `prefect server` and a bare git repository (`file://`, as
origin) are all the "hosts" share. Each host is a clone with its own working copy, HOME, DVC
config and Prefect process worker on one work pool, configured as a user configures S3:
AWS_ENDPOINT_URL and the AWS credential variables. Every run of the deployment works in a
workspace of its own made from the host's clone, at the commit it runs, with that commit's
code, and is an experiment pushed to origin; the clones never change. Nodes of a multi-node
training run are folders with their own params.yaml, reading shards from the bucket.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import tiny_params
from helpers import eventually as _eventually
from helpers import no_secret, run_logs, wait_final
from helpers import start as _start
from helpers import stop as _stop
from pgserver import postgres  # noqa: F401
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from s3server import S3Server, free_port, s3  # noqa: F401
from test_dvc import _env, _new_project
from test_flows import _stage_table

from stages import runs

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
POOL = "team"
DEPLOYMENT = "seg-pipeline/shared"
# tiny params, amp off (AVX2-only CPUs run bf16 30x slower), shards in the bucket
PARAMS = {"train.amp": "off", "evaluate.amp": "off"}


@pytest.fixture(scope="module")
def server(prefect_server) -> str:
    """The session's Prefect server (tests/servers.py); this module's names are its own."""
    return prefect_server.url


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

    def worker(self, log: Path, pool: str = POOL, limit: int | None = None) -> subprocess.Popen:
        """`prefect worker start --pool POOL` on this host, polling every second, at most
        `limit` runs at once; the deployment's pull step sends its runs to $SEG_PROJECT,
        this clone, where each run makes its workspace."""
        env = {**self.env, "SEG_PROJECT": str(self.path), "PREFECT_WORKER_QUERY_SECONDS": "1",
               "PREFECT_WORKER_PREFETCH_SECONDS": "1"}  # fmt: skip
        elsewhere = self.path.parent / f"{self.path.name}-worker"
        elsewhere.mkdir(exist_ok=True)
        cmd = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"]
        cmd += ["--limit", str(limit)] if limit else []
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


# ----------------------------------------------------------------------------- the team


def host_a(tmp_path: Path, s3: S3Server, server: str, name: str) -> tuple[Host, Path, str]:
    """(host A, a bare origin, the bucket): a project with its DVC remote in a new bucket
    (versioning on: a key written twice keeps both versions), nothing committed yet."""
    bucket = s3.make_bucket(name)
    s3.client().put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    a = host(tmp_path / "A", s3, server)
    _new_project(a.path, **PARAMS)
    a.dvc("remote", "add", "-d", "storage", f"s3://{bucket}/dvc")
    a.dvc("remote", "modify", "storage", "endpointurl", s3.endpoint)
    return a, origin, bucket


@dataclass
class Team:
    """Two hosts (clones A and B, a process worker each on one pool), a third clone C that
    only reads, one deployment (one run at a time, queued), origin and the bucket."""

    a: Host
    b: Host
    c: Host
    origin: Path
    bucket: str
    deployment_id: object
    logs: Path
    workers: dict

    def start(self, name: str) -> None:
        h = self.a if name == "A" else self.b
        n = sum(1 for _ in self.logs.glob(f"worker-{name}*.log"))
        self.workers[name] = h.worker(self.logs / f"worker-{name}{n}.log", limit=1)

    def stop(self, name: str) -> None:
        proc = self.workers.pop(name, None)
        if proc is not None:
            _stop(proc)

    def kill(self, name: str) -> None:
        """The host's machine lost: its worker and everything under it SIGKILLed."""
        kill_tree(self.workers.pop(name))

    def submit(self, client, overrides: list[str] | None = None, **params):
        return client.create_flow_run_from_deployment(
            self.deployment_id, parameters={"overrides": list(overrides or []), **params}
        )

    def run(self, client, overrides: list[str] | None = None, **params):
        """A run of the deployment, to its end (Completed, or the test fails with its logs)."""
        made = self.submit(client, overrides, **params)
        done = wait_final(client, made.id)
        assert done.state.is_completed(), f"{done.state}\n{run_logs(client, done.id)}"
        return done

    def head(self) -> str:
        return subprocess.run(["git", "rev-parse", "main"], cwd=self.origin, text=True,
                              capture_output=True, check=True).stdout.strip()  # fmt: skip


@pytest.fixture(scope="module")
def team(s3, server, scratch) -> Iterator[Team]:
    root = scratch("team")
    a, origin, bucket = host_a(root, s3, server, "team")
    a.dvc("repro")
    a.git("add", "-A")
    a.git("commit", "-q", "-m", "results")
    a.git("remote", "add", "origin", f"file://{origin}")
    a.git("push", "-q", "-u", "origin", "main")
    a.dvc("push")
    hosts = []
    for name in ("B", "C"):
        h = host(root / name, s3, server)
        subprocess.run(["git", "clone", "-q", f"file://{origin}", str(h.path)], check=True,
                       env=h.env)  # fmt: skip
        hosts.append(h)
    with temporary_settings(updates={PREFECT_API_URL: server}):
        from prefect.client.schemas.actions import WorkPoolCreate

        with get_client(sync_client=True) as client:
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
        deployed = a.seg("deploy", "--pool", POOL, "--name", "shared", "--workdir",
                         "$SEG_PROJECT", "--collision", "queue")  # fmt: skip
        assert "SEG_PROJECT=/path/to/clone prefect worker start" in deployed.stderr, deployed
        with get_client(sync_client=True) as client:
            d = client.read_deployment_by_name(DEPLOYMENT)
        t = Team(a, *hosts, origin, bucket, d.id, root, {})
        try:
            yield t
        finally:
            for name in list(t.workers):
                t.stop(name)


def state(h: Host) -> tuple:
    """What no run may change in a host's clone: HEAD, branches and remote-tracking refs,
    the working copy and index, params.yaml and dvc.lock (experiments' refs may come)."""
    refs = [r for r in h.git("for-each-ref").stdout.splitlines() if "refs/exps/" not in r]
    return (h.git("rev-parse", "HEAD").stdout, refs, h.git("status", "--porcelain").stdout,
            (h.path / "params.yaml").read_bytes(), (h.path / "dvc.lock").read_bytes())  # fmt: skip


def experiments(c: Host) -> dict[str, dict]:
    """Every experiment on origin (`dvc exp pull -A` in clone C): name -> {"params",
    "metrics", "ref"}."""
    c.dvc("exp", "pull", "--all-commits", "--no-cache", "origin")
    rows = json.loads(c.dvc("exp", "show", "--all-commits", "--json").stdout)
    refs = {r.rsplit("/", 1)[-1]: r for r in c.git("for-each-ref", "--format=%(refname)",
                                                   "refs/exps").stdout.split()}  # fmt: skip
    found = {
        e["name"]: {"params": e["data"]["params"]["params.yaml"]["data"], "ref": refs[e["name"]]}
        for row in rows if row["rev"] != "workspace"
        for group in row.get("experiments") or [] for e in group["revs"]
    }  # fmt: skip
    for exp in found.values():  # the file itself (`exp show` leaves lists out of metrics)
        shown = c.git("show", f"{exp['ref']}:outputs/eval/metrics.json").stdout
        exp["metrics"] = json.loads(shown)
    return found


def asked(a: Host, overrides: list[str]) -> dict:
    """params.yaml as a run with `overrides` must see it: the commit's, overridden."""
    from stages import steps

    return steps.load(a.path / "params.yaml", overrides).to_dict()


def exp_name(run) -> str:
    return runs.experiment_name(run.name, str(run.id))


def remote_file(s3: S3Server, bucket: str, c: Host, ref: str, path: str) -> bytes:
    """An output of an experiment, from the DVC remote (by the md5 its dvc.lock records)."""
    lock = yaml.safe_load(c.git("show", f"{ref}:dvc.lock").stdout)
    (md5,) = [o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])
              if o["path"] == path]  # fmt: skip
    obj = s3.client().get_object(Bucket=bucket, Key=f"dvc/files/md5/{md5[:2]}/{md5[2:]}")
    return obj["Body"].read()


def same_weights(a: bytes | Path, b: bytes | Path) -> bool:
    def load(x: bytes | Path) -> dict:
        data = io.BytesIO(x) if isinstance(x, bytes) else x
        return torch.load(data, map_location="cpu", weights_only=False)["model"]

    wa, wb = load(a), load(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# the runs of the first test: mixed overrides (train or evaluate params; one repeated), then
# two without any
RUNS = [
    [], ["train.lr=0.02"], ["evaluate.flip=false"], ["evaluate.scales=[1.0]"],
    ["train.lr=0.02"], ["evaluate.batch_size=1", "evaluate.flip=false"], [], [],
]  # fmt: skip
# the work the fault tests give a run: enough steps to be killed mid-training
LONG = ["train.iterations=24", "train.checkpoint_interval=2", "train.val_interval=24",
        "train.log_every=2"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.soak  # past CI's budget (make test-soak): 5 min here, eight runs
def test_every_run_is_an_experiment_of_exactly_its_params_on_either_host(
    team, server, s3, tmp_path_factory
):
    t0 = time.monotonic()
    before = {h.path.name: state(h) for h in (team.a, team.b)}
    team.start("A")
    team.start("B")
    done = []
    with temporary_settings(updates={PREFECT_API_URL: server}):
        with get_client(sync_client=True) as client:
            for overrides in RUNS:
                done.append(team.run(client, overrides))
            logs = [run_logs(client, r.id, "Finished in state") for r in done]
            tables = [_eventually(lambda r=r: _stage_table(client, r.id)) for r in done]
    hosts = ["A" if f"workspace {team.a.path}/" in text else "B" for text in logs]
    print(f"{len(RUNS)} runs on hosts {hosts} in {time.monotonic() - t0:.0f} s")
    # the clones the workers run from are as they were
    assert {h.path.name: state(h) for h in (team.a, team.b)} == before
    assert not list(team.a.path.glob(".dvc/tmp/seg/runs/*"))
    assert not list(team.b.path.glob(".dvc/tmp/seg/runs/*"))
    # a third clone lists every run as an experiment of the commit, with exactly its params
    exps = experiments(team.c)
    from pipeline.params import params_hash

    for overrides, run, text in zip(RUNS, done, logs, strict=True):
        exp = exps[exp_name(run)]
        want = asked(team.a, overrides)
        assert exp["params"] == want, (overrides, text)
        prov = exp["metrics"]["provenance"]
        assert prov["eval_params"] == want["evaluate"], overrides
        assert prov["train_params_hash"] == params_hash(want["train"]), overrides
        assert f"commit {team.head()[:12]} (origin/main)" in text
    # the repeated lr and the runs without overrides reused an experiment of the same commit
    # and params: nothing ran again; the others ran what their overrides touch
    ran = [sorted(s for s, r in table.items() if r != "up to date") for table in tables]
    assert ran == [
        [],
        ["evaluate", "params", "train"],
        ["evaluate", "params"],
        ["evaluate", "params"],
        [],
        ["evaluate", "params"],
        [],
        [],
    ], ran
    assert "of this commit has these params" in logs[4] and exp_name(done[1]) in logs[4]
    # the metrics of a run that evaluated name it, its commit, overrides and host
    run = exps[exp_name(done[2])]["metrics"]["provenance"]["run"]
    assert (run["name"], run["commit"], run["overrides"]) == (
        exp_name(done[2]),
        team.head(),
        ["evaluate.flip=false"],
    )
    # the credentials reached no file (clones, workspaces, caches, dvc.lock, metrics, the
    # Prefect server's database) and no log
    prefect_home = list(tmp_path_factory.getbasetemp().glob("prefect-server*"))
    assert no_secret(s3, [team.logs, *prefect_home], logs) > 100


@pytest.mark.slow  # `make test-slow` (and CI) runs it
def test_a_killed_worker_s_run_resumes_on_the_other_host_from_its_pushed_checkpoint(
    team, server, s3
):
    """Host A's machine dies mid-training (its worker, run, dvc and seg train SIGKILLed);
    the next run of the same commit and overrides, on host B, resumes from the checkpoint
    the dead run pushed and ends with the weights of a run never interrupted."""
    from pipeline.engine import runstore

    store = f"s3://{team.bucket}/dvc/seg-runs/{runs.run_key(team.head(), LONG)}"
    for name in list(team.workers):
        team.stop(name)
    team.start("A")
    with temporary_settings(updates={PREFECT_API_URL: server}), s3_environment(s3):
        with get_client(sync_client=True) as client:
            killed = team.submit(client, LONG)

            def pushed() -> int:
                assert client.read_flow_run(killed.id).state.is_running()
                got = runstore.copies(store)
                assert got and got[0].step >= 6, got
                return got[0].step

            _eventually(pushed, timeout=300, every=0.3)
            team.kill("A")
            copy = runstore.copies(store)[0]  # the dead run's newest
            # the heartbeat automation would mark it Crashed 90 s on; as an operator, now
            from prefect.states import Crashed

            client.set_flow_run_state(killed.id, Crashed(message="host A died"), force=True)
            team.start("B")
            nxt = team.run(client, LONG)
            text = run_logs(client, nxt.id, "Finished in state")
    assert f"workspace {team.b.path}/" in text
    assert (
        f"fetched {copy.url} (step {copy.step}, pushed by run {exp_name(killed)}) as "
        "outputs/train/last.pt" in text
    ), text
    assert f"resumed from outputs/train/last.pt at step {copy.step} of 24" in text, text
    # a run that never stopped, on clone C by hand, trains the same weights
    team.c.dvc("pull")  # the commit's shards, from the DVC remote
    team.c.seg("train", *(arg for o in LONG for arg in ("-S", o)))
    exps = experiments(team.c)
    got = remote_file(s3, team.bucket, team.c, exps[exp_name(nxt)]["ref"],
                      "outputs/train/last.pt")  # fmt: skip
    assert same_weights(got, team.c.path / "outputs/train/last.pt")
    team.c.git("checkout", "--", ".")
    # host A's dead workspace is still there: the next run on A removes it
    assert len(list(team.a.path.glob(".dvc/tmp/seg/runs/*"))) == 1


@pytest.mark.slow
@pytest.mark.soak  # past CI's budget (make test-soak): 80 s here
def test_a_commit_that_changes_code_is_the_code_the_next_run_runs(team, server):
    """Clone C pushes a commit that changes the flow's own module and the evaluation's code;
    the next run, on host A (whose own clone and installed code are older), runs that code
    and names the commit; on the way it removes the workspace host A's dead run left."""
    c = team.c
    flows_py = c.path / "stages" / "flows.py"
    text = flows_py.read_text()
    assert text.count('"outputs of dvc.lock restored in') == 1
    flows_py.write_text(text.replace('"outputs of dvc.lock restored in',
                                     '"outputs of dvc.lock (new code) restored in'))  # fmt: skip
    prov = c.path / "pipeline" / "provenance.py"
    prov.write_text(
        prov.read_text().replace(
            "        return json.loads(text)", '        return {**json.loads(text), "code": "new"}'
        )
    )
    c.git("commit", "-q", "-am", "new code")
    c.git("push", "-q", "origin", "main")
    for name in list(team.workers):
        team.stop(name)
    team.start("A")
    with temporary_settings(updates={PREFECT_API_URL: server}):
        with get_client(sync_client=True) as client:
            run = team.run(client)
            text = run_logs(client, run.id, "Finished in state")
            table = _eventually(lambda: _stage_table(client, run.id))
    head = team.head()
    assert (
        f"commit {head[:12]} (origin/main) on host" in text and f"workspace {team.a.path}/" in text
    )
    assert "(new code) restored in" in text, text
    assert "removed the workspaces of 1 run(s) that are gone" in text, text
    assert table["evaluate"] == "ran" and table["train"] == "up to date", table
    metrics = experiments(c)[exp_name(run)]["metrics"]["provenance"]["run"]
    assert (metrics["commit"], metrics["code"]) == (head, "new")
    assert not list(team.a.path.glob(".dvc/tmp/seg/runs/*"))


@pytest.mark.slow
@pytest.mark.soak  # past CI's budget (make test-soak): 2.5 min here
def test_a_run_that_lost_its_slot_stops_itself_and_nothing_stored_is_overwritten(team, server, s3):
    """Run 1 trains on host A; the server marks it Crashed while it is alive (as the
    heartbeat automation does after a stall), which frees the deployment's slot; run 2 of
    the same work starts on host B and resumes from what run 1 pushed. Run 1 notices within
    a minute and stops, saying why; no key in the bucket (DVC remote, checkpoint store) ever
    gets a second version; run 2 ends with the weights of a run never disturbed."""
    from pipeline.engine import runstore

    store = f"s3://{team.bucket}/dvc/seg-runs/{runs.run_key(team.head(), LONG)}"
    for name in list(team.workers):
        team.stop(name)
    team.start("A")
    with temporary_settings(updates={PREFECT_API_URL: server}), s3_environment(s3):
        with get_client(sync_client=True) as client:
            first = team.submit(client, LONG)

            def pushed() -> int:
                assert client.read_flow_run(first.id).state.is_running()
                got = runstore.copies(store)
                assert got and got[0].step >= 4, got
                return got[0].step

            _eventually(pushed, timeout=300, every=0.3)
            from prefect.states import Crashed

            client.set_flow_run_state(first.id, Crashed(message="no heartbeat"), force=True)
            marked = time.monotonic()
            team.start("B")
            second = team.submit(client, LONG)

            def stopped() -> str:
                text = run_logs(client, first.id, "marked Crashed")
                assert not list(team.a.path.glob(".dvc/tmp/seg/runs/*")), "still there"
                return text

            first_log = _eventually(stopped, timeout=90, every=1)
            took = time.monotonic() - marked
            done = wait_final(client, second.id)
            text = run_logs(client, second.id, "Finished in state")
            assert done.state.is_completed(), text
    print(f"the run that lost its slot stopped {took:.0f} s after it was marked Crashed")
    assert took < 60
    assert "(its slot may be another run's now): stopping it" in first_log
    assert client_state(server, first.id).is_crashed()
    assert f"workspace {team.b.path}/" in text and "fetched s3://" in text, text
    # nothing stored was written twice: every key has one version (deleted copies of
    # checkpoints leave a delete marker, not a second version)
    versions = s3.client().list_object_versions(Bucket=team.bucket).get("Versions", [])
    counts: dict[str, int] = {}
    for v in versions:
        counts[v["Key"]] = counts.get(v["Key"], 0) + 1
    assert counts and max(counts.values()) == 1, {k: n for k, n in counts.items() if n > 1}
    # the weights of a run never disturbed: clone C's `seg train` of the killed-worker test,
    # the same params (the code that changed since does not touch training)
    c = team.c
    c.seg("train", *(arg for o in LONG for arg in ("-S", o)))
    ref = experiments(c)[exp_name(second)]["ref"]
    got = remote_file(s3, team.bucket, c, ref, "outputs/train/last.pt")
    assert same_weights(got, c.path / "outputs/train/last.pt")
    c.git("checkout", "--", ".")


def client_state(server: str, run_id):
    with temporary_settings(updates={PREFECT_API_URL: server}):
        with get_client(sync_client=True) as client:
            return client.read_flow_run(run_id).state


@contextmanager
def s3_environment(s3: S3Server) -> Iterator[None]:
    """The S3 server's endpoint and credentials in this process (to read the bucket as the
    hosts do)."""
    keys = [*s3.env(), "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE"]
    before = {k: os.environ.get(k) for k in keys}
    os.environ.update(s3.env(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull))
    os.environ.pop("AWS_PROFILE", None)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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


@pytest.mark.slow  # `make test-slow` (and CI) runs it
def test_two_nodes_train_and_resume_as_one_node_with_two_processes(s3, tmp_path, monkeypatch):
    """Node 0 and node 1 (separate folders, shards from the bucket) against one node with two
    processes and the same global batch. 1. Another lr in node 1's params.yaml: the nodes
    refuse to train apart, in one line each. 2. Both nodes killed mid-training, node 1's
    outputs lost: `--auto-resume` on both resumes at node 0's step (rank 0 decides; node 1
    gets its checkpoint) and ends with the weights of one node with two processes, bit for
    bit."""
    from stages import steps

    bucket = s3.make_bucket("nodes")
    raw = tiny_params(**PARAMS, **{"data.shards": f"s3://{bucket}/shards"})
    raw["train"].update(device="cpu", batch_size=4, iterations=40, checkpoint_interval=2,
                        val_interval=40)  # fmt: skip
    nodes = [host(tmp_path / f"node{r}", s3, "http://127.0.0.1:1/api") for r in (0, 1, 2)]
    for h in nodes:
        h.path.mkdir()
        (h.path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        h.env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])  # this checkout's code
    _preprocess_into(s3, bucket, tmp_path, monkeypatch, steps)
    base = raw["train"]["lr"]
    other = dict(raw, train=dict(raw["train"], lr=0.02))
    (nodes[1].path / "params.yaml").write_text(yaml.safe_dump(other, sort_keys=False))
    procs = train_nodes(nodes[:2], free_port())
    try:
        assert [proc.wait(timeout=300) for proc in procs] == [1, 1]
    finally:
        for proc in procs:
            kill_tree(proc)
    for rank, h in enumerate(nodes[:2]):
        text = (h.path.parent / f"{h.path.name}-node{rank}.log").read_text()
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert errors == [
            f"error: the processes have different params (train.lr={base} on rank 0, 0.02 on "
            "rank 1): every node needs the same params.yaml and -S overrides"
        ], text
        assert "Traceback" not in text, text

    # 2. killed at step >= 6 of 40; node 1's outputs gone (another machine, a wiped disk)
    (nodes[1].path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (nodes[1].path / "outputs" / "train").mkdir(parents=True)
    (nodes[1].path / "outputs" / "train" / "last.pt").write_bytes(b"an old run's file")
    procs = train_nodes(nodes[:2], free_port(), "--auto-resume")
    last0 = nodes[0].path / "outputs/train/last.pt"
    try:
        _eventually(lambda: _assert_step(last0, 6), timeout=300, every=0.2)
    finally:
        for proc in procs:
            kill_tree(proc)
    step = int(weights(last0)["step"])
    shutil.rmtree(nodes[1].path / "outputs")
    procs = train_nodes(nodes[:2], free_port(), "--auto-resume")
    try:
        for proc in procs:
            assert proc.wait(timeout=300) == 0, (tmp_path / "node0-node0.log").read_text()
    finally:
        for proc in procs:
            kill_tree(proc)
    log0 = (tmp_path / "node0-node0.log").read_text()
    assert f"resumed from outputs/train/last.pt at step {step} of 40" in log0, log0
    nodes[2].seg("train", "--gpus", "2", OMP_NUM_THREADS="1")
    two = weights(last0)
    one = weights(nodes[2].path / "outputs/train/last.pt")
    assert two["step"] == one["step"] == 40
    assert all(torch.equal(two["model"][k], one["model"][k]) for k in one["model"])
    # node 1 got rank 0's checkpoint to resume from; rank 0 alone writes the new ones
    got = nodes[1].path / "outputs/train/last.pt"
    assert weights(got)["step"] == step


def _assert_step(path: Path, step: int) -> None:
    from pipeline.engine import checkpoint
    from pipeline.errors import CheckpointError

    try:
        got = int(checkpoint.load(path)["step"]) if path.is_file() else 0
    except CheckpointError:
        got = 0
    assert got >= step, got


def test_processes_that_resolve_different_working_points_refuse_in_one_line(tmp_path):
    """Two gloo processes whose working points differ (as a bf16 node beside an fp16 +
    GradScaler one): each stops with the same line before the first step. (On this CPU
    `amp: auto` resolves to fp32 everywhere, so the points are given; the comparison and the
    collective are real.)"""
    code = (
        "import sys\n"
        "from pipeline.engine.distributed import init_from_env\n"
        "from pipeline.engine.train import check_same_working_point\n"
        "from pipeline.errors import ConfigError\n"
        "info = init_from_env('cpu')\n"
        "point = {'precision': ['bf16', 'fp16'][info.rank], 'compile': False, "
        "'channels_last': False, 'torch': '2.x', 'cuda': None, 'cudnn': None}\n"
        "try:\n    check_same_working_point(point)\n"
        "except ConfigError as exc:\n    print('error:', exc)\n    sys.exit(3)\n"
    )
    script = tmp_path / "point.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--tee", "3", str(script)], capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    lines = [ln[ln.index("error: ") :] for ln in done.stdout.splitlines() if "error: " in ln]
    assert lines and set(lines) == {
        "error: the processes resolved different working points (precision bf16 on rank 0, "
        "fp16 on rank 1): give every node the same train.amp / train.compile / "
        "train.channels_last (not auto) or the same kind of device and software"
    }, done.stdout + done.stderr


def _preprocess_into(s3: S3Server, bucket: str, tmp_path: Path, monkeypatch, steps) -> None:
    """Synthetic frames, preprocessed into s3://BUCKET/shards/{train,val}."""
    steps.synth(tmp_path / "synthetic", {"train": 6, "val": 2}, 64, 128, 0, 1)
    for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3.env(AWS_CONFIG_FILE=os.devnull,
                             AWS_SHARED_CREDENTIALS_FILE=os.devnull).items():  # fmt: skip
        monkeypatch.setenv(key, value)
    for split in ("train", "val"):
        steps.preprocess(tmp_path / "synthetic", split, f"s3://{bucket}/shards/{split}",
                         samples_per_shard=4, workers=1)  # fmt: skip


# ----------------------------------------------------------------------------- a sweep


@pytest.mark.slow
@pytest.mark.soak  # past CI's budget (make test-soak): 5 min here, a 2x2 grid on two hosts
def test_a_grid_sweep_on_two_workers_survives_a_lost_worker_and_a_killed_sweep(
    team, server, postgres, s3
):
    """`seg sweep` from clone C: a 2 x 2 grid on the pool's two workers, two trials at once,
    the study in PostgreSQL. Host A's machine dies mid-trial: the sweep submits that trial
    again and its new run, on host B, resumes from the checkpoint the dead one pushed. The
    sweep itself is killed after a trial finished and started again under its name: it takes
    over the trials in flight and hands out the rest; no trial is trained twice. Every trial
    is an experiment on origin with exactly its grid point's params."""
    from helpers import eventually

    from pipeline.engine import runstore
    from stages.sweep_flow import study_of

    c = team.c
    fixed = [a for o in LONG for a in ("-S", o)]
    args = ["sweep", "grid4", "--pool", POOL, "--parallel", "2", "--storage", postgres,
            "-S", "train.lr=0.02,0.05", "-S", "evaluate.flip=true,false", *fixed]  # fmt: skip
    for name in list(team.workers):
        team.stop(name)
    team.start("A")
    team.start("B")
    log = team.logs / "sweep.log"
    sweep = _start([str(BIN / "seg"), *args], c.path, c.env, log)

    def trial_running_on(host: Host):
        """A trial whose run trains on `host` and has pushed a checkpoint."""
        from pipeline.errors import ConfigError

        assert sweep.poll() is None, log.read_text()[-3000:]  # the sweep is still at it
        try:
            study = study_of("grid4", postgres)
        except ConfigError as exc:  # `seg sweep` has not made its study yet
            raise AssertionError(str(exc)) from None
        for t in study.trials:
            if t.state.name != "RUNNING" or "flow_run_id" not in t.user_attrs:
                continue
            # its run's workspace on that host: <clone>/.dvc/tmp/seg/runs/<name>-<id[:8]>
            run8 = t.user_attrs["flow_run_id"].replace("-", "")[:8]
            if not list(host.path.glob(f".dvc/tmp/seg/runs/*-{run8}")):
                continue
            key = runs.run_key(team.head(), t.user_attrs["overrides"])
            with s3_environment(s3):
                got = runstore.copies(f"s3://{team.bucket}/dvc/seg-runs/{key}")
            if got and got[0].step >= 4:  # (the workspace's last.pt is its commit's at first)
                return t
        raise AssertionError("no trial training on that host yet")

    try:
        lost = eventually(lambda: trial_running_on(team.a), timeout=300, every=1)
        team.kill("A")
        with temporary_settings(updates={PREFECT_API_URL: server}):
            from prefect.states import Crashed

            with get_client(sync_client=True) as client:
                client.set_flow_run_state(lost.user_attrs["flow_run_id"],
                                          Crashed(message="host A died"), force=True)  # fmt: skip

        def one_done():
            done = [t for t in study_of("grid4", postgres).trials if t.state.name == "COMPLETE"]
            assert done, "no trial finished yet"

        eventually(one_done, timeout=300, every=1)
        kill_tree(sweep)  # the sweep's process dies; its trials' runs go on on the workers
        sweep = _start([str(BIN / "seg"), *args], c.path, c.env, team.logs / "sweep-2.log")
        assert sweep.wait(timeout=900) == 0, (team.logs / "sweep-2.log").read_text()[-3000:]
    finally:
        kill_tree(sweep)
    study = study_of("grid4", postgres)
    states = sorted((t.number, t.state.name) for t in study.trials)
    assert states == [(n, "COMPLETE") for n in range(4)], states
    flow_runs = {t.number: t.user_attrs["flow_runs"] for t in study.trials}
    assert len(flow_runs[lost.number]) == 2 and all(
        len(r) == 1 for n, r in flow_runs.items() if n != lost.number
    ), flow_runs  # the lost trial submitted again; no other trial twice
    text = (team.logs / "sweep-2.log").read_text()
    assert "taken over" in text, text[-2000:]
    with temporary_settings(updates={PREFECT_API_URL: server}):
        with get_client(sync_client=True) as client:
            retried = run_logs(client, flow_runs[lost.number][1], "Finished in state")
    assert f"workspace {team.b.path}/" in retried and "fetched s3://" in retried, retried
    # every trial an experiment on origin, with exactly its point of the grid
    exps = experiments(c)
    points = sorted(
        (exps[t.user_attrs["experiment"]]["params"]["train"]["lr"],
         exps[t.user_attrs["experiment"]]["params"]["evaluate"]["flip"]) for t in study.trials
    )  # fmt: skip
    assert points == [(0.02, False), (0.02, True), (0.05, False), (0.05, True)], points

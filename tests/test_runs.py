# ruff: noqa: F811  (fixtures imported from tests/s3server.py, then taken as arguments)
"""A run's workspace (stages/runs.py) and its checkpoint store (pipeline/engine/runstore.py),
without a Prefect server: real git repositories, real `dvc`, a real listener that never
answers, real training. The runs of deployments on several hosts are tests/test_multihost.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_project
from s3server import s3, s3_env  # noqa: F401  (fixtures)

from pipeline.errors import ConfigError
from stages import runs, steps

BIN = Path(sys.executable).parent


def _git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_NOSYSTEM": "1"}  # fmt: skip
    done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A small git + DVC repository with two commits on main and a local DVC config."""
    path = tmp_path / "clone"
    path.mkdir()
    _git(path, "init", "-q", "-b", "main")
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=path, check=True)
    (path / "params.yaml").write_text("train:\n  lr: 0.1\n")
    _git(path, "add", "-A")
    _git(path, "commit", "-q", "-m", "one")
    (path / "params.yaml").write_text("train:\n  lr: 0.2\n")
    _git(path, "commit", "-q", "-am", "two")
    (path / ".dvc" / "config.local").write_text("[core]\n    analytics = false\n")
    return path


def _state(path: Path) -> tuple:
    """What a run must not change in a clone: its HEAD, refs (but experiments), index and
    working copy."""
    refs = [r for r in _git(path, "for-each-ref").splitlines() if "refs/exps/" not in r]
    return (
        _git(path, "rev-parse", "HEAD"), refs, _git(path, "status", "--porcelain"),
        (path / "params.yaml").read_bytes(), (path / ".git" / "index").read_bytes(),
    )  # fmt: skip


def test_limits_are_parsed_and_bad_ones_fail_in_one_line():
    assert runs.Limits.parse(["git=60", "stage=3600"]) == runs.Limits(git=60, stage=3600)
    assert runs.Limits.parse({"dvc": 5}).dvc == 5 and runs.Limits.parse(None) == runs.Limits()
    for bad, msg in [
        (["gti=60"], "--limit gti: unknown; valid: git, dvc, stage, lock"),
        (["git"], "--limit 'git': expected NAME=SECONDS, e.g. git=120"),
        (["git=-1"], "--limit git=-1: expected seconds > 0"),
        (["git=soon"], "--limit git=soon: expected seconds > 0"),
    ]:
        with pytest.raises(ConfigError) as err:
            runs.Limits.parse(bad)
        assert str(err.value) == msg


def test_run_key_and_experiment_name():
    # the key is the work: the commit and the overrides, whatever their order; the last of a
    # key given twice counts (as `dvc exp run -S`)
    key = runs.run_key("abc", ["train.lr=0.02", "evaluate.flip=false"])
    assert key == runs.run_key("abc", ["evaluate.flip=false", "train.lr=0.02"])
    assert key == runs.run_key("abc", ["train.lr=0.5", "evaluate.flip=false", "train.lr=0.02"])
    assert key != runs.run_key("abd", ["train.lr=0.02", "evaluate.flip=false"])
    assert runs.run_key("abc", []) != key and len(key) == 16
    # a git ref name, unique by the flow run's id
    name = runs.experiment_name("wise owl/2", "3f2a1b9c-0000-4000-8000-000000000000")
    assert name == "wise-owl-2-3f2a1b9c"


def test_a_workspace_is_at_its_commit_and_leaves_the_clone_alone(clone: Path):
    before = _state(clone)
    first = _git(clone, "rev-parse", "HEAD~1")
    lim = runs.Limits(git=60)
    ws = runs.open_workspace(clone, "run-1", None, None, lim)  # the tip of the branch
    try:
        assert ws.path == clone / ".dvc/tmp/seg/runs/run-1"
        assert ws.commit == _git(clone, "rev-parse", "HEAD") and ws.source == "clone/main"
        assert (ws.path / "params.yaml").read_text() == "train:\n  lr: 0.2\n"
        # the history is whole (DVC's experiments need it), the objects are the clone's
        assert _git(ws.path, "rev-list", "--count", "HEAD") == "2"
        assert _git(ws.path, "count-objects").startswith("0 objects")
        # the clone's DVC cache, linked; its local config (credentials) copied
        local = (ws.path / ".dvc" / "config.local").read_text()
        assert f"dir = {clone / '.dvc' / 'cache'}" in local and "analytics = false" in local
        assert 'type = "reflink,hardlink,copy"' in local or "reflink,hardlink,copy" in local
        assert "autostage = true" in local.lower()  # metrics a commit lacks go into the exp
        pinned = runs.open_workspace(clone, "run-2", first[:8], None, lim)  # a named commit
        assert pinned.commit == first and pinned.source == first[:8]
        assert (pinned.path / "params.yaml").read_text() == "train:\n  lr: 0.1\n"
        pinned.remove()
        with pytest.raises(ConfigError, match="commit 'f00d': not found on"):
            runs.open_workspace(clone, "run-3", "f00d", None, lim)
        with pytest.raises(ConfigError, match="branch 'nope': not on"):
            runs.open_workspace(clone, "run-4", None, "nope", lim)
    finally:
        ws.remove()
    assert not (clone / ".dvc/tmp/seg/runs/run-1").exists()
    assert sorted(p.name for p in runs.runs_dir(clone).iterdir()) == []  # nothing left
    assert _state(clone) == before


def test_sweep_removes_only_the_workspaces_of_runs_that_are_gone(clone: Path):
    lim = runs.Limits(git=60)
    alive = runs.open_workspace(clone, "alive", None, None, lim)
    # a run in another process, SIGKILLed: its lock goes with it, its workspace stays behind
    code = (
        "import sys; from pathlib import Path; from stages import runs\n"
        "ws = runs.open_workspace(Path(sys.argv[1]), 'killed', None, None, runs.Limits())\n"
        "print('ready', flush=True); import time; time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(clone)], stdout=subprocess.PIPE,
                             text=True)  # fmt: skip
    assert child.stdout.readline().strip() == "ready"
    assert runs.sweep(clone) == []  # both runs live
    child.kill()
    child.wait()
    assert (runs.runs_dir(clone) / "killed").is_dir()
    assert runs.sweep(clone) == ["killed"]
    assert sorted(p.name for p in runs.runs_dir(clone).iterdir()) == ["alive"]
    with open(alive.path / runs.LOCK_NAME) as f:  # still held by this process
        with pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    alive.remove()


def test_a_git_remote_that_never_answers_fails_within_the_limit(clone: Path):
    """A listener on 127.0.0.1 that accepts the connection and never answers: the run's
    `git fetch` is stopped at the git limit, in one line that names it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])  # and never a byte back
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    _git(clone, "remote", "add", "origin", f"git://127.0.0.1:{port}/deeplab.git")
    before = _state(clone)
    t0 = time.monotonic()
    try:
        with pytest.raises(runs.CommandFailed) as err:
            runs.open_workspace(clone, "hung", None, "main", runs.Limits(git=3))
    finally:
        stop.set()
        thread.join()
        for s in held:
            s.close()
        server.close()
    took = time.monotonic() - t0
    assert str(err.value) == (
        f"git fetch git://127.0.0.1:{port}/deeplab.git: no result within 3 s (the run's git "
        "limit; `seg deploy --limit git=SECONDS` sets it)"
    )
    assert took < 10, took
    assert not (runs.runs_dir(clone) / "hung").exists() and _state(clone) == before


# ----------------------------------------------------------------------------- checkpoints


def _store_roundtrip(where: str) -> None:
    from pipeline.engine import runstore

    assert runstore.copies(where) == []
    ckpt = Path(os.environ.get("TMPDIR", "/tmp")) / f"ckpt-{os.getpid()}.pt"
    ckpt.write_bytes(b"step 2")
    a2 = runstore.push(ckpt, where, 2, "run-a")
    ckpt.write_bytes(b"step 4")
    a4 = runstore.push(ckpt, where, 4, "run-a")
    b4 = runstore.push(ckpt, where, 4, "run-b")  # another run at the same step: its own name
    assert [(c.step, c.run) for c in runstore.copies(where)] == [(4, "run-a"), (4, "run-b"),
                                                                 (2, "run-a")]  # fmt: skip
    runstore.prune(where, "run-a", a4)  # a run keeps its newest copy; never touches another's
    assert [c.url for c in runstore.copies(where)] == [a4.url, b4.url]
    got = Path(str(ckpt) + ".got")
    runstore.fetch(a4, got)
    assert got.read_bytes() == b"step 4"
    assert a2.url.endswith("/step-000000002.run-a.pt")
    ckpt.unlink()
    got.unlink()


def test_checkpoint_store_in_a_folder(tmp_path: Path):
    _store_roundtrip(str(tmp_path / "store" / "key"))


def test_checkpoint_store_in_a_bucket(s3_env):
    bucket = s3_env.make_bucket("runstore")
    _store_roundtrip(f"s3://{bucket}/seg-runs/key")


def test_training_resumes_from_the_store_in_a_new_folder(tmp_path: Path, monkeypatch):
    """A run killed after its checkpoint at step 2 was pushed; the next run of the same work
    starts in another folder (a new workspace, another host) with the commit's own last.pt
    (here: none), fetches the pushed one and ends with the weights of a run never stopped.
    The best-k snapshots the killed run listed stayed on its machine: the list drops them."""
    store = tmp_path / "store" / "key"
    params = {"train.iterations": 4, "train.checkpoint_interval": 2, "train.val_interval": 2}
    whole = make_project(tmp_path / "whole", **params)
    first = make_project(tmp_path / "first", **params)
    second = make_project(tmp_path / "second", **params)

    def train(path: Path, **kw):
        monkeypatch.chdir(path)
        said: list[str] = []
        steps.train(steps.load("params.yaml"), say=said.append, **kw)
        return said

    train(whole)
    monkeypatch.setenv("SEG_RUN_STORE", str(store))
    monkeypatch.setenv("SEG_RUN_NAME", "killed-1")
    train(first, resume=steps.Resume.AUTO, stop_after=2)
    assert [p.name for p in store.iterdir()] == ["step-000000002.killed-1.pt"]
    monkeypatch.setenv("SEG_RUN_NAME", "next-2")
    said = train(second, resume=steps.Resume.AUTO)
    assert said[0] == (
        f"fetched {store}/step-000000002.killed-1.pt (step 2, pushed by run killed-1) as "
        "outputs/train/last.pt"
    ), said
    assert said[1] == "resumed from outputs/train/last.pt at step 2 of 4", said
    # the run keeps its newest copy only; the killed run's copy is not its to remove
    assert sorted(p.name for p in store.iterdir()) == [
        "step-000000002.killed-1.pt", "step-000000004.next-2.pt",
    ]  # fmt: skip
    a = torch.load(whole / "outputs/train/last.pt", weights_only=False)["model"]
    last = torch.load(second / "outputs/train/last.pt", weights_only=False)
    assert all(torch.equal(a[k], last["model"][k]) for k in a)
    assert [b["path"] for b in last["best"]] == ["best-0000004.pt"]  # names, in this folder
    assert sorted(p.name for p in (second / "outputs/train").glob("best*.pt")) == [
        "best-0000004.pt", "best.pt"
    ]  # fmt: skip
    # a stored checkpoint of other params is not taken: the run starts afresh, saying why
    raw = yaml.safe_load((second / "params.yaml").read_text())
    raw["train"]["lr"] = 0.01
    fresh = make_project(tmp_path / "fresh", **params)
    (fresh / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("SEG_RUN_NAME", "other-3")
    said = train(fresh, resume=steps.Resume.AUTO, stop_after=1)
    assert said[0].endswith("trained with other params: train.lr; skipped"), said
    assert said[-1].startswith("starting a new run"), said
    assert json.loads(json.dumps(said))  # plain lines


def test_a_resume_after_the_outputs_moved_keeps_its_snapshots_in_the_new_place(
    tmp_path: Path, monkeypatch
):
    """data.outputs moved between a kill and the resume: the best-k list names files in the
    run's folder, so the resume finds them there and never touches the old place."""
    params = {"train.iterations": 4, "train.checkpoint_interval": 2, "train.val_interval": 2}
    proj = make_project(tmp_path / "proj", **params)
    monkeypatch.chdir(proj)
    steps.train(steps.load("params.yaml"), stop_after=2)
    (proj / "outputs").rename(proj / "moved")
    (proj / "outputs").mkdir()
    (proj / "outputs" / "stray.txt").write_text("the old place")  # must stay as it is
    said: list[str] = []
    steps.train(steps.load("params.yaml", ["data.outputs=moved"]), resume=steps.Resume.AUTO,
                say=said.append)  # fmt: skip
    assert said == ["resumed from moved/train/last.pt at step 2 of 4"], said
    assert sorted(p.name for p in (proj / "moved/train").glob("best*.pt")) == [
        "best-0000002.pt", "best-0000004.pt", "best.pt"
    ]  # fmt: skip
    assert sorted(p.name for p in (proj / "outputs").iterdir()) == ["stray.txt"]

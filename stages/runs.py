"""A run of the pipeline is (commit, overrides, targets), executed in a workspace of its own.

A deployment's run (a worker's, or `seg serve`'s) never works in the host's long-lived clone:

    <clone>/.dvc/tmp/seg/runs/<run>/    the run's workspace: a git repository at the run's
                                        commit, made like `dvc exp run --temp` makes its own
                                        (.dvc/tmp: git ignores it, DVC leaves it alone)

- Git: `git init`, the clone's object store as an alternate (objects/info/alternates, what
  `git clone --reference` sets up), `git fetch` of origin's branches: only what the clone
  lacks crosses the network, and the history is whole (DVC's experiments fail in Prefect's
  shallow or blobless clones). A host without a git remote fetches from the clone itself.
- DVC: the workspace shares the clone's cache (`cache.dir`), linked (`cache.type`: reflink,
  then hardlink, then copy), so outputs are neither downloaded nor copied twice; the clone's
  `.dvc/config.local` (remote credentials, endpoints) is copied in.
- Code: the workspace's own. `load_flows` imports the workspace's `stages.flows` in place of
  the worker's installed one, and the stage commands (`seg ...`, via `dvc repro`) run with
  PYTHONPATH = the workspace, so a commit that changes code is the code its run runs.
- Liveness: the run holds an exclusive flock on `<workspace>/.seg-run.lock` while it lives
  (the kernel drops it when the process dies, SIGKILL included); `sweep` removes the
  workspaces of runs that are gone.

Every command this module runs has a time limit (`Limits`): hitting it fails the run in one
line naming the command and the limit, and stops the command's whole process group.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from pipeline.errors import ConfigError, SegError

SEG_DIR = Path(".dvc") / "tmp" / "seg"
LOCK_NAME = ".seg-run.lock"
# the DVC link types a workspace tries, in order: reflink (copy-on-write, where the file
# system has it), hardlink (same file system as the cache: a workspace inside the clone is),
# copy last. DVC makes hardlinked outputs read-only; the stages replace files, never write
# into them (pipeline.atomic), so the cache cannot be changed through a link.
CACHE_TYPES = "reflink,hardlink,copy"


class CommandFailed(SegError):
    """A git or dvc command of a run failed or ran past its limit; `retryable` as
    dvc_stages.StageFailed (a network hiccup may pass on a second try, a timeout does not)."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class Limits:
    """Seconds each kind of command a run starts may take before the run fails: `git`
    (fetch, push), `dvc` (status, pull, exp save/push: moving data), `stage` (one
    `dvc repro --single-item STAGE`: training may take days), `lock` (waiting for DVC's repo
    lock, held by another dvc in the same project). Set per deployment: `seg deploy --limit
    git=120`, or per run: the flow's `limits` parameter."""

    git: float = 300.0
    dvc: float = 3600.0
    stage: float = 7 * 24 * 3600.0
    lock: float = 600.0

    @classmethod
    def parse(cls, items: list[str] | dict | None) -> Limits:
        """`["git=60", "stage=3600"]` or `{"git": 60}` -> Limits; a bad item fails in one line."""
        if not items:
            return cls()
        pairs = items.items() if isinstance(items, dict) else (_split(i) for i in items)
        valid = [f.name for f in fields(cls)]
        values = {}
        for key, value in pairs:
            if key not in valid:
                raise ConfigError(f"--limit {key}: unknown; valid: {', '.join(valid)}")
            try:
                seconds = float(value)
            except (TypeError, ValueError):
                seconds = -1.0
            if not seconds > 0:
                raise ConfigError(f"--limit {key}={value}: expected seconds > 0")
            values[key] = seconds
        return cls(**values)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _split(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep:
        raise ConfigError(f"--limit {item!r}: expected NAME=SECONDS, e.g. git=120")
    return key.strip(), value.strip()


def call(
    cmd: list[str],
    cwd: Path | str,
    limit: float,
    what: str,
    kind: str,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run `cmd` (its own process group) with a time limit. Past `limit` seconds the group is
    killed and CommandFailed names `what` and the limit (`kind`: the Limits field). A non-zero
    exit with `check` raises CommandFailed with the command's last error line."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise CommandFailed(
            f"{what}: no result within {_seconds(limit)} (the run's {kind} limit; "
            f"`seg deploy --limit {kind}=SECONDS` sets it)"
        ) from None
    except BaseException:  # the run is being stopped: the command goes with it
        kill_group(proc)
        raise
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and done.returncode != 0:
        raise CommandFailed(f"{what}: {last_error(out + err)}", retryable=True)
    return done


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.communicate(timeout=10)


def last_error(output: str) -> str:
    """The line of a git/dvc output that says what went wrong."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for prefix in ("error: ", "fatal: ", "ERROR: "):
        for line in lines:
            if line.startswith(prefix):
                return line.removeprefix(prefix)
    return lines[-1] if lines else "no output"


def _seconds(s: float) -> str:
    return f"{s:g} s"


# ----------------------------------------------------------------------------- names


def run_key(commit: str, overrides: list[str] | None) -> str:
    """What identifies the work of a run for resuming: its commit and its overrides (order
    does not matter; the last value of a key given twice counts, as in `dvc exp run -S`)."""
    last: dict[str, str] = {}
    for item in overrides or []:
        key, _, value = item.partition("=")
        last[key.strip()] = value.strip()
    text = "\n".join([commit, *(f"{k}={v}" for k, v in sorted(last.items()))])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_REF_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def experiment_name(flow_run_name: str, flow_run_id: str) -> str:
    """The DVC experiment (a git ref name) of a flow run: its name and the first 8 hex digits
    of its id, which no other run shares (DVC's random names and Prefect's can repeat)."""
    base = _REF_UNSAFE.sub("-", flow_run_name).strip("-.") or "run"
    return f"{base}-{str(flow_run_id).replace('-', '')[:8]}"


def host() -> str:
    return socket.gethostname()


# ----------------------------------------------------------------------------- the workspace


@dataclass
class Workspace:
    """A run's own checkout; `lock` is held for as long as the run lives."""

    path: Path
    clone: Path
    commit: str
    source: str  # where the commit came from: "origin/main", or the clone's "main"
    git_remote: str | None  # the name of the clone's git remote the run pushes to, if any
    origin_url: str  # the URL the workspace fetched from (the clone's path without a remote)
    seconds: float = 0.0  # set-up time
    lock: object = None

    def remove(self) -> None:
        remove_tree(self.path)
        if self.lock is not None:
            with contextlib.suppress(OSError):
                self.lock.close()
            self.lock = None


def runs_dir(clone: Path) -> Path:
    return clone / SEG_DIR / "runs"


def git(cwd: Path | str, *args: str, limit: float, what: str | None = None, check: bool = True,
        env: dict[str, str] | None = None) -> str:  # fmt: skip
    done = call(["git", *args], cwd, limit, what or f"git {args[0]}", "git", env=env, check=check)
    return done.stdout.strip()


def git_remote(clone: Path, limits: Limits) -> tuple[str, str] | None:
    """(name, URL) of the clone's git remote: `origin`, or its only one; None without any."""
    names = git(clone, "remote", limit=limits.git, check=False).split()
    if not names:
        return None
    name = "origin" if "origin" in names else names[0]
    return name, git(clone, "remote", "get-url", name, limit=limits.git)


def current_branch(clone: Path, limits: Limits) -> str | None:
    out = git(clone, "symbolic-ref", "--quiet", "--short", "HEAD", limit=limits.git, check=False)
    return out or None


def open_workspace(
    clone: Path, name: str, commit: str | None, branch: str | None, limits: Limits
) -> Workspace:
    """The run's workspace at `commit` (a sha or any name git resolves on the source), or at
    the tip of `branch` (default: the clone's current branch) on its source: the clone's git
    remote, or the clone itself when it has none. Never changes the clone's working copy,
    index, branches or remote-tracking refs."""
    t0 = time.perf_counter()
    clone = clone.resolve()
    path = runs_dir(clone) / name
    if path.exists():
        raise ConfigError(f"{path}: a workspace of that name exists (a run of the same name?)")
    path.mkdir(parents=True)
    lock = open(path / LOCK_NAME, "w")  # noqa: SIM115 (held for the run's life)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.write(json.dumps({"pid": os.getpid(), "host": host(), "time": time.time()}))
    lock.flush()
    ws = Workspace(path, clone, "", "", None, "", lock=lock)
    try:
        remote = git_remote(clone, limits)
        ws.git_remote = remote[0] if remote else None
        ws.origin_url = remote[1] if remote else str(clone)
        git(path, "init", "--quiet", limit=limits.git)
        # the clone's objects, read in place (what `git clone --reference` writes)
        objects = Path(git(clone, "rev-parse", "--git-common-dir", limit=limits.git))
        objects = (clone / objects if not objects.is_absolute() else objects) / "objects"
        (path / ".git" / "objects" / "info" / "alternates").write_text(f"{objects}\n")
        git(path, "remote", "add", "origin", ws.origin_url, limit=limits.git)
        branch = branch or current_branch(clone, limits)
        shown = _display_url(ws.origin_url)
        git(path, "fetch", "--quiet", "--no-tags", "origin", "+refs/heads/*:refs/remotes/origin/*",
            limit=limits.git, what=f"git fetch {shown}")  # fmt: skip
        if commit:
            sha = _resolve(path, commit, limits)
            if sha is None:
                raise ConfigError(
                    f"commit {commit!r}: not found on {shown} (pushed? `git push` it first)"
                )
            ws.source = commit
        else:
            if branch is None:
                raise ConfigError(f"{clone}: detached HEAD and no branch given: pass --branch")
            sha = _resolve(path, f"refs/remotes/origin/{branch}", limits)
            if sha is None:
                raise ConfigError(f"branch {branch!r}: not on {shown}")
            ws.source = f"{ws.git_remote or 'clone'}/{branch}"
        git(path, "checkout", "--quiet", "--detach", sha, limit=limits.git)
        ws.commit = sha
        _configure_dvc(clone, path)
    except BaseException:
        ws.remove()
        raise
    ws.seconds = time.perf_counter() - t0
    return ws


def _resolve(path: Path, rev: str, limits: Limits) -> str | None:
    out = git(path, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", limit=limits.git,
              check=False)  # fmt: skip
    return out or None


def _configure_dvc(clone: Path, path: Path) -> None:
    """The workspace's DVC: the clone's local config (remote credentials), the clone's cache
    shared and linked, and autostage, as `dvc exp run` does: what DVC tracks in git (dvc.lock,
    the stages' cache: false metrics and plots) is staged as the stages run, so the run's
    experiment holds its metrics even where its commit had none yet."""
    from dvc.repo import Repo

    with Repo(str(clone)) as repo:
        cache_dir = repo.cache.local_cache_dir
    local = clone / ".dvc" / "config.local"
    if local.is_file():
        shutil.copy2(local, path / ".dvc" / "config.local")
    with Repo(str(path)) as repo:
        with repo.config.edit("local") as conf:
            conf["cache"]["dir"] = str(cache_dir)
            conf["cache"]["type"] = CACHE_TYPES
            conf["core"]["autostage"] = True


def _display_url(url: str) -> str:
    from pipeline.store import display

    return display(url)


def remove_tree(path: Path) -> None:
    """Remove a workspace (read-only files of hardlinked outputs included: the folder is
    writable, and unlinking a link leaves the cache's file alone)."""
    shutil.rmtree(path, ignore_errors=True)


def sweep(clone: Path) -> list[str]:
    """Remove the workspaces of runs that are gone (nobody holds their lock: the process
    died, SIGKILL or a lost machine included); returns their names. A live run's workspace
    is never touched."""
    gone = []
    folder = runs_dir(clone.resolve())
    if not folder.is_dir():
        return gone
    for ws in sorted(folder.iterdir()):
        lock_file = ws / LOCK_NAME
        try:
            with open(lock_file, "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                remove_tree(ws)
                gone.append(ws.name)
        except FileNotFoundError:  # a workspace being made (no lock file yet) or half removed
            if time.time() - ws.stat().st_mtime > 3600:
                remove_tree(ws)
                gone.append(ws.name)
        except BlockingIOError:  # its run lives
            continue
    return gone


# ----------------------------------------------------------------------------- the code


def _ours(mod: str) -> bool:
    return mod.split(".")[0] in ("stages", "pipeline")


@contextlib.contextmanager
def own_code(path: Path):
    """Within the block, the workspace's own `stages.flows` (yielded): every module of this
    project (`stages`, `pipeline`) already imported is set aside, the workspace goes first on
    sys.path, and the module is imported from there. The stage commands get the same code
    through PYTHONPATH (`workspace_env`). After the block the process's own modules and
    sys.path are back (a local sweep runs many workspaces in one process)."""
    saved = {m: sys.modules.pop(m) for m in list(sys.modules) if _ours(m)}
    sys.path.insert(0, str(path))
    try:
        yield load_flows(path)
    finally:
        for m in [m for m in sys.modules if _ours(m)]:
            del sys.modules[m]
        sys.modules.update(saved)
        with contextlib.suppress(ValueError):
            sys.path.remove(str(path))
        importlib.invalidate_caches()


def load_flows(path: Path):
    """The workspace's `stages.flows` (with the workspace first on sys.path and this
    project's modules out of sys.modules: `own_code`)."""
    importlib.invalidate_caches()
    module = importlib.import_module("stages.flows")
    where = Path(module.__file__).resolve()
    if not where.is_relative_to(path.resolve()):
        raise ConfigError(f"{path}: its stages.flows was not imported from it ({where})")
    return module


def workspace_env(path: Path) -> dict[str, str]:
    """PYTHONPATH for the commands a run starts: the workspace's code first."""
    old = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": os.pathsep.join([str(path), *([old] if old else [])])}

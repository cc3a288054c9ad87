"""A registered version's files: the DVC outputs of its commit (weights, metrics.json,
confusion_per_image.parquet), read by their md5 from this clone's DVC cache or a DVC remote,
checked, into {outputs}/registry/; and a version's outputs published to the default remote
when only this clone's cache has them. The registry's lowest layer: git and its error too."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import SegError

if TYPE_CHECKING:
    from stages.registry import Version

log = logging.getLogger("seg")

GIT_TIMEOUT_S = 120  # a push or fetch to a slow origin; nothing waits forever


class RegistryError(SegError):
    """An unknown model, version or stage, a version whose files are nowhere, a push refused."""


def _git(root: Path | str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, timeout=GIT_TIMEOUT_S
    )
    if check and proc.returncode != 0:
        raise RegistryError(f"git {' '.join(args)}: {_last_line(proc.stderr)}")
    return proc


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "failed"


def _show(root: Path | str, commit: str, path: str) -> str | None:
    """A git-tracked file's text at a commit (None where it is not there)."""
    proc = _git(root, "show", f"{commit}:{path}", check=False)
    return proc.stdout if proc.returncode == 0 else None


# ----------------------------------------------------------------------------- files


def _outputs(root: Path | str, commit: str | None = None) -> str:
    """data.outputs of params.yaml (at `commit`, else in the working tree)."""
    from pipeline.params import yaml_load

    text = (
        _show(root, commit, "params.yaml") if commit else (Path(root) / "params.yaml").read_text()
    )
    raw = yaml_load(text or "") or {}
    return str((raw.get("data") or {}).get("outputs") or "outputs")


def cache_dir(root: Path | str) -> Path:
    """Where fetched weights and re-scored evaluations go: {outputs}/registry (git-ignored)."""
    return Path(root) / _outputs(root) / "registry"


def _tracked_md5(root: Path | str, commit: str, path: str) -> str | None:
    """The md5 DVC recorded for `path` at `commit` (dvc.lock or PATH.dvc); None: not a DVC
    output there."""
    import yaml

    lock = yaml.safe_load(_show(root, commit, "dvc.lock") or "") or {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("path") == path and out.get("md5"):
                return out["md5"]
    single = yaml.safe_load(_show(root, commit, f"{path}.dvc") or "") or {}
    for out in single.get("outs") or []:
        if out.get("md5"):
            return out["md5"]
    return None


@contextlib.contextmanager
def _dvc(root: Path | str):
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        yield repo


def _where(repo, md5: str) -> tuple[str | None, object | None]:
    """('cache', None) when this clone's DVC cache holds the object, (remote, odb) for the
    first remote (the default first) that does, (None, None) for none."""
    if repo.cache.local.exists(md5):
        return "cache", None
    default = repo.config["core"].get("remote")
    names = [default] if default else []
    names += [n for n in repo.config["remote"] if n != default]
    for name in names:
        odb = repo.cloud.get_remote_odb(name)
        if odb.exists(md5):
            return name, odb
    return None, None


def _remote_names(repo) -> str:
    names = list(repo.config["remote"])
    return ", ".join(names) if names else "none configured"


def read_output(root: Path | str, commit: str, path: str, what: str) -> bytes:
    """A file of `commit`: a DVC output from this clone's cache or a remote, else git's."""
    md5 = _tracked_md5(root, commit, path)
    if md5 is None:
        text = _show(root, commit, path)
        if text is None:
            raise RegistryError(f"{what}: commit {commit[:8]} has no {path}")
        return text.encode()
    with _dvc(root) as repo:
        where, odb = _where(repo, md5)
        if where is None:
            raise RegistryError(
                f"{what}: {path} of commit {commit[:8]} is in no DVC remote "
                f"({_remote_names(repo)}) and not in this clone's cache"
            )
        if where == "cache":
            data = Path(repo.cache.local.oid_to_path(md5)).read_bytes()
        else:
            with odb.fs.open(odb.oid_to_path(md5), "rb") as f:
                data = f.read()
    if hashlib.md5(data).hexdigest() != md5:
        raise RegistryError(f"{what}: {path} of commit {commit[:8]} does not match its md5")
    return data


def fetch(root: Path | str, v: Version) -> Path:
    """The version's weights as a local file ({outputs}/registry/NAME/VERSION/FILE), fetched
    from the DVC cache or a remote once, checked against the md5 DVC recorded."""
    from pipeline.atomic import atomic_write

    dest = cache_dir(root) / v.name / v.version / Path(v.path).name
    stamp = dest.with_name(dest.name + ".commit")
    if dest.is_file() and stamp.is_file() and stamp.read_text().strip() == v.commit:
        return dest
    data = read_output(root, v.commit, v.path, v.ref)
    atomic_write(dest, data)
    atomic_write(stamp, v.commit + "\n")
    return dest


def eval_paths(root: Path | str, commit: str) -> tuple[str, str]:
    """(metrics.json, confusion_per_image.parquet) paths of a commit's evaluation."""
    from pipeline.compare import FILE

    base = f"{_outputs(root, commit)}/eval"
    return f"{base}/metrics.json", f"{base}/{FILE}"


def recorded_counts(root: Path | str, commit: str, what: str):
    """The per-image counts a commit's evaluation recorded (None: it recorded none, as
    before `seg eval` wrote them)."""
    import io

    from pipeline.compare import read_frame_counts

    _, path = eval_paths(root, commit)
    if _tracked_md5(root, commit, path) is None and _show(root, commit, path) is None:
        return None
    data = read_output(root, commit, path, what)
    return read_frame_counts(io.BytesIO(data), name=what)


def recorded_metrics(root: Path | str, commit: str) -> dict | None:
    text = _show(root, commit, eval_paths(root, commit)[0])
    return json.loads(text) if text else None


def _publish(root: Path | str, commit: str, paths: list[str], what: str) -> None:
    """Make sure every DVC output in `paths` of `commit` is in the default DVC remote: pushed
    from this clone's cache where only that has it; an error where neither has it. Without a
    remote, this clone's cache must hold them (a registry of one clone)."""
    from dvc_data.hashfile.hash_info import HashInfo

    with _dvc(root) as repo:
        default = repo.config["core"].get("remote")
        for path in paths:
            md5 = _tracked_md5(root, commit, path)
            if md5 is None:
                continue  # git-tracked (or absent: older evaluations recorded no counts)
            in_cache = repo.cache.local.exists(md5)
            if default is None:
                if not in_cache:
                    raise RegistryError(
                        f"{what}: {path} is not in this clone's DVC cache and no remote is set"
                    )
                continue
            odb = repo.cloud.get_remote_odb(default)
            if odb.exists(md5):
                continue
            if not in_cache:
                raise RegistryError(
                    f"{what}: {path} is in no DVC remote ({_remote_names(repo)}) and not in "
                    "this clone's cache: `dvc push` (or `dvc exp push`) where it was made"
                )
            repo.cloud.push([HashInfo("md5", md5)], remote=default)
            log.info("%s: pushed %s to DVC remote %s", what, path, default)

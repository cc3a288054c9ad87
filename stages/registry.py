"""The model registry, with no server of its own: DVC artifacts, GTO's git tags, and a promotion
gate that knows its uncertainty.

- Models are declared in dvc.yaml's `artifacts:` (DVC's model-registry convention: type model,
  path, labels), and resolved with `dvc.api.artifacts_show`. GTO keeps its own annotations
  file, artifacts.yaml: `seg registry sync` writes it from dvc.yaml (the one to edit).
- A version is a commit (an experiment's, or a branch's): the git tag `deeplab@v1.3.0`. A stage
  is the tag `deeplab#prod#7` (GTO's format: the 7th stage tag of deeplab) on the version's
  commit; its annotation says why (the gate's line, or the reason a promotion was forced).
  Made and read with gto, pushed to origin; two promotions at once create the same tag name, so
  the second push is rejected, and that promotion fetches the tags and runs its gate again,
  against the stage's new holder.
- A version's weights and its evaluation (metrics.json, confusion_per_image.parquet) are the
  DVC outputs of its commit: read from this clone's DVC cache, else a DVC remote, into
  {outputs}/registry/ (git-ignored).
- The gate (`gate`): the candidate against the stage's holder on the same val frames, a paired
  bootstrap of ΔmIoU (pipeline.compare); it passes when the interval's lower bound is above
  registry.min_gain. A side scored on other val data than this clone's val shards (or, for the
  holder, with other eval settings than the candidate) is scored again here first, so a gate
  never refuses forever after the val data changed.

`gate` and `promote` are the entry points for a scheduled flow: they need no Prefect, print
nothing, and return an Outcome whose `line` is what to report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import SegError

log = logging.getLogger("seg")

ORIGIN = "origin"
GIT_TIMEOUT_S = 120  # a push or fetch to a slow origin; nothing waits forever
FIRST_VERSION = "v0.1.0"
BUMPS = ("major", "minor", "patch")
PROMOTE_TRIES = 3  # a rejected stage tag: fetch, gate again, and try once more (twice)

_REF = re.compile(
    r"^(?P<name>[a-z0-9][a-z0-9_/-]*[a-z0-9])"
    r"(?:@(?P<version>v?\d+\.\d+\.\d+)|#(?P<stage>[a-z0-9][a-z0-9_-]*))$"
)


class RegistryError(SegError):
    """An unknown model, version or stage, a version whose files are nowhere, a push refused."""


# ----------------------------------------------------------------------------- git


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


def has_origin(root: Path | str) -> bool:
    return _git(root, "remote", "get-url", ORIGIN, check=False).returncode == 0


def fetch_tags(root: Path | str, required: bool = False) -> None:
    """Bring the registry's tags from origin (theirs win: a tag is never moved on purpose).
    Without origin there is nothing to fetch; a failed fetch is an error where `required`,
    else a warning (an offline clone still resolves what it has)."""
    if not has_origin(root):
        return
    proc = _git(root, "fetch", "--quiet", ORIGIN, "+refs/tags/*:refs/tags/*", check=False)
    if proc.returncode != 0:
        msg = f"fetching tags from {ORIGIN}: {_last_line(proc.stderr)}"
        if required:
            raise RegistryError(msg)
        log.warning("%s; going on with this clone's tags", msg)


def _push_tag(root: Path | str, tag: str) -> bool:
    """Push one tag to origin: True when it landed, False when origin already has a tag of
    that name (a concurrent promotion or registration); other failures raise."""
    proc = _git(root, "push", "--quiet", ORIGIN, f"refs/tags/{tag}", check=False)
    if proc.returncode == 0:
        return True
    if "already exists" in proc.stderr or "[rejected]" in proc.stderr:
        return False
    raise RegistryError(f"pushing tag {tag} to {ORIGIN}: {_last_line(proc.stderr)}")


def _delete_tag(root: Path | str, tag: str) -> None:
    _git(root, "tag", "-d", tag, check=False)


def _show(root: Path | str, commit: str, path: str) -> str | None:
    """A git-tracked file's text at a commit (None where it is not there)."""
    proc = _git(root, "show", f"{commit}:{path}", check=False)
    return proc.stdout if proc.returncode == 0 else None


def resolve_commit(root: Path | str, rev: str) -> tuple[str, str | None]:
    """(commit, experiment name or None) of a git revision or a DVC experiment's name."""
    proc = _git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    if proc.returncode == 0:
        commit = proc.stdout.strip()
        return commit, experiment_of(root, commit)
    refs = _git(root, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps").stdout
    hits = [line.split()[0] for line in refs.splitlines() if line.split("/")[-1] == rev]
    if len(hits) == 1:
        return hits[0], rev
    if len(hits) > 1:
        raise RegistryError(f"{rev}: {len(hits)} experiments have this name; give the commit")
    raise RegistryError(f"{rev}: no such commit, branch, tag or experiment in {root}")


def experiment_of(root: Path | str, commit: str) -> str | None:
    """The DVC experiment whose ref points at `commit` (None: not an experiment, or its ref
    was not fetched: `dvc exp pull`)."""
    refs = _git(
        root, "for-each-ref", "--points-at", commit, "--format=%(refname)", "refs/exps"
    ).stdout.split()
    return refs[0].rsplit("/", 1)[-1] if refs else None


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class Ref:
    """`deeplab@v1.3.0` (a version) or `deeplab#prod` (whichever version holds a stage)."""

    name: str
    version: str | None = None
    stage: str | None = None

    def __str__(self) -> str:
        return f"{self.name}@{self.version}" if self.version else f"{self.name}#{self.stage}"


def parse_ref(text: str) -> Ref | None:
    """A registry reference, or None where `text` is not one (a path, a revision)."""
    m = _REF.match(text.strip())
    if not m:
        return None
    version = m["version"]
    if version and not version.startswith("v"):
        version = "v" + version
    return Ref(m["name"], version, m["stage"])


def models(root: Path | str, commit: str | None = None) -> dict[str, dict]:
    """dvc.yaml's `artifacts:` (at `commit`, else in the working tree): name -> path, type,
    desc, labels."""
    import yaml

    if commit is None:
        path = Path(root) / "dvc.yaml"
        text = path.read_text() if path.is_file() else None
    else:
        text = _show(root, commit, "dvc.yaml")
    doc = yaml.safe_load(text or "") or {}
    return dict(doc.get("artifacts") or {})


def _known_model(root: Path | str, name: str) -> dict:
    declared = models(root)
    if name not in declared:
        known = ", ".join(sorted(declared)) or "none"
        raise RegistryError(f"unknown model {name!r}: dvc.yaml's artifacts declare {known}")
    return declared[name]


def gto_annotations(root: Path | str) -> dict:
    """GTO's artifacts.yaml content for dvc.yaml's artifacts (GTO reads its own file only)."""
    out = {}
    for name, a in sorted(models(root).items()):
        entry = {"type": a.get("type"), "path": a["path"], "virtual": True}
        # virtual: the path is a DVC output, not a git-tracked file (GTO checks git for those)
        if a.get("labels"):
            entry["labels"] = sorted(a["labels"])
        if a.get("desc"):
            entry["description"] = a["desc"]
        out[name] = {k: v for k, v in entry.items() if v is not None}
    return out


def annotations_text(root: Path | str) -> str:
    """artifacts.yaml as `seg registry sync` writes it."""
    import yaml

    return (
        "# GTO's annotations, written by `seg registry sync` from dvc.yaml's artifacts: edit those\n"
        + yaml.safe_dump(gto_annotations(root), sort_keys=True)
    )


def sync_annotations(root: Path | str) -> tuple[Path, bool]:
    """Write artifacts.yaml from dvc.yaml's artifacts; (its path, whether it changed)."""
    from pipeline.atomic import atomic_write

    path = Path(root) / "artifacts.yaml"
    text = annotations_text(root)
    old = path.read_text() if path.is_file() else None
    if old != text:
        atomic_write(path, text)
    return path, old != text


# ----------------------------------------------------------------------------- versions


@dataclasses.dataclass(frozen=True)
class Version:
    """A registered version: its commit, the artifact's path there, and the stage it was
    resolved through (if any)."""

    name: str
    version: str
    commit: str
    path: str
    stage: str | None = None
    experiment: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def provenance(self) -> dict:
        """What a result made with this model names: `registry` in metrics.json, in the
        per-image counts, in an exported model's metadata and beside predictions."""
        return {
            "name": self.name,
            "version": self.version,
            "ref": self.ref,
            "stage": self.stage,
            "commit": self.commit,
            "experiment": self.experiment,
            "path": self.path,
        }


def _gto_versions(root: Path | str, name: str) -> list[dict]:
    """GTO's registered versions of `name`, newest first (none before its first version: GTO
    knows an artifact by its tags, or by annotations on a branch, and a run's workspace, at a
    detached commit, has neither yet)."""
    import gto.api
    from gto.exceptions import ArtifactNotFound

    try:
        return [v for v in gto.api.show(str(root), name) if v.get("registrations")]
    except ArtifactNotFound:
        return []


def _stage_holders(root: Path | str, name: str) -> dict[str, str]:
    """stage -> the version holding it: the one assigned last. (GTO's own default, for
    `gto show` too, is the highest version among those ever assigned and not unassigned;
    `gto show --sort timestamp` and dvc.api.artifacts_show agree with this one.)"""
    from gto.constants import VersionSort
    from gto.registry import GitRegistry

    with GitRegistry.from_url(str(root)) as reg:
        artifact = reg.get_state().find_artifact(name, create_new=True)
        found = artifact.get_vstages(sort=VersionSort.Timestamp)
    return {stage: held[0].version for stage, held in found.items() if held}


def _stage_holder(root: Path | str, name: str, stage: str) -> str | None:
    return _stage_holders(root, name).get(stage)


def allowed_stages(root: Path | str) -> list[str] | None:
    """The stages .gto allows (None: any)."""
    import gto.api

    return gto.api.get_stages(str(root), allowed=True) or None


def resolve(root: Path | str, ref: Ref | str, fetch: bool = True) -> Version:
    """The version a reference names. Fetches the tags from origin first (`fetch`), so a
    clone sees the stage's current holder."""
    if isinstance(ref, str):
        parsed = parse_ref(ref)
        if parsed is None:
            raise RegistryError(f"{ref}: not a registry reference (NAME@vX.Y.Z or NAME#STAGE)")
        ref = parsed
    _known_model(root, ref.name)
    if fetch:
        fetch_tags(root)
    versions = _gto_versions(root, ref.name)
    version = ref.version
    if ref.stage is not None:
        stages = allowed_stages(root)
        if stages is not None and ref.stage not in stages:
            raise RegistryError(f"{ref}: unknown stage {ref.stage!r}; stages: {', '.join(stages)}")
        version = _stage_holder(root, ref.name, ref.stage)
        if version is None:
            raise RegistryError(f"{ref}: no version of {ref.name} is in stage {ref.stage!r}")
    if not any(v["version"] == version for v in versions):
        known = ", ".join(v["version"] for v in versions) or "none registered"
        raise RegistryError(f"{ref}: no version {version} of {ref.name}; versions: {known}")
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        shown = dvc.api.artifacts_show(ref.name, version=version, repo=str(root))
    except DvcException as exc:
        raise RegistryError(f"{ref}: {exc}") from None
    commit = shown["rev"]
    return Version(ref.name, version, commit, shown["path"], ref.stage, experiment_of(root, commit))


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


# ----------------------------------------------------------------------------- register


def register(
    root: Path | str,
    name: str,
    rev: str = "HEAD",
    version: str | None = None,
    bump: str = "minor",
    message: str | None = None,
    push: bool = True,
) -> Version:
    """Register the commit `rev` (a revision or an experiment's name) as a new version of
    `name`, like `gto register`: `version` (vX.Y.Z), else the latest bumped by `bump` (the
    first is v0.1.0). Its weights and evaluation must be in a DVC remote (pushed from this
    clone's cache when only there), so every clone can fetch them. The tag goes to origin;
    when origin already has that version (registered meanwhile elsewhere) a bumped version
    is retried once, an explicit one is refused."""
    import gto.api
    from gto.exceptions import GTOException

    if bump not in BUMPS:
        raise RegistryError(f"--bump {bump!r}: one of {', '.join(BUMPS)}")
    commit, experiment = resolve_commit(root, rev)
    declared = models(root, commit)
    if name not in declared:
        known = ", ".join(sorted(declared)) or "none"
        raise RegistryError(
            f"{rev}: commit {commit[:8]}'s dvc.yaml declares no model {name!r} (it declares {known})"
        )
    fetch_tags(root, required=push)
    for v in _gto_versions(root, name):
        if v["commit_hexsha"] == commit:
            raise RegistryError(f"{rev}: commit {commit[:8]} is {name}@{v['version']} already")
    path = declared[name]["path"]
    _publish(root, commit, [path, eval_paths(root, commit)[1]], f"{name} at {commit[:8]}")
    explicit = version is not None
    for _ in range(2):
        chosen = _next_version(root, name, version, bump)
        note = message or _register_message(root, name, chosen, commit, experiment)
        try:
            gto.api.register(str(root), name, commit, version=chosen, message=note)
        except GTOException as exc:
            raise RegistryError(f"{name}@{chosen}: {exc}") from None
        tag = f"{name}@{chosen}"
        if not push or not has_origin(root) or _push_tag(root, tag):
            return Version(name, chosen, commit, path, None, experiment)
        _delete_tag(root, tag)
        fetch_tags(root, required=True)
        if explicit:
            break
    raise RegistryError(
        f"{name}@{chosen}: {ORIGIN} has this version already (registered meanwhile)"
    )


def _next_version(root: Path | str, name: str, version: str | None, bump: str) -> str:
    from gto.versions import SemVer

    if version is not None:
        version = version if version.startswith("v") else "v" + version
        if not SemVer.is_valid(version):
            raise RegistryError(f"version {version!r}: expected vMAJOR.MINOR.PATCH")
        return version
    versions = _gto_versions(root, name)
    if not versions:
        return FIRST_VERSION
    latest = max(SemVer(v["version"]) for v in versions)
    return getattr(latest, f"bump_{bump}")().version


def _register_message(
    root: Path | str, name: str, version: str, commit: str, experiment: str | None
) -> str:
    metrics = recorded_metrics(root, commit) or {}
    miou = metrics.get("miou")
    parts = [f"Registering {name} {version}"]
    if experiment:
        parts.append(f"experiment {experiment}")
    if miou is not None:
        parts.append(f"val mIoU {100 * miou:.2f}")
    return "; ".join(parts)


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


# ----------------------------------------------------------------------------- show


def show(root: Path | str, name: str | None = None, fetch: bool = True) -> list[dict]:
    """Every registered version (of `name`, else of every model in dvc.yaml), newest first:
    its stages, val mIoU with its interval, data hash, the params changed since the previous
    version, commit and experiment."""
    from pipeline import compare
    from pipeline.params import yaml_load

    names = [name] if name else sorted(models(root))
    if name:
        _known_model(root, name)
    if fetch:
        fetch_tags(root)
    p = _root_params(root)
    rows = []
    for model in names:
        versions = _gto_versions(root, model)
        holders = _stage_holders(root, model)
        params_at = {}
        for v in versions:
            text = _show(root, v["commit_hexsha"], "params.yaml")
            params_at[v["version"]] = _flatten(yaml_load(text or "") or {})
        ordered = sorted(versions, key=lambda v: _semver_key(v["version"]))
        previous = {
            v["version"]: (ordered[i - 1]["version"] if i else None) for i, v in enumerate(ordered)
        }
        for v in versions:
            commit = v["commit_hexsha"]
            what = f"{model}@{v['version']}"
            row = {
                "name": model,
                "version": v["version"],
                "stages": sorted(s for s, held in holders.items() if held == v["version"]),
                "commit": commit,
                "experiment": experiment_of(root, commit),
                "created_at": str(v.get("created_at") or ""),
                "miou": None,
                "miou_lo": None,
                "miou_hi": None,
                "data_sha256": None,
                "params_changed": None,
                "note": None,
            }
            prev = previous[v["version"]]
            if prev is not None:
                old, new = params_at[prev], params_at[v["version"]]
                row["params_changed"] = {
                    k: [old.get(k), new.get(k)]
                    for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k)
                }
            metrics = recorded_metrics(root, commit) or {}
            row["miou"] = metrics.get("miou")
            row["data_sha256"] = ((metrics.get("provenance") or {}).get("data") or {}).get("sha256")
            try:
                counts = recorded_counts(root, commit, what)
            except (RegistryError, SegError) as exc:
                counts, row["note"] = None, str(exc)
            if counts is not None:
                iv = compare.miou_interval(
                    counts, p.registry.resamples, p.registry.seed, p.registry.level
                )
                row.update(miou=iv.value, miou_lo=iv.lo, miou_hi=iv.hi)
                row["data_sha256"] = counts.meta.get("data_sha256")
            rows.append(row)
    return rows


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _semver_key(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def _root_params(root: Path | str):
    from pipeline.params import load_params

    return load_params(Path(root) / "params.yaml")


# ----------------------------------------------------------------------------- scores


@contextlib.contextmanager
def _cwd(root: Path | str) -> Iterator[None]:
    """The stage functions read params' relative paths from the working directory."""
    old = os.getcwd()
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(old)


def current_data(root: Path | str, p) -> str | None:
    """The sha256 of this clone's val manifest (None: no val shards here)."""
    from pipeline import provenance
    from stages import steps

    with _cwd(root):
        try:
            return provenance.data_hash(steps.shard_dir(p, p.data.val_split))["sha256"]
        except SegError:
            return None


def score(root: Path | str, v: Version | None, checkpoint: Path | None, p, settings: dict | None):
    """Score a version's weights (or a checkpoint file) on this clone's val shards with the
    given eval settings (None: params.yaml's), into {outputs}/registry/scores/... once per
    weights, data and settings; returns its FrameCounts."""
    from pipeline import compare
    from pipeline.engine.checkpoint import sha256_file
    from stages import steps

    if v is not None:
        checkpoint = fetch(root, v)
    checkpoint = Path(checkpoint)
    p = _with_settings(p, settings) if settings else p
    data = current_data(root, p)
    if data is None:
        what = v.ref if v else str(checkpoint)
        raise RegistryError(f"{what}: scoring it needs this clone's val shards (`dvc pull`)")
    key = json.dumps(
        [sha256_file(checkpoint), data, dataclasses.asdict(p.evaluate)], sort_keys=True
    )
    out = cache_dir(root) / "scores" / hashlib.sha256(key.encode()).hexdigest()[:16]
    counts_file = out / compare.FILE
    if not counts_file.is_file():
        with _cwd(root):
            steps.evaluate(
                p, checkpoint=checkpoint.resolve(), out=out.resolve(), history=False,
                registry=v.provenance() if v else None,
            )  # fmt: skip
    return compare.read_frame_counts(counts_file, name=v.ref if v else str(checkpoint))


def _with_settings(p, settings: dict):
    """params with the evaluate section's scoring settings replaced by `settings`."""
    e = dataclasses.replace(
        p.evaluate,
        mode=settings["mode"],
        scales=list(settings["scales"]),
        flip=settings["flip"],
        output_stride=settings["output_stride"],
        **{k: list(settings[k]) for k in ("crop_size", "stride") if k in settings},
    )
    return dataclasses.replace(p, evaluate=e)


def _settings_of(p, root: Path | str) -> dict:
    """params.yaml's eval settings (the output stride: evaluate.output_stride, else the
    train model's)."""
    from pipeline import compare

    e = dataclasses.asdict(p.evaluate)
    return compare.eval_settings(e, p.evaluate.output_stride or p.train.model.output_stride)


def counts_of(root: Path | str, text: str, p):
    """The per-image counts `seg compare` reads for A or B: a registry reference, an eval
    folder or its parquet file, a checkpoint (scored here), or a commit or experiment (its
    recorded evaluation)."""
    from pipeline import compare

    ref = parse_ref(text)
    path = Path(text)
    if ref is not None and not path.exists():
        v = resolve(root, ref)
        counts = recorded_counts(root, v.commit, str(ref))
        if counts is None:
            raise RegistryError(
                f"{ref}: its evaluation recorded no per-image counts; score it: `seg eval --model {ref}`"
            )
        return counts
    if path.is_dir():
        return compare.read_frame_counts(path / compare.FILE, name=str(path / compare.FILE))
    if path.suffix == ".parquet":
        return compare.read_frame_counts(path)
    if path.is_file():
        return score(root, None, path, p, None)
    commit, _ = resolve_commit(root, text)
    counts = recorded_counts(root, commit, text)
    if counts is None:
        raise RegistryError(f"{text}: commit {commit[:8]} recorded no per-image counts")
    return counts


# ----------------------------------------------------------------------------- gate


@dataclasses.dataclass
class Outcome:
    """What the gate decided, and what a promotion did.

    `passed`: the candidate may take the stage (no holder yet, or ΔmIoU's lower bound above
    min_gain); `regression`: ΔmIoU's upper bound is below -max_drop (a scheduled run fails);
    `line`: one line that says so ("not promoted: ΔmIoU +0.4 [-0.3, +1.1] (min_gain 0.0)");
    `notes`: what was scored again and why; `tag`: the stage tag a promotion created."""

    name: str
    stage: str
    candidate: Version
    holder: Version | None
    comparison: object | None  # pipeline.compare.Comparison
    passed: bool
    regression: bool
    line: str
    min_gain: float
    max_drop: float
    notes: list[str] = dataclasses.field(default_factory=list)
    tag: str | None = None
    forced: bool = False

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "stage": self.stage,
            "candidate": self.candidate.provenance(),
            "holder": self.holder.provenance() if self.holder else None,
            "passed": self.passed,
            "regression": self.regression,
            "line": self.line,
            "min_gain": self.min_gain,
            "max_drop": self.max_drop,
            "notes": self.notes,
            "tag": self.tag,
            "forced": self.forced,
            "comparison": self.comparison.to_dict() if self.comparison is not None else None,
        }


def gate(
    root: Path | str, name: str, candidate: str | Version, stage: str = "prod", p=None,
    fetch: bool = True,
) -> Outcome:  # fmt: skip
    """The candidate (a version string, or a Version) against the version holding `stage`,
    on the same val frames with the same eval settings: a paired bootstrap of ΔmIoU
    (registry.resamples, .seed, .level). Passes when there is no holder yet, or when the
    interval's lower bound is above registry.min_gain; a regression when its upper bound is
    below -registry.max_drop. Changes nothing."""
    from pipeline import compare

    p = p or _root_params(root)
    r = p.registry
    if isinstance(candidate, str):
        candidate = resolve(root, Ref(name, candidate), fetch=fetch)
        fetch = False
    stages = allowed_stages(root)
    if stages is not None and stage not in stages:
        raise RegistryError(f"{name}#{stage}: unknown stage {stage!r}; stages: {', '.join(stages)}")
    if fetch:
        fetch_tags(root)
    held = _stage_holder(root, name, stage)

    def outcome(holder, comparison, passed, regression, line, notes=()):
        return Outcome(
            name, stage, candidate, holder, comparison, passed, regression, line, r.min_gain,
            r.max_drop, list(notes),
        )  # fmt: skip

    if held is None:
        return outcome(None, None, True, False, f"{candidate.ref}: no version holds {stage} yet")
    holder = resolve(root, Ref(name, held), fetch=False)
    holder = dataclasses.replace(holder, stage=stage)
    if holder.commit == candidate.commit:
        return outcome(holder, None, False, False, f"{candidate.ref} holds {stage} already")
    a, b, notes = _comparable_counts(root, holder, candidate, p)
    c = compare.paired_bootstrap(a, b, r.resamples, r.seed, r.level)
    lo, hi = c.delta.lo, c.delta.hi
    passed = lo is not None and 100 * lo > r.min_gain
    regression = hi is not None and 100 * hi < -r.max_drop
    against = f"against {holder.ref}"
    if passed:
        line = f"promoted: {c.line()} {against} (min_gain {r.min_gain})"
    elif regression:
        line = f"regression: {c.line()} {against} (max_drop {r.max_drop})"
    else:
        line = f"not promoted: {c.line()} (min_gain {r.min_gain}) {against}"
    return outcome(holder, c, passed, regression, line, notes)


def _comparable_counts(root: Path | str, holder: Version, candidate: Version, p):
    """The two versions' per-image counts on the same val frames and settings: as recorded
    where they agree; otherwise what differs is scored again here, on this clone's val
    shards (the current data), with the candidate's settings (params.yaml's where the
    candidate itself is scored again)."""
    from pipeline import compare

    notes = []
    a = recorded_counts(root, holder.commit, holder.ref)
    b = recorded_counts(root, candidate.commit, candidate.ref)
    if a is not None and b is not None and compare.why_not_comparable(a, b) is None:
        return a, b, notes
    now = current_data(root, p)
    if now is None:
        why = (
            "no per-image counts recorded"
            if a is None or b is None
            else compare.why_not_comparable(a, b)
        )
        raise RegistryError(
            f"{candidate.ref} against {holder.ref}: {why}; scoring again needs this clone's "
            "val shards (`dvc pull`)"
        )
    if b is None or b.meta.get("data_sha256") != now:
        why = (
            "no per-image counts recorded"
            if b is None
            else f"scored on val data {str(b.meta.get('data_sha256'))[:12]}"
        )
        b = score(root, candidate, None, p, None)
        notes.append(f"{candidate.ref} scored again on the current val data {now[:12]} ({why})")
    settings = b.meta["eval"]
    if a is None or a.meta.get("data_sha256") != now or a.meta.get("eval") != settings:
        why = (
            "no per-image counts recorded"
            if a is None
            else compare.why_not_comparable(a, b) or "other settings"
        )
        a = score(root, holder, None, p, settings)
        notes.append(f"{holder.ref} scored again on the current val data {now[:12]} ({why})")
    return a, b, notes


def promote(
    root: Path | str,
    name: str,
    version: str,
    stage: str = "prod",
    force: bool = False,
    reason: str | None = None,
    push: bool = True,
    p=None,
) -> Outcome:
    """Run the gate and assign `stage` to `name`@`version` only when it passes (or `force`,
    with a `reason`, which the tag records). The stage tag goes to origin; when origin already
    has a tag of that name (a concurrent promotion), the tags are fetched and the gate runs
    again against the stage's new holder. A gate that does not pass changes nothing."""
    import gto.api
    from gto.exceptions import GTOException

    if force and not (reason and reason.strip()):
        raise RegistryError('--force needs --reason "...": the stage tag records why')
    _known_model(root, name)
    remote = push and has_origin(root)
    notes: list[str] = []
    for _ in range(PROMOTE_TRIES):
        fetch_tags(root, required=remote)
        out = gate(root, name, version, stage, p, fetch=False)
        out.notes = notes + out.notes
        if out.holder is not None and out.holder.commit == out.candidate.commit:
            return out
        if not out.passed and not force:
            return out
        message = out.line
        if force and not out.passed:
            out.forced = True
            message = f"forced by hand: {reason.strip()}; the gate said: {out.line}"
            out.line = f"forced: {out.candidate.ref} -> {stage} ({reason.strip()}); the gate said: {out.line}"
        _after_last_stage_tag(root, name)
        try:
            # force: GTO would refuse a version it still counts in the stage (assigned once,
            # never unassigned) though another version was assigned after it
            event = gto.api.assign(
                str(root), name, stage, version=out.candidate.version, message=message,
                force=True,
            )  # fmt: skip
        except GTOException as exc:
            raise RegistryError(f"{out.candidate.ref} -> {stage}: {exc}") from None
        tag = event.tag
        if not remote or _push_tag(root, tag):
            out.tag = tag
            return out
        _delete_tag(root, tag)
        notes.append(f"{tag} was taken on {ORIGIN} by a concurrent promotion: gated again")
        log.info("%s", notes[-1])
    raise RegistryError(
        f"{name}@{version} -> {stage}: {ORIGIN} rejected the stage tag {PROMOTE_TRIES} times"
    )


def _after_last_stage_tag(root: Path | str, name: str) -> None:
    """GTO orders a stage's assignments by their tags' time, in whole seconds: wait for the
    next second when the newest tag of `name` was made in this one, so ours sorts after it."""
    out = _git(
        root, "for-each-ref", "--sort=-taggerdate", "--count=1", "--format=%(taggerdate:unix)",
        f"refs/tags/{name}#*",
    ).stdout.strip()  # fmt: skip
    if out and int(out) >= int(time.time()):
        time.sleep(int(out) + 1 - time.time())

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

Here: refs, models, versions, register and show. A version's files: stages/model_files.py;
the gate and promotion: stages/gate.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from pipeline.errors import SegError
from stages.model_files import (  # noqa: F401  (RegistryError: the registry's error too)
    RegistryError,
    _git,
    _last_line,
    _outputs,
    _publish,
    _show,
    eval_paths,
    log,
    recorded_counts,
    recorded_metrics,
)

ORIGIN = "origin"
FIRST_VERSION = "v0.1.0"
BUMPS = ("major", "minor", "patch")
PROMOTE_TRIES = 3  # a rejected stage tag: fetch, gate again, and try once more (twice)

_REF = re.compile(
    r"^(?P<name>[a-z0-9][a-z0-9_/-]*[a-z0-9])"
    r"(?:@(?P<version>v?\d+\.\d+\.\d+)|#(?P<stage>[a-z0-9][a-z0-9_-]*))$"
)


# ----------------------------------------------------------------------------- git


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
    pruned = pruned_at(root, commit)
    if pruned is not None:
        raise RegistryError(
            f"{rev}: a sweep's trial pruned at step {pruned}: its weights are not a finished model"
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


def pruned_at(root: Path | str, commit: str) -> int | None:
    """The step a sweep's pruner stopped the commit's training at (the `pruned` mark in its
    DVCLive metrics, git-tracked), None for a finished training."""
    text = _show(root, commit, f"{_outputs(root, commit)}/train/dvclive/metrics.json")
    try:
        pruned = json.loads(text).get("pruned") if text else None
    except (json.JSONDecodeError, AttributeError):
        return None
    return int(pruned) if isinstance(pruned, int | float) else None


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

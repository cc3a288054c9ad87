"""The promotion gate: the candidate against the stage's holder on the same val frames, a paired
bootstrap of ΔmIoU (pipeline.compare); it passes when the interval's lower bound is above
registry.min_gain. A side scored on other val data than this clone's val shards (or, for the
holder, with other eval settings than the candidate) is scored again here first, so a gate
never refuses forever after the val data changed. `gate` and `promote` are the entry points for
a scheduled flow: no Prefect, nothing printed; an Outcome whose `line` is what to report."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import SegError
from stages.model_files import RegistryError, _git, cache_dir, fetch, log, recorded_counts
from stages.registry import (
    ORIGIN,
    PROMOTE_TRIES,
    Ref,
    Version,
    _delete_tag,
    _known_model,
    _push_tag,
    _root_params,
    _stage_holder,
    allowed_stages,
    fetch_tags,
    has_origin,
    parse_ref,
    resolve,
    resolve_commit,
)

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

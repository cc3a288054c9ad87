"""How `seg train` starts: a new run, or which checkpoint it continues, and the lines that say
so (`seg train`, `dvc repro` and the flows' logs print them)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from enum import StrEnum
from pathlib import Path

from pipeline.params import Params

log = logging.getLogger("seg")


class Resume(StrEnum):
    """What `train` does with an existing last.pt."""

    NEW = "new"  # start a new run (`seg train`)
    CONTINUE = "continue"  # continue it, or fail saying why (`seg train --resume`)
    AUTO = "auto"  # continue an unfinished run of the same params, else start a new one
    #                (`seg train --auto-resume`: dvc repro, the flows)

    @classmethod
    def from_flags(cls, resume: bool, auto_resume: bool) -> Resume:
        """The mode of `seg train [--resume | --auto-resume]`."""
        return cls.AUTO if auto_resume else cls.CONTINUE if resume else cls.NEW


# params that change neither the weights nor the data order: a resume may change them
_RESUME_FREE = ("device", "val_interval", "checkpoint_interval", "keep_best", "log_every")


# what a checkpoint needs to be continued exactly (a best-*.pt snapshot holds only weights)
_RESUME_KEYS = ("model", "optimizer", "step", "params")


@dataclasses.dataclass
class ResumePlan:
    """How `train` starts: `checkpoint` to continue (None: a new run), and the lines that say
    so, in order (`seg train` prints them; dvc repro and the flows' logs show them)."""

    checkpoint: Path | None
    notes: list[str]


def plan_resume(last: Path, p: Params, mode: Resume, set_aside: bool = True) -> ResumePlan:
    """Which checkpoint a run continues.

    NEW (`seg train`): none. CONTINUE (`--resume`): `last` (last.pt), or an error saying why
    it cannot be continued (missing, damaged, other params, finished). AUTO (`--auto-resume`:
    dvc repro, the flows): the newest readable of last.pt and last-prev.pt (the checkpoint
    saved before it). A damaged one (truncated, empty, failing its CRC check, a foreign file)
    is renamed to `NAME.damaged-<time>` (`set_aside`; False on the other ranks of a torchrun
    job, which only skip it) and named in one line. The first readable one is continued if it
    is an unfinished run of the same params; otherwise the run starts afresh, saying why, so
    a changed lr or `dvc repro -f` really retrains.

    best-*.pt snapshots are not fallbacks: they hold the weights but not the optimizer's
    momentum, the loss scaler, the RNG states or the data position, so a run continued from
    one would not be the run it was. With nothing readable left, the run starts afresh with
    the same seed; on CPU that retrains to the very same weights, only the time is lost."""
    from pipeline.engine import checkpoint
    from pipeline.errors import CheckpointError, DamagedCheckpoint

    mode = Resume(mode)
    if mode is Resume.NEW:
        return ResumePlan(None, ["starting a new run"])
    strict = mode is Resume.CONTINUE
    notes: list[str] = []
    damaged = False
    for path in [last] if strict else [last, checkpoint.previous_path(last)]:
        if not path.is_file():
            continue
        try:
            ckpt = checkpoint.load(path)
            missing = [k for k in _RESUME_KEYS if k not in ckpt]
            if missing:
                raise DamagedCheckpoint(
                    f"{path}: not a resumable checkpoint (no {', '.join(missing)}: a best-*.pt "
                    "snapshot or another program's file?)"
                )
        except DamagedCheckpoint as exc:
            if strict:
                prev = checkpoint.previous_path(last)
                hint = f": --auto-resume sets it aside and continues {prev.name}"
                raise CheckpointError(
                    f"{exc}; cannot resume" + (hint if prev.is_file() else "")
                ) from None
            damaged = True
            if set_aside:
                aside = checkpoint.set_aside(path)
                notes.append(f"{exc}; kept aside as {aside.name}")
            else:
                notes.append(f"{exc}; skipped")
            continue
        reason = _why_not_resumable(ckpt, p)
        if reason:
            if strict:
                raise CheckpointError(f"{path}: cannot resume: {reason}")
            return ResumePlan(None, [*notes, f"starting a new run: {path}: {reason}"])
        step = int(ckpt["step"])
        return ResumePlan(
            path, [*notes, f"resumed from {path} at step {step} of {p.train.iterations}"]
        )
    if strict:
        raise CheckpointError(f"{last}: cannot resume: no checkpoint yet")
    why = "no readable checkpoint left" if damaged else "no checkpoint yet"
    return ResumePlan(None, [*notes, f"starting a new run: {last.parent}: {why}"])


def is_train_note(line: str) -> bool:
    """Is this output line of `seg train` one of plan_resume's notes? (The flows put them in
    the run's stage table.)"""
    return line.startswith(("resumed from ", "starting a new run", "fetched ")) or (
        "; kept aside as " in line
    )


def _why_not_resumable(ckpt: dict, p: Params) -> str | None:
    """Why a readable checkpoint cannot be continued with these params (None: it can)."""
    old, new = ckpt.get("params") or {}, dataclasses.asdict(p.train)
    changed = sorted(k for k in new if k not in _RESUME_FREE and old.get(k) != new[k])
    if changed:
        return "trained with other params: " + ", ".join(f"train.{k}" for k in changed)
    if int(ckpt.get("step", 0)) >= p.train.iterations:
        return f"the run finished at step {ckpt.get('step')}"
    return None


def agree_on_resume(plan: ResumePlan | None) -> ResumePlan:
    """Under torchrun, every process continues what rank 0 decided (`plan`, None on the
    others): the same checkpoint, checked by its sha256, or a new run. A process whose disk
    lacks that checkpoint, or holds another file under its name (another node after a
    crash), gets rank 0's bytes. One process: `plan` as it is."""
    from pipeline.atomic import atomic_path
    from pipeline.engine.checkpoint import sha256_file
    from pipeline.engine.distributed import broadcast_object, gather_objects, rank_world

    rank, world = rank_world()
    if world == 1:
        assert plan is not None
        return plan
    decision = None
    if rank == 0:
        assert plan is not None
        ckpt = plan.checkpoint
        decision = {"notes": plan.notes, "path": str(ckpt) if ckpt else None,
                    "sha256": sha256_file(ckpt) if ckpt else None}  # fmt: skip
    decision = broadcast_object(decision)
    if decision["path"] is None:
        return ResumePlan(None, decision["notes"])
    path = Path(decision["path"])
    have = path.is_file() and sha256_file(path) == decision["sha256"]
    if not all(gather_objects(have)):
        data = broadcast_object(path.read_bytes() if rank == 0 else None)
        if not have:
            with atomic_path(path, suffix=".pt") as tmp:
                tmp.write_bytes(data)
            log.info("rank %d: %s from rank 0 (sha256 %s)", rank, path, decision["sha256"])
    return ResumePlan(path, decision["notes"])


@dataclasses.dataclass
class RunStore:
    """The run store of `seg train` under a flow (SEG_RUN_STORE, SEG_RUN_NAME: set by the
    flow for its stages): where each checkpoint is copied while training, and where the next
    run of the same work starts from (pipeline/engine/runstore.py)."""

    where: str
    run: str

    @classmethod
    def from_env(cls) -> RunStore | None:
        where = os.environ.get("SEG_RUN_STORE")
        return cls(where, os.environ.get("SEG_RUN_NAME", "")) if where else None

    def push(self, path: Path, step: int) -> None:
        from pipeline import store
        from pipeline.engine import runstore

        copy = runstore.push(path, self.where, step, self.run)
        runstore.prune(self.where, self.run, copy)
        log.info("checkpoint at step %d pushed to %s", step, store.display(copy.url))

    def adopt(self, last: Path, p: Params) -> list[str]:
        """The newest copy in the store that loads and continues with these params, as
        last.pt, when it is further along than the last.pt here (a new workspace has its
        commit's, or none). Returns the line that says so (or none)."""
        from pipeline import store
        from pipeline.atomic import atomic_path
        from pipeline.engine import checkpoint, runstore
        from pipeline.errors import DamagedCheckpoint

        here = -1
        if last.is_file():
            with contextlib.suppress(DamagedCheckpoint):
                ckpt = checkpoint.load(last)
                if _why_not_resumable(ckpt, p) is None:
                    here = int(ckpt["step"])
        notes = []
        for copy in runstore.copies(self.where):
            if copy.step <= here:
                break
            try:
                with atomic_path(last, suffix=".pt") as tmp:
                    runstore.fetch(copy, tmp)
                    why = _why_not_resumable(checkpoint.load(tmp), p)
                    if why:
                        raise _Unfit(why)
            except (DamagedCheckpoint, _Unfit) as exc:
                notes.append(f"{store.display(copy.url)}: {exc}; skipped")
                continue
            return [*notes, f"fetched {store.display(copy.url)} (step {copy.step}, pushed by "
                    f"run {copy.run}) as {last}"]  # fmt: skip
        return notes


class _Unfit(Exception):
    """A stored checkpoint that does not continue with these params."""

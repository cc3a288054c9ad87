"""Faults survived: a run says how it started, a damaged last.pt falls back to the checkpoint
before it, files get the umask's mode, and a full disk stops a stage in one line with the
previous outputs intact.

The trainings are tiny (64x64 crops, batch 2, 6 steps, a separable head, amp off) and share one project: the
run never interrupted, and the same run stopped after step 4 (last.pt at 4, last-prev.pt
at 2), which each fallback case copies and damages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import make_project
from typer.testing import CliRunner

from pipeline.atomic import atomic_copy, atomic_dir, atomic_files, atomic_path, atomic_write
from pipeline.engine import checkpoint
from pipeline.errors import DamagedCheckpoint
from stages import steps
from stages.cli import app

# tests that train run without autocast (bf16 is 30x slower on AVX2-only CPUs)
AMP_OFF = {"train.amp": "off", "evaluate.amp": "off"}
# checkpoints at steps 2, 4, 6; a separable head: 38 MB checkpoints instead of 94 MB
RUN = ["-S", "train.iterations=6", "-S", "train.val_interval=3"]
RUN += ["-S", "train.model.separable_head=true"]

runner = CliRunner()


def _params(*extra: str):
    return steps.load("params.yaml", [s for s in RUN if s != "-S"] + list(extra))


def _weights(path: Path) -> dict:
    return checkpoint.load(path)["model"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(scratch) -> dict[str, Path]:
    """{"whole": a 6-step run never interrupted, "stopped": the same run stopped after step 4}."""
    base = make_project(scratch("faults") / "base", **AMP_OFF)
    stopped = base.parent / "stopped"
    shutil.copytree(base, stopped)
    cwd = os.getcwd()
    try:
        os.chdir(base)
        steps.train(_params())
        os.chdir(stopped)
        steps.train(_params(), stop_after=4)
    finally:
        os.chdir(cwd)
    return {"whole": base, "stopped": stopped}


@pytest.fixture
def stopped(runs, tmp_path, monkeypatch) -> Path:
    """A copy of the stopped run, the cwd of the test."""
    path = shutil.copytree(runs["stopped"], tmp_path / "p")
    monkeypatch.chdir(path)
    return path


def _stdout_lines(result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- resume you see


def test_stopped_run_keeps_the_checkpoint_before_last(runs):
    out = runs["stopped"] / "outputs/train"
    assert checkpoint.load(out / "last.pt")["step"] == 4
    assert checkpoint.load(out / "last-prev.pt")["step"] == 2
    assert checkpoint.load(runs["whole"] / "outputs/train/last.pt")["step"] == 6


def test_train_says_on_stdout_how_it_starts(stopped, runs):
    result = runner.invoke(app, ["train", "--auto-resume", *RUN])
    assert result.exit_code == 0, result.output
    assert _stdout_lines(result)[0] == "resumed from outputs/train/last.pt at step 4 of 6"
    whole = runs["whole"] / "outputs/train/last.pt"
    assert _same(_weights(stopped / "outputs/train/last.pt"), _weights(whole))
    # the other starts, and why (the lines `seg train` prints are these notes)
    last = Path("outputs/train/last.pt")
    assert steps.plan_resume(last, _params(), steps.Resume.AUTO).notes == [
        "starting a new run: outputs/train/last.pt: the run finished at step 6"
    ]
    assert steps.plan_resume(last, _params(), steps.Resume.NEW).notes == ["starting a new run"]
    assert steps.plan_resume(last, _params("train.lr=0.02"), steps.Resume.AUTO).notes == [
        "starting a new run: outputs/train/last.pt: trained with other params: train.lr"
    ]
    assert steps.plan_resume(Path("elsewhere/last.pt"), _params(), steps.Resume.AUTO).notes == [
        "starting a new run: elsewhere: no checkpoint yet"
    ]


# ----------------------------------------------------------------------------- damaged last.pt


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _flip_middle(path: Path) -> None:
    """Three bytes in the middle of the file inverted in place: tensor data, which torch.load
    reads without complaint (it checks no CRC); only the zip's CRC-32 catches it."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + 3):
        data[i] ^= 0xFF
    with open(path, "r+b") as f:
        f.write(data)


def _foreign_text(path: Path) -> None:
    path.write_text("<html><body>404 Not Found</body></html>\n")


def _foreign_snapshot(path: Path) -> None:
    """A weights-only snapshot copied over last.pt (as someone might with best.pt)."""
    ckpt = checkpoint.load(path)
    checkpoint.save_atomic({k: ckpt[k] for k in ("model", "model_config", "step")}, path)


DAMAGE = {
    "truncated": (_truncate, "not a readable checkpoint (zip archive cut short"),
    "zero bytes": (_empty, "not a readable checkpoint (empty file)"),
    "bytes flipped": (_flip_middle, "damaged checkpoint (archive/data/"),
    "foreign file": (_foreign_text, "not a readable checkpoint (not a file of weights"),
    "weights only": (_foreign_snapshot, "not a resumable checkpoint (no optimizer"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_auto_resume_sets_a_damaged_last_aside_and_falls_back(stopped, case):
    damage, why = DAMAGE[case]
    last = Path("outputs/train/last.pt")
    damage(last)
    damaged = last.read_bytes()
    if case != "weights only":  # that one loads: it is a checkpoint, but not one to resume
        with pytest.raises(DamagedCheckpoint, match="last.pt"):
            checkpoint.load(last)
    plan = steps.plan_resume(last, _params(), steps.Resume.AUTO)
    (aside,) = last.parent.glob("last.pt.damaged-*")  # renamed, not deleted
    assert aside.read_bytes() == damaged and not last.exists()
    assert plan.checkpoint == last.parent / "last-prev.pt"
    # one line names the damaged file and where it was kept, then how training goes on
    assert len(plan.notes) == 2
    assert plan.notes[0].startswith(f"outputs/train/last.pt: {why}"), plan.notes[0]
    assert plan.notes[0].endswith(f"; kept aside as {aside.name}"), plan.notes[0]
    assert plan.notes[1] == "resumed from outputs/train/last-prev.pt at step 2 of 6"


def test_damaged_last_resumed_from_the_one_before_ends_at_the_same_weights(stopped, runs):
    """`seg train --auto-resume` (the DVC stage, the flows) past a bit-flipped last.pt: it
    says so on stdout, continues last-prev.pt (step 2) and ends where the run never
    interrupted ended."""
    _flip_middle(stopped / "outputs/train/last.pt")
    result = runner.invoke(app, ["train", "--auto-resume", *RUN])
    assert result.exit_code == 0, result.output
    first, second = _stdout_lines(result)[:2]
    assert first.startswith("outputs/train/last.pt: damaged checkpoint (archive/data/"), first
    assert "fails its CRC-32 check); kept aside as last.pt.damaged-" in first, first
    assert second == "resumed from outputs/train/last-prev.pt at step 2 of 6"
    whole, out = runs["whole"] / "outputs/train", stopped / "outputs/train"
    assert checkpoint.load(out / "last.pt")["step"] == 6
    assert _same(_weights(out / "last.pt"), _weights(whole / "last.pt"))
    assert _same(_weights(out / "best.pt"), _weights(whole / "best.pt"))


def test_nothing_readable_left_starts_a_new_run(stopped):
    last = Path("outputs/train/last.pt")
    _truncate(last)
    _empty(last.parent / "last-prev.pt")
    plan = steps.plan_resume(last, _params(), steps.Resume.AUTO)
    assert plan.checkpoint is None
    assert plan.notes[0].startswith("outputs/train/last.pt: not a readable checkpoint")
    assert plan.notes[1].startswith("outputs/train/last-prev.pt: not a readable checkpoint")
    assert plan.notes[2:] == ["starting a new run: outputs/train: no readable checkpoint left"]
    assert len(list(last.parent.glob("last*.pt.damaged-*"))) == 2
    # a new run with the same seed retrains to the same weights (test_engine's kill and
    # resume test compares those): only the time is lost


def test_strict_resume_refuses_a_damaged_last_in_one_line(stopped):
    _flip_middle(stopped / "outputs/train/last.pt")
    before = sorted(p.name for p in (stopped / "outputs/train").iterdir())
    result = runner.invoke(app, ["train", "--resume", *RUN])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    line = lines[0]
    assert line.startswith("error: outputs/train/last.pt: damaged checkpoint (archive/data/"), line
    assert line.endswith(
        "fails its CRC-32 check); cannot resume: --auto-resume sets it aside and continues "
        "last-prev.pt"
    ), line
    assert sorted(p.name for p in (stopped / "outputs/train").iterdir()) == before


# ----------------------------------------------------------------------------- modes


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_atomic_writes_get_the_umask_mode(tmp_path, umask):
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert _mode(plain) == file_mode  # what open() gives: the reference
    atomic_write(tmp_path / "a.json", "{}")
    atomic_copy(tmp_path / "a.json", tmp_path / "b.json")
    with atomic_path(tmp_path / "c.png", suffix=".png") as tmp:
        tmp.write_bytes(b"png")
    with atomic_files() as new:
        new(tmp_path / "d.json").write_text("{}")
        new(tmp_path / "e.parquet").write_bytes(b"pq")
    checkpoint.save_atomic({"model": {"w": torch.ones(1)}}, tmp_path / "f.pt")
    checkpoint.save_atomic({"model": {"w": torch.ones(1)}}, tmp_path / "f.pt", keep_previous=True)
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "shard.tar").write_bytes(b"tar")
    files = ["a.json", "b.json", "c.png", "d.json", "e.parquet", "f.pt", "f-prev.pt"]
    assert {f: _mode(tmp_path / f) for f in files} == dict.fromkeys(files, file_mode)
    assert _mode(tmp_path / "folder") == dir_mode
    assert _mode(tmp_path / "folder" / "shard.tar") == file_mode


def test_pipeline_outputs_get_the_umask_mode(runs, tmp_path, monkeypatch, umask):
    """Shards and manifest, checkpoints, metrics.json, per_class_iou.json, confusion.png and
    the run history, written under the umask by the stages themselves."""
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    proj = tmp_path / "p"
    shutil.copytree(runs["stopped"], proj, ignore=shutil.ignore_patterns("shards", "outputs"))
    monkeypatch.chdir(proj)
    for split in ("train", "val"):
        result = runner.invoke(
            app, ["preprocess", "data/synthetic", split, f"data/shards/{split}", "--workers", "1",
                  "--samples-per-shard", "4"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    # two steps, a checkpoint after each: last.pt, last-prev.pt, best.pt and its snapshot
    short = ["-S", "train.iterations=2", "-S", "train.checkpoint_interval=1"]
    result = runner.invoke(app, ["train", *RUN, *short])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", "--checkpoint", "outputs/train/last.pt"])
    assert result.exit_code == 0, result.output
    written = [
        *Path("data/shards/train").iterdir(),
        *Path("outputs/train").glob("*.pt"),
        Path("outputs/train/summary.json"),
        *(Path("outputs/eval") / n for n in ("metrics.json", "per_class_iou.json", "confusion.png", "confusion.json")),
        Path("outputs/runs.parquet"),
    ]  # fmt: skip
    names = {p.name for p in written}
    assert {"manifest.parquet", "last.pt", "last-prev.pt", "best.pt"} <= names, names
    assert {str(p): _mode(p) for p in written} == {str(p): file_mode for p in written}
    assert _mode(Path("data/shards/train")) == dir_mode


# ----------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 256 MiB tmpfs at tmp_path/disk (a real file system that fills up)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """A filler file that leaves `leave` bytes free on `disk`."""
    filler = disk / f"filler-{uuid.uuid4().hex[:6]}"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as f:
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        left = max(0, free - leave)
        while left > 0:
            n = f.write(chunk[: min(len(chunk), left)])
            left -= n
    return filler


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def _temporaries(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob(".*")]


def _disk_full_line(result) -> str:
    """The one error line, last (after what training printed before it)."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.output
    assert "disk full (no space left on device)" in lines[-1], lines[-1]
    assert lines[-1].endswith("free space and run again"), lines[-1]
    return lines[-1]


def test_full_disk_preprocess(stopped, small_disk):
    out = small_disk / "shards"
    args = ["preprocess", "data/synthetic", "train", str(out), "--workers", "1", "--overwrite"]
    assert runner.invoke(app, args).exit_code == 0
    before = _snapshot(out)
    filler = _fill(small_disk, leave=4096)
    line = _disk_full_line(runner.invoke(app, [*args, "--samples-per-shard", "1"]))
    assert line.startswith(f"error: {out}: disk full"), line
    assert _snapshot(out) == before and _temporaries(small_disk) == []
    filler.unlink()
    assert runner.invoke(app, [*args, "--samples-per-shard", "1"]).exit_code == 0
    assert len(list(out.glob("shard-*.tar"))) == 6


def test_full_disk_checkpoint_save_then_resume(stopped, runs, small_disk):
    """The stopped run's outputs on the small disk; the resumed training's first checkpoint
    (step 5) finds it full: one line naming last.pt, which is untouched; with space again the
    rerun resumes from it (step 4) and ends at the uninterrupted run's weights."""
    shutil.copytree(stopped / "outputs", small_disk / "outputs")
    train = small_disk / "outputs/train"
    over = [*RUN, "-S", f"data.outputs={small_disk / 'outputs'}"]
    over += ["-S", "train.checkpoint_interval=1"]  # a resume may change it
    checkpoints = {p.name: p.read_bytes() for p in train.glob("*.pt")}
    # room for the logs and for best.pt's copy at start-up, not for a whole last.pt
    filler = _fill(small_disk, leave=(train / "best.pt").stat().st_size + (1 << 20))
    result = runner.invoke(app, ["train", "--auto-resume", *over])
    line = _disk_full_line(result)
    assert line == (
        f"error: {train / 'last.pt'}: disk full (no space left on device); it was left as it "
        "was: free space and run again"
    )
    assert {p.name: p.read_bytes() for p in train.glob("*.pt")} == checkpoints
    assert _temporaries(small_disk) == []
    filler.unlink()
    result = runner.invoke(app, ["train", "--auto-resume", *over])
    assert result.exit_code == 0, result.output
    assert _stdout_lines(result)[0] == f"resumed from {train / 'last.pt'} at step 4 of 6"
    whole = runs["whole"] / "outputs/train/last.pt"
    assert _same(_weights(train / "last.pt"), _weights(whole))


def test_full_disk_eval(runs, tmp_path, monkeypatch, small_disk):
    proj = shutil.copytree(runs["whole"], tmp_path / "p")
    monkeypatch.chdir(proj)
    out = small_disk / "eval"
    args = ["eval", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    before = _snapshot(out)
    assert {"metrics.json", "per_class_iou.json", "confusion.png"} <= set(before)
    filler = _fill(small_disk, leave=0)
    line = _disk_full_line(runner.invoke(app, args))
    assert line.startswith(f"error: {out}/metrics.json: disk full"), line
    assert _snapshot(out) == before and _temporaries(small_disk) == []
    filler.unlink()
    assert runner.invoke(app, args).exit_code == 0


# ----------------------------------------------------------------------------- killed writes

_HOLD = """
import sys, time
from pathlib import Path
from pipeline.atomic import atomic_dir, atomic_path
kind, target = sys.argv[1], Path(sys.argv[2])
with (atomic_path(target, suffix=".pt") if kind == "file" else atomic_dir(target)) as tmp:
    (tmp / "shard-000000.tar" if kind == "dir" else tmp).write_bytes(b"half written")
    print(tmp, flush=True)
    time.sleep(600)
"""


def _killed_writer(kind: str, target: Path) -> Path:
    """A process writing `target` (a checkpoint, a shard folder) through pipeline.atomic,
    SIGKILLed mid-write: returns the temporary it left. While it lived, a sweep by another
    writer left its temporary alone."""
    proc = subprocess.Popen(
        [os.sys.executable, "-c", _HOLD, kind, str(target)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )  # fmt: skip
    tmp = Path(proc.stdout.readline().strip())
    from pipeline.atomic import sweep

    assert tmp.exists() and sweep(target) == [] and tmp.exists()  # a live writer's
    proc.kill()
    proc.wait()
    return tmp


def test_killed_writes_leave_nothing_after_the_next_start(tmp_path, monkeypatch):
    """A checkpoint save and a preprocess killed mid-write: git ignores what they left, and the
    next `seg train` / `seg preprocess` of the same outputs removes it before it starts."""
    proj = make_project(tmp_path / "proj", **AMP_OFF)
    for name in (".gitignore",):
        shutil.copy(Path(__file__).resolve().parents[1] / name, proj / name)
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    subprocess.run(["git", "add", "-A"], cwd=proj, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"],
                   cwd=proj, check=True)  # fmt: skip
    last = proj / "outputs" / "train" / "last.pt"
    shards = proj / "data" / "shards" / "train"
    left = [_killed_writer("file", last), _killed_writer("dir", shards)]
    assert all(p.exists() for p in left)
    status = subprocess.run(["git", "status", "--porcelain"], cwd=proj, capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    assert all(p.name not in status for p in left), status
    monkeypatch.chdir(proj)
    p = steps.load("params.yaml", ["train.iterations=2"])
    steps.train(p)
    steps.preprocess(p.data.root, "train", shards, samples_per_shard=4, workers=1, overwrite=True)
    assert not any(p.exists() for p in left), left
    assert sorted(x.name for x in last.parent.iterdir() if x.name.startswith(".")) == []
    assert sorted(x.name for x in shards.parent.iterdir() if x.name.startswith(".")) == []


def test_a_folder_replaced_halfway_is_put_back_not_removed(tmp_path):
    """Killed between moving the old folder aside and renaming the new one in: nothing at the
    final path, the user's folder in `.NAME.old-*`. The next write puts it back first."""
    from pipeline.atomic import sweep

    target = tmp_path / "shards"
    aside = tmp_path / ".shards.old-0123abcd"
    (aside / "shards").mkdir(parents=True)
    (aside / "shards" / "manifest.parquet").write_text("the user's")
    assert sweep(target) == [aside]
    assert (target / "manifest.parquet").read_text() == "the user's" and not aside.exists()

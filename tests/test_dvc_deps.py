"""dvc.yaml's deps list the code each stage runs: measured, not assumed.

`dvc repro` runs once with a `sitecustomize` on PYTHONPATH that, in every process DVC starts
for a stage (DVC_STAGE is set there) and in that process's children, records the files of
all loaded modules at exit. Each stage's recorded project files must be covered by its deps
in dvc.yaml, except the presentation-only modules: the CLI's wiring, help texts and
progress bars are not the stage's result, so editing them must rerun nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_dvc import CURRENT, DVC, REPO, _copy, _env, _new_project

# a dvc repro with two folds, recorded: `make test-slow` (and CI) runs it
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# What `seg ...` loads to parse arguments and print; none of it changes a stage's outputs.
PRESENTATION = ("stages/cli.py", "stages/commands/", "stages/progress.py", "stages/errors.py")

HOOK = """
import atexit, json, os, sys

def _record():
    files = sorted({getattr(m, "__file__", None) or "" for m in list(sys.modules.values())})
    out = os.path.join(os.environ["SEG_MODULES_OUT"], f"{os.environ['DVC_STAGE']}.{os.getpid()}.json")
    with open(out, "w") as f:
        json.dump([f for f in files if f], f)

if os.environ.get("DVC_STAGE") and os.environ.get("SEG_MODULES_OUT"):
    atexit.register(_record)
"""


def _run(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    home = cwd.parent / f"{cwd.name}-home"
    home.mkdir(exist_ok=True)
    (home / ".gitconfig").write_text("[user]\n\tname = t\n\temail = t@t\n")
    proc = subprocess.run(
        list(args), cwd=cwd, env={**_env(home), **(env or {})}, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def recorded(scratch) -> tuple[Path, dict[str, set[str]]]:
    """A project after `dvc repro`, then `dvc repro` with 2 folds (so the k-fold stages run
    too), committed, and the project files each stage loaded (relative to the repository)."""
    import yaml

    base = scratch("deps")
    proj = _new_project(base / "proj")
    hook, out = base / "hook", base / "modules"
    hook.mkdir()
    out.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    env = {"PYTHONPATH": str(hook), "SEG_MODULES_OUT": str(out)}
    _run(proj, DVC, "repro", env=env)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["data"].update(folds=2, fold_ids=[0, 1])
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(proj, DVC, "repro", env=env)
    _run(proj, "git", "add", "-A")
    _run(proj, "git", "commit", "-q", "-m", "repro")
    loaded: dict[str, set[str]] = {}
    for dump in out.glob("*.json"):
        stage = dump.name.rsplit(".", 2)[0]
        for f in json.loads(dump.read_text()):
            path = Path(f).resolve()
            if path.is_relative_to(REPO) and path.suffix == ".py":
                loaded.setdefault(stage, set()).add(path.relative_to(REPO).as_posix())
    return proj, loaded


def _deps(proj: Path) -> dict[str, list[str]]:
    """Each pipeline stage's deps as dvc.yaml declares them (templates resolved by DVC)."""
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(proj)) as repo:
        return {
            s.name: [d.def_path for d in s.deps]
            for s in repo.index.stages
            if isinstance(s, PipelineStage)
        }


def test_each_stage_depends_on_the_code_it_runs(recorded) -> None:
    proj, loaded = recorded
    deps = _deps(proj)
    assert set(loaded) == set(deps), "every stage ran in a recorded process"
    missing = {}
    for stage, files in loaded.items():
        code = {f for f in files if f.startswith(("pipeline/", "stages/"))}
        assert code, f"{stage}: no project code recorded"
        runs = {f for f in code if not f.startswith(PRESENTATION)}
        uncovered = sorted(
            f
            for f in runs
            if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps[stage])
        )
        if uncovered:
            missing[stage] = uncovered
    assert not missing, f"add these to the stages' deps in dvc.yaml: {missing}"


def test_deps_name_files_not_whole_packages(recorded) -> None:
    """A folder dep would rerun a stage for any file in it (a help text, another stage's code)."""
    proj, _ = recorded
    for stage, deps in _deps(proj).items():
        folders = [d for d in deps if d.startswith(("pipeline", "stages")) and (proj / d).is_dir()]
        assert not folders, f"{stage}: deps on whole folders {folders}"


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def _status(proj: Path) -> dict:
    return json.loads(_run(proj, DVC, "status", "--json").stdout)


def test_editing_a_cli_help_string_reruns_nothing(recorded, tmp_path: Path) -> None:
    proj = _copy(recorded[0], tmp_path / "proj")
    assert _status(proj) == CURRENT
    _edit(
        proj / "stages" / "commands" / "engine.py",
        "Checkpoint to score (default outputs/train/best.pt).",
        "The checkpoint to evaluate (default: outputs/train/best.pt).",
    )
    assert _status(proj) == CURRENT  # train and evaluate stay up to date: nothing retrains

    # the library code train runs does make it stale (and evaluate reads what train writes)
    shutil.copy2(proj / "pipeline" / "engine" / "train.py", tmp_path / "train.py")
    with open(proj / "pipeline" / "engine" / "train.py", "a") as f:
        f.write("\n# an edit\n")
    stale = _status(proj)
    assert "train" in stale, stale
    assert not {"synth", "preprocess@train", "preprocess@val"} & set(stale), stale
    os.replace(tmp_path / "train.py", proj / "pipeline" / "engine" / "train.py")
    assert _status(proj) == CURRENT

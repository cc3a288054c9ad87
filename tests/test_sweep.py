"""Sweeps (stages/sweep.py, stages/sweep_flow.py, `seg sweep`): the search space in `-S`
syntax, the budget, bad input in one line with nothing started, the study a rerun continues,
and a local sweep end to end (trials in workspaces of their own, one pruned).

The sweeps over a work pool with two workers, a killed worker and a killed sweep are in
tests/test_multihost.py (real servers, two hosts).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.errors import ConfigError
from stages import sweep
from stages.cli import app

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"


def test_the_space_in_dvc_s_syntax():
    space = sweep.parse_space(
        ["train.lr=0.02,0.05", "train.batch_size=range(4,12,4)",
         "train.crop_size=choice([96,96],[128,128])", "train.seed=1"],
        PARAMS,
    )  # fmt: skip
    assert [d.name for d in space.dims] == ["train.lr", "train.batch_size", "train.crop_size"]
    assert space.fixed == ("train.seed=1",)
    grid = space.grid()
    assert len(grid) == space.grid_size() == 8
    assert grid[0] == {"train.lr": "0.02", "train.batch_size": "4", "train.crop_size": "[96, 96]"}
    assert space.overrides(grid[-1]) == [
        "train.seed=1", "train.lr=0.05", "train.batch_size=8", "train.crop_size=[128, 128]"
    ]  # fmt: skip
    # continuous ranges, on a log scale where tagged; a grid has none of them
    space = sweep.parse_space(["train.lr=tag(log, interval(0.001,0.1))",
                               "train.warmup_iters=interval(0,50)"], PARAMS)  # fmt: skip
    lr, warmup = space.dims
    assert (lr.low, lr.high, lr.log, lr.integer) == (0.001, 0.1, True, False)
    assert (warmup.low, warmup.high, warmup.integer) == (0, 50, True)
    dists = space.distributions()
    assert dists["train.lr"].log and dists["train.warmup_iters"].step == 1
    assert Path(PARAMS).read_text() == (REPO / "params.yaml").read_text()  # untouched
    assert sweep.Space.from_dict(json.loads(json.dumps(space.as_dict()))) == space
    # a value is checked with every fixed override, given before or after its axis
    space = sweep.parse_space(["train.lr=0.15,1e-6", "train.min_lr=0"], PARAMS)
    assert space.overrides({"train.lr": space.dims[0].choices[1]}) == [
        "train.min_lr=0", "train.lr=1e-06"
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="train.min_lr 0.0001 is above train.lr 1e-06"):
        sweep.parse_space(["train.lr=0.15,1e-6"], PARAMS)


@pytest.mark.parametrize(
    ("sets", "kw", "message"),
    [
        (["train.lrr=0.1,0.2"], {}, "--set train.lrr: unknown key; valid: "),
        (["train.lr=range(4,"], {}, "-S 'train.lr=range(4,': malformed (no viable alternative"),
        (["train.batch_size=range(4,4)"], {}, "-S 'train.batch_size=range(4,4)': an empty axis"),
        (["train.lr=interval(0.1,0.01)"], {}, "an interval needs low < high"),
        (["train.batch_size=2,4", "train.batch_size=8"], {}, "-S train.batch_size: given twice"),
        (["train.seed=1"], {}, "nothing to sweep: give at least one -S with several values"),
        (["train.lr=0.1,0.2"], {"sampler": "tpe"}, "--sampler tpe needs --trials N"),
        (["train.lr=0.1,0.2"], {"sampler": "bayes"}, "--sampler 'bayes': valid: grid, random"),
        (["train.lr=interval(0.01,0.1)"], {}, "train.lr: interval() has no grid: use --sampler"),
        (["train.seed=range(0,300)"], {}, "the grid has 300 points, more than --max-grid 256"),
        (["train.lr=0.1,0.2"], {"prune": "often"}, "--prune 'often': valid: none, median"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_nothing_starts(sets, kw, message, tmp_path, monkeypatch):
    """Each through `seg sweep` itself, in a project: one line, exit 1, no study, no run."""
    from test_dvc import _new_project

    proj = _project(tmp_path, monkeypatch, _new_project)
    args = ["sweep", "bad", "--local", *(a for s in sets for a in ("-S", s))]
    for k, v in kw.items():
        args += [f"--{k}", v]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0], lines[0]
    assert not (proj / ".dvc/tmp/seg/optuna.journal").exists()
    assert not (proj / ".dvc/tmp/seg/runs").exists()


_PROJECT: dict[str, Path] = {}


def _project(tmp_path: Path, monkeypatch, make) -> Path:
    """One small git + DVC project for the bad-input cases (each test gets a copy)."""
    import shutil

    if "base" not in _PROJECT:
        _PROJECT["base"] = make(tmp_path.parent / "sweep-base")
    proj = tmp_path / "proj"
    shutil.copytree(_PROJECT["base"], proj, symlinks=True)
    monkeypatch.chdir(proj)
    return proj


def test_a_rerun_continues_the_same_sweep_and_refuses_another(tmp_path):
    from stages.sweep_flow import settings_of, study_of

    url = f"journal:{tmp_path / 'optuna.journal'}"
    space = sweep.parse_space(["train.lr=0.1,0.2"], PARAMS)
    settings = sweep.Settings(space.as_dict(), "grid", "none", 2, "abc123")
    study = study_of("s1", url, settings)
    study.ask(space.distributions())
    again = study_of("s1", url, settings)
    assert len(again.trials) == 1 and settings_of(again).commit == "abc123"
    other = sweep.Settings(space.as_dict(), "random", "none", 2, "abc123")
    with pytest.raises(ConfigError, match="sweep 's1' exists with another sampler"):
        study_of("s1", url, other)
    with pytest.raises(ConfigError, match="no sweep named 'nope'"):
        study_of("nope", url)


def test_the_table_ranks_finished_trials_then_running_pruned_failed(tmp_path):
    from optuna.trial import TrialState

    from stages.sweep_flow import markdown, study_of, table

    url = f"journal:{tmp_path / 'optuna.journal'}"
    space = sweep.parse_space(["train.lr=0.1,0.2,0.3,0.4,0.5"], PARAMS)
    study = study_of("s2", url, sweep.Settings(space.as_dict(), "grid", "median", 5, "abc"))
    trials = [study.ask(space.distributions()) for _ in range(5)]
    for t in trials:
        t.set_user_attr("overrides", space.overrides(t.params))
    study.tell(trials[0], 0.30)
    study.tell(trials[1], 0.45)
    trials[2].report(0.10, 100)
    study.tell(trials[2], state=TrialState.PRUNED)
    study.tell(trials[3], state=TrialState.FAIL)  # trials[4] is still running
    rows = table(study)
    assert [(r["trial"], r["state"]) for r in rows] == [
        (1, "complete"), (0, "complete"), (4, "running"), (2, "pruned"), (3, "fail")
    ]  # fmt: skip
    assert rows[0]["val_miou"] == 45.0 and rows[3]["last_reported"] == "10.00 at 100"
    text = markdown(study)
    assert "| 1 | complete | 45.0 |" in text and "data:image/png;base64," in text


# ----------------------------------------------------------------------------- end to end

# 150 steps of the learned recipe, validated every 50: a trial with lr 0.15 learns, one with
# lr 1e-6 does not (lr 0 is refused); TPE with seed 6 hands out 0.15, 0.15, 1e-6 (its random
# start, Optuna 5.0)
SWEEP_PARAMS = {"synth.val": 16, "train.iterations": 150, "train.batch_size": 4,
                "train.val_interval": 50, "train.checkpoint_interval": 50,
                "train.log_every": 50}  # fmt: skip


@pytest.mark.e2e
@pytest.mark.slow  # minutes: three trainings; `make test-slow` (and CI) runs it
def test_a_local_tpe_sweep_prunes_the_trial_built_to_be_pruned(tmp_path, monkeypatch):
    """`seg sweep --local --sampler tpe --prune median`: trials one after another, each in a
    workspace of its own and an experiment of the project; the trial with lr 1e-6 is stopped at
    its first validation (behind the median of the two before it), marked pruned in its
    experiment's metrics, and ranked last by `seg sweep show`."""
    from test_dvc import _new_project, dvc, git

    proj = _new_project(tmp_path / "proj", **SWEEP_PARAMS)
    dvc(proj, "repro", "synth", "preprocess@train", "preprocess@val")
    git(proj, "add", "-A")
    git(proj, "commit", "-q", "-m", "data")
    before = git(proj, "status", "--porcelain"), (proj / "params.yaml").read_bytes()
    monkeypatch.chdir(proj)
    for key, value in _proc_env(proj).items():
        monkeypatch.setenv(key, value)
    args = ["sweep", "lr", "--local", "-S", "train.lr=0.15,1e-6", "-S", "train.min_lr=0",
            "--sampler", "tpe", "--trials", "3", "--prune", "median", "--seed", "6"]  # fmt: skip
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    shown = CliRunner().invoke(app, ["sweep", "show", "lr", "--json"])
    rows = json.loads(shown.output)
    assert [(r["trial"], r["state"]) for r in rows] == [
        (0, "complete"), (1, "complete"), (2, "pruned")
    ] or [(r["trial"], r["state"]) for r in rows] == [
        (1, "complete"), (0, "complete"), (2, "pruned")
    ], rows  # fmt: skip
    assert rows[2]["overrides"] == "train.min_lr=0 train.lr=1e-06" and rows[2][
        "last_reported"
    ].endswith("at 50")
    assert all(r["experiment"] for r in rows), rows
    # every trial is an experiment of the project; the pruned one says so in its metrics
    exps = json.loads(dvc(proj, "exp", "show", "--json").stdout)
    revs = [e for row in exps if row["rev"] != "workspace"
            for group in row.get("experiments") or [] for e in group["revs"]]  # fmt: skip
    assert all(e.get("data") for e in revs), revs  # DVC read each one (no "error")
    found = {e["name"]: e["data"]["metrics"]["outputs/train/dvclive/metrics.json"]["data"]
             for e in revs}  # fmt: skip
    assert {r["experiment"] for r in rows} <= set(found), (rows, found)
    assert found[rows[2]["experiment"]].get("pruned") == 50
    assert all("pruned" not in found[r["experiment"]] for r in rows[:2])
    assert (git(proj, "status", "--porcelain"), (proj / "params.yaml").read_bytes()) == before
    assert not list(proj.glob(".dvc/tmp/seg/runs/*"))


def _proc_env(proj: Path) -> dict[str, str]:
    from test_dvc import _env

    home = proj.parent / f"{proj.name}-home"
    home.mkdir(exist_ok=True)
    (home / ".gitconfig").write_text("[user]\n\tname = t\n\temail = t@t\n")
    env = _env(home)
    env["PREFECT_HOME"] = str(home / ".prefect")
    return {k: v for k, v in env.items() if k in ("PATH", "HOME", "PREFECT_HOME") or
            k.startswith(("DVC_", "GIT_"))}  # fmt: skip

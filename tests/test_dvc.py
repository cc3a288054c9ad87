"""The DVC graph end to end, through the real `dvc` CLI in a fresh git repository.

A module-scoped project runs `dvc repro` once on `tiny_params(**LEARN)` (synth -> preprocess@train/val
-> train -> evaluate); the read-only tests look at it in place, the tests that change state
(`repro -f`, `exp run`, bad params) work on copies of it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import LEARN, LEARNED_MIOU, tiny_params
from helpers import lock_out as _lock_out

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")


def _env(home: Path) -> dict[str, str]:
    """The venv's bin first on PATH (dvc.yaml runs `seg ...`); HOME, DVC's global/system
    config and site cache in the temporary tree, so nothing outside it is read or written."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(home)
    env["DVC_GLOBAL_CONFIG_DIR"] = str(home / "dvc-global")
    env["DVC_SYSTEM_CONFIG_DIR"] = str(home / "dvc-system")
    env["DVC_SITE_CACHE_DIR"] = str(home / "dvc-site-cache")
    env["DVC_NO_ANALYTICS"] = "1"
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    for role in ("AUTHOR", "COMMITTER"):
        env[f"GIT_{role}_NAME"] = "t"
        env[f"GIT_{role}_EMAIL"] = "t@t"
    for key in ("VIRTUAL_ENV", "PYTHONPATH", "DVC_EXP_NAME", "DVC_STAGE", "DVC_ROOT"):
        env.pop(key, None)
    return env


TIMEOUT_S = 300  # one command's limit


def run(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in `cwd` (a project made by `_new_project`); fail with its output."""
    home = cwd.parent / f"{cwd.name}-home"
    home.mkdir(exist_ok=True)
    (home / ".gitconfig").write_text(
        "[user]\n\tname = t\n\temail = t@t\n[init]\n\tdefaultBranch = main\n"
        "[commit]\n\tgpgsign = false\n"
    )
    t0 = time.perf_counter()
    # its own process group: on a timeout the stage's `seg train` goes with `dvc`, not on
    with subprocess.Popen(
        list(args), cwd=cwd, env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    ) as child:  # fmt: skip
        try:
            out, err = child.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            out, err = child.communicate()
            pytest.fail(
                f"{' '.join(args)}: over {TIMEOUT_S} s\n--- stdout\n{out}\n--- stderr\n{err}"
            )
    proc = subprocess.CompletedProcess(list(args), child.returncode, out, err)
    took = time.perf_counter() - t0
    name = " ".join(Path(args[0]).name if i == 0 else a for i, a in enumerate(args))
    print(f"[{took:6.1f}s] {name}")  # shown by `pytest -s`
    if check and proc.returncode != 0:
        pytest.fail(
            f"{name} exited with {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(cwd, DVC, *args, check=check)


def git(cwd: Path, *args: str) -> str:
    return run(cwd, "git", *args).stdout.strip()


def _new_project(path: Path, **overrides) -> Path:
    """dvc.yaml, tiny params.yaml (`tiny_params(**overrides)`) and the library code dvc.yaml
    depends on, in a new git + DVC repository with one commit."""
    path.mkdir(parents=True)
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy2(REPO / name, path / name)
    for name in ("pipeline", "stages"):
        shutil.copytree(REPO / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))
    (path / "params.yaml").write_text(yaml.safe_dump(tiny_params(**overrides), sort_keys=False))
    git(path, "init", "-q")
    dvc(path, "init", "-q")
    dvc(path, "config", "core.analytics", "false")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "init")
    return path


def _copy(src: Path, dst: Path) -> Path:
    """A copy of a project (git, DVC cache and outputs); DVC's lock/tmp files left out."""
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.rmtree(dst / ".dvc" / "tmp", ignore_errors=True)
    return dst


def _metrics(path: Path) -> dict:
    return json.loads((path / "outputs" / "eval" / "metrics.json").read_text())


def _lock(path: Path) -> dict:
    return yaml.safe_load((path / "dvc.lock").read_text())["stages"]


def _file_hash(path: Path, algo: str) -> str:
    return hashlib.new(algo, path.read_bytes()).hexdigest()


STAGES = ("synth", "preprocess@train", "preprocess@val", "train", "evaluate")  # + working_point


@pytest.fixture(scope="module")
def project(scratch) -> Path:
    """`dvc repro` run once, its results committed (shared, read-only: copy before changing)."""
    path = _new_project(scratch("dvc") / "proj", **LEARN)
    out = dvc(path, "repro").stdout
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out, out
    # What the stages leave behind is either DVC-tracked (gitignored by DVC), listed in the
    # repo's .gitignore, or a file meant for git: dvc.lock, metrics and plots (cache: false).
    changed = {line[3:] for line in git(path, "status", "--porcelain", "-uall").splitlines()}
    assert changed >= {"dvc.lock", "outputs/eval/metrics.json"}, changed
    stray = {
        f
        for f in changed
        if f not in {"dvc.lock", ".gitignore", "outputs/kfold_summary.json"}
        and not f.endswith("/.gitignore")
        and not f.startswith(("outputs/train/dvclive/", "outputs/eval/"))
    }
    assert not stray, f"files neither tracked by DVC nor ignored by git: {sorted(stray)}"
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "dvc repro")
    return path


def test_repro_writes_metrics_with_provenance(project: Path) -> None:
    from pipeline.params import load_params, params_hash

    m = _metrics(project)
    assert m["miou"] > LEARNED_MIOU  # `dvc repro` trained a model that learned the scenes
    assert len(m["per_class_iou"]) == 19  # Cityscapes train ids
    assert all(v is None or 0.0 <= v <= 1.0 for v in m["per_class_iou"].values())
    prov = m["provenance"]
    # evaluate ran before the fixture's second commit: the revision is the initial one
    assert prov["git"]["revision"] == git(project, "rev-parse", "HEAD~1")
    assert isinstance(prov["git"]["dirty"], bool)
    assert prov["params_hash"] == params_hash(load_params(project / "params.yaml"))
    assert prov["data"]["path"] == "data/shards/val"
    assert prov["data"]["dvc_md5"] == _lock_out(project, "data/shards/val")["md5"]
    best = project / "outputs" / "train" / "best.pt"
    assert prov["checkpoint"]["sha256"] == _file_hash(best, "sha256")
    assert _lock_out(project, "outputs/train/best.pt")["md5"] == _file_hash(best, "md5")
    # the per-class plot data and the confusion matrix next to it
    per_class = json.loads((project / "outputs/eval/per_class_iou.json").read_text())
    assert {r["class"]: r["iou"] for r in per_class} == m["per_class_iou"]
    assert (project / "outputs/eval/confusion.png").stat().st_size > 0
    # DVCLive training curves, one row per logged step (every train.log_every)
    steps, every = LEARN["train.iterations"], LEARN["train.log_every"]
    live = project / "outputs" / "train" / "dvclive"
    live_metrics = json.loads((live / "metrics.json").read_text())
    assert live_metrics["step"] == steps
    assert "loss" in live_metrics["train"] and "miou" in live_metrics["val"]
    loss = (live / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert loss[0].split("\t") == ["step", "loss"] and len(loss) == 1 + steps // every
    assert (live / "plots" / "metrics" / "val" / "miou.tsv").is_file()


# what `dvc status --json` says of a project whose results are all current: the
# working_point stage runs at every repro (always_changed), and only it
CURRENT = {"working_point": ["always changed"]}


def test_second_repro_runs_nothing(project: Path) -> None:
    before = (project / "dvc.lock").read_text()
    done = dvc(project, "repro")
    out = done.stdout
    # the working point is asked again (same machine: its files are not rewritten)
    assert [line for line in out.splitlines() if line.startswith("Running stage")] == [
        "Running stage 'working_point':"
    ], out
    said = done.stderr  # seg's lines
    assert "outputs/working_point/train.json: {" in said and "(unchanged)" in said, said
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in out, out
    assert (project / "dvc.lock").read_text() == before
    assert json.loads(dvc(project, "status", "--json").stdout) == CURRENT
    assert git(project, "status", "--porcelain") == ""


# A CPU the engine sees in a `seg` process instead of this one (its flags and torch's kernel
# level, as tests/test_working_point.py's known_cpu): there is no second kind of machine here.
_CPU_SHIM = """
import os, sys
cpu = os.environ.get("SEG_TEST_CPU")
if cpu:
    import importlib.abc, importlib.util

    class _Cpu(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "pipeline.engine.device":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                flags, capability = cpu.split(":")
                module._cpu_flags = lambda: set(flags.split(","))
                module.torch.backends.cpu.get_cpu_capability = lambda: capability
                module.platform.machine = lambda: "x86_64"

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Cpu())
"""
ZEN2 = "avx2:AVX2"  # AVX2 only: amp auto is fp32
ZEN4 = "avx2,avx512f,avx512_bf16:AVX512"  # native bf16: amp auto is bf16


def test_a_machine_where_amp_auto_resolves_otherwise_makes_train_stale(
    project: Path, tmp_path: Path
) -> None:
    proj = _copy(project, tmp_path / "proj")
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_CPU_SHIM)

    def on(cpu: str, *args: str) -> subprocess.CompletedProcess:
        env = {**_env(tmp_path / "home"), "PYTHONPATH": str(shim), "SEG_TEST_CPU": cpu}
        env.pop("ONEDNN_MAX_CPU_ISA", None)
        done = subprocess.run([DVC, *args], cwd=proj, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    # params.yaml's `amp: auto` (the fixture trained with `off`): on an AVX2-only machine it
    # is the same fp32, so the results are recorded for it without training again
    raw = yaml.safe_load((proj / "params.yaml").read_text())
    raw["train"]["amp"] = raw["evaluate"]["amp"] = "auto"
    (proj / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert "(unchanged)" in on(ZEN2, "repro", "params", "working_point").stderr
    on(ZEN2, "commit", "-f", "train", "evaluate")
    assert json.loads(on(ZEN2, "status", "--json").stdout) == CURRENT

    # the same commit and params on a machine with native bf16: train and evaluate are stale
    said = on(ZEN4, "repro", "working_point").stderr
    assert '"precision": "bf16"' in said and "(unchanged)" not in said, said
    stale = json.loads(on(ZEN4, "status", "--json").stdout)
    point = "outputs/working_point/{}.json"
    assert stale["train"] == [{"changed deps": {point.format("train"): "modified"}}], stale
    assert stale["evaluate"] == [{"changed deps": {point.format("evaluate"): "modified"}}]
    assert set(stale) == {"working_point", "train", "evaluate"}, stale
    # back on the first kind of machine nothing is stale again
    on(ZEN2, "repro", "working_point")
    assert json.loads(on(ZEN2, "status", "--json").stdout) == CURRENT


def test_metrics_and_plots_show(project: Path, tmp_path: Path) -> None:
    shown = json.loads(dvc(project, "metrics", "show", "--json").stdout)
    (workspace,) = shown.values()  # dvc 3.67 keys the workspace as ""
    files = workspace["data"]
    evaluated = files["outputs/eval/metrics.json"]["data"]
    assert evaluated["miou"] == _metrics(project)["miou"]
    assert evaluated["per_class_iou"]["road"] == _metrics(project)["per_class_iou"]["road"]
    assert files["outputs/train/dvclive/metrics.json"]["data"]["step"] == LEARN["train.iterations"]

    plots = json.loads(dvc(project, "plots", "show", "--json").stdout)["data"]
    names = set(plots)
    assert "outputs/eval/per_class_iou.json" in names, names
    assert "outputs/train/dvclive/plots/metrics/train/loss.tsv" in names, names

    html = tmp_path / "plots"
    dvc(project, "plots", "show", "-o", str(html))
    page = (html / "index.html").read_text()
    assert "per_class_iou.json" in page and "train/loss.tsv" in page


@pytest.mark.slow
@pytest.mark.soak  # past CI's budget (make test-soak): 3 min here, two full repros
def test_forced_repro_gives_the_same_metrics(project: Path, tmp_path: Path) -> None:
    proj = _copy(project, tmp_path / "proj")
    before = _metrics(proj)
    out = dvc(proj, "repro", "-f").stdout
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out, out
    after = _metrics(proj)
    assert after["miou"] == before["miou"]
    assert after["per_class_iou"] == before["per_class_iou"]
    # the data is rebuilt byte for byte (same DVC hashes), so is the data hash in provenance
    for out_path in ("data/synthetic", "data/shards/train", "data/shards/val"):
        assert _lock_out(proj, out_path)["md5"] == _lock_out(project, out_path)["md5"], out_path
    assert after["provenance"]["data"] == before["provenance"]["data"]
    assert after["provenance"]["params_hash"] == before["provenance"]["params_hash"]


@pytest.mark.slow
@pytest.mark.soak  # past CI's budget (make test-soak): a full dvc exp run
def test_experiment_with_changed_lr(project: Path, tmp_path: Path) -> None:
    proj = _copy(project, tmp_path / "proj")
    out = dvc(proj, "exp", "run", "-S", "train.lr=0.02").stdout
    for stage in ("train", "evaluate"):
        assert f"Running stage '{stage}'" in out, out
    for stage in ("synth", "preprocess@train", "preprocess@val"):
        assert f"Stage '{stage}' didn't change, skipping" in out, out
    assert yaml.safe_load((proj / "params.yaml").read_text())["train"]["lr"] == 0.02

    # exp show --json: [workspace, HEAD with its experiments]; each row's data holds
    # params.yaml and both metrics files
    rows = {r["rev"]: r for r in json.loads(dvc(proj, "exp", "show", "--json").stdout)}
    head = rows[git(proj, "rev-parse", "HEAD")]
    (group,) = head["experiments"]
    (exp,) = group["revs"]
    name = exp["name"]
    assert name and group["name"] == name and not exp["error"]

    def lr(row: dict) -> float:
        return row["data"]["params"]["params.yaml"]["data"]["train"]["lr"]

    def miou(row: dict) -> float:
        return row["data"]["metrics"]["outputs/eval/metrics.json"]["data"]["miou"]

    base = tiny_params()["train"]["lr"]  # the shipped params' lr
    assert base != 0.02
    assert (lr(head), lr(exp), lr(rows["workspace"])) == (base, 0.02, 0.02)
    assert miou(head) == _metrics(project)["miou"]
    # exp run leaves the experiment's results in the workspace
    assert miou(exp) == miou(rows["workspace"]) == _metrics(proj)["miou"]
    assert miou(exp) > LEARNED_MIOU / 2  # lr 0.02 learns too, more slowly

    # it trained with the new lr: the last logged lr, min_lr + (lr - min_lr) * poly factor,
    # has the baseline's poly factor
    def poly(row: dict, base: float) -> float:
        live = row["data"]["metrics"]["outputs/train/dvclive/metrics.json"]["data"]
        min_lr = tiny_params()["train"]["min_lr"]
        return (live["train"]["lr"] - min_lr) / (base - min_lr)

    assert poly(exp, 0.02) == pytest.approx(poly(head, base), rel=1e-6)

    # the table a user reads: one row per experiment, the param and the metric as columns
    table = list(csv.DictReader(io.StringIO(dvc(proj, "exp", "show", "--csv").stdout)))
    (exp_row,) = [r for r in table if r["Experiment"] == name]
    assert float(exp_row["params.yaml:train.lr"]) == 0.02
    assert float(exp_row["miou"]) == miou(exp)


def _add_key(proj: Path, section: str | None) -> None:
    params = yaml.safe_load((proj / "params.yaml").read_text())
    (params[section] if section else params)["bogus_key"] = 1
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.parametrize("section", ["train", "evaluate"])
def test_unknown_params_key_fails_in_one_line(project: Path, tmp_path: Path, section: str) -> None:
    proj = _copy(project, tmp_path / "proj")
    _add_key(proj, section)
    proc = dvc(proj, "repro", check=False)
    assert proc.returncode != 0
    text = f"{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: params.yaml: {section}: unknown key(s) bogus_key; valid: "
        + ", ".join(sorted(tiny_params()[section]))
    ], text
    assert "ERROR: failed to reproduce 'params'" in text, text  # the check stage, first


@pytest.mark.parametrize("section", [None, "data"], ids=["top-level", "data"])
def test_unknown_params_key_outside_tracked_sections_fails(
    project: Path, tmp_path: Path, section: str | None
) -> None:
    proj = _copy(project, tmp_path / "proj")
    _add_key(proj, section)
    assert dvc(proj, "repro", check=False).returncode != 0

"""The model registry and its gate against a real bare git origin (file://) and a DVC remote in
a folder: `seg registry register | show`, `seg promote`, `seg compare`, and `seg predict |
eval | export` through the registry in another clone.

One module-scoped world, built without training (the session's `trained_project`, 4 steps, and
`learned_project`, 300 steps, lend their data and weights):

    commit 1  the 4-step weights, scored on the 2-frame val data      -> deeplab@v0.1.0
    commit 2  the 300-step weights, scored on the 16-frame val data   -> deeplab@v0.2.0
    commit 3  the 4-step weights, scored on the 16-frame val data     -> deeplab@v0.3.0

Each commit's outputs are committed with DVC (`dvc commit`), pushed to the DVC remote, and the
commit to origin. The tests run in file order: the promotions build on each other.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stages import gate, registry
from stages.cli import app

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
runner = CliRunner()


def _git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"git {' '.join(args)}: {proc.stderr}"
    return proc.stdout.strip()


def _identity(repo: Path) -> None:
    for key, value in (("user.name", "t"), ("user.email", "t@t"), ("commit.gpgsign", "false")):
        _git(repo, "config", key, value)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _version(proj: Path, data_from: Path, weights_from: Path, message: str) -> str:
    """Put another project's data, params and weights in `proj`, score them (seg eval's step),
    commit the outputs with DVC, push them to the DVC remote and the commit to origin."""
    from dvc.repo import Repo

    from stages import steps, working_point

    for folder in ("data", "outputs/train"):
        shutil.rmtree(proj / folder, ignore_errors=True)
    shutil.copytree(data_from / "data", proj / "data")
    shutil.copytree(weights_from / "outputs" / "train", proj / "outputs" / "train")
    shutil.copy2(data_from / "params.yaml", proj / "params.yaml")
    with gate._cwd(proj), Repo(str(proj)) as repo:  # DVC reads targets from the cwd
        steps.evaluate(steps.load("params.yaml"), history=False)
        working_point.write(steps.load("params.yaml"))  # the working_point stage's files
        repo.commit("evaluate", with_deps=True, force=True)
        repo.push()
    _git(proj, "add", "-A")
    _git(proj, "commit", "-q", "-m", message)
    _git(proj, "push", "-q", "origin", "HEAD:main")
    return _git(proj, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def world(scratch, trained_project: Path, learned_project: Path) -> dict:
    base = scratch("registry")
    origin, storage, proj = base / "origin.git", base / "dvc-storage", base / "a"
    _git(base, "init", "-q", "--bare", "-b", "main", str(origin))
    storage.mkdir()
    proj.mkdir()
    for name in ("dvc.yaml", ".gitignore", ".dvcignore", ".gto", "artifacts.yaml"):
        shutil.copy2(REPO / name, proj / name)
    for name in ("pipeline", "stages"):
        shutil.copytree(REPO / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    _git(proj, "init", "-q", "-b", "main")
    _identity(proj)
    _git(proj, "remote", "add", "origin", origin.as_uri())
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for args in (["init", "-q"], ["remote", "add", "-d", "storage", str(storage)]):
        subprocess.run([str(BIN / "dvc"), *args], cwd=proj, check=True, env=env, timeout=120)
    commits = [
        _version(proj, trained_project, trained_project, "4 steps, 2 val frames"),
        _version(proj, learned_project, learned_project, "300 steps"),
        _version(proj, learned_project, trained_project, "4 steps again, worse params"),
    ]
    return {
        "base": base, "origin": origin, "storage": storage, "proj": proj, "commits": commits,
        "w4": _sha256(trained_project / "outputs/train/best.pt"),
        "w300": _sha256(learned_project / "outputs/train/best.pt"),
    }  # fmt: skip


def _seg(cwd: Path, *args: str, code: int = 0):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        result = runner.invoke(app, list(args))
    finally:
        os.chdir(old)
    assert result.exit_code == code, f"seg {' '.join(args)} -> {result.exit_code}\n{result.output}"
    return result


def _one_line_error(result, *needles: str) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _origin_tags(world) -> dict[str, str]:
    """tag -> the commit it points at, on origin."""
    out = _git(world["proj"], "ls-remote", "--tags", "origin")
    tags = {}
    for line in out.splitlines():
        sha, ref = line.split("\t")
        name = ref.removeprefix("refs/tags/")
        if name.endswith("^{}"):
            tags[name[:-3]] = sha
        else:
            tags.setdefault(name, sha)
    return tags


def _clone(world, name: str) -> Path:
    dest = world["base"] / name
    _git(world["base"], "clone", "-q", world["origin"].as_uri(), str(dest))
    _identity(dest)
    return dest


# ----------------------------------------------------------------------------- annotations


def test_gtos_annotations_file_is_in_step_with_dvc_yaml():
    """artifacts.yaml (GTO's) is what `seg registry sync` writes from dvc.yaml's artifacts."""
    assert (REPO / "artifacts.yaml").read_text() == registry.annotations_text(REPO)
    assert set(registry.models(REPO)) == {"deeplab"}


# ----------------------------------------------------------------------------- register


def test_register_versions_from_commits(world):
    proj, (c1, c2, c3) = world["proj"], world["commits"]
    _seg(proj, "registry", "register", "deeplab", c1)  # the first: v0.1.0
    _seg(proj, "registry", "register", "deeplab", c2)  # then the latest, minor bumped
    out = _seg(proj, "registry", "register", "deeplab", c3, "--bump", "minor").output
    assert "registered deeplab@v0.3.0" in out
    tags = _origin_tags(world)
    assert {t: tags[t] for t in tags if "@" in t} == {
        "deeplab@v0.1.0": c1, "deeplab@v0.2.0": c2, "deeplab@v0.3.0": c3,
    }  # fmt: skip
    again = _seg(proj, "registry", "register", "deeplab", c2, code=1)
    _one_line_error(again, "is deeplab@v0.2.0 already")


def test_show_lists_versions_with_their_interval_data_and_params(world):
    rows = json.loads(_seg(world["proj"], "registry", "show", "deeplab", "--json").output)
    by = {r["version"]: r for r in rows}
    assert list(by) == ["v0.3.0", "v0.2.0", "v0.1.0"]  # newest first
    v2 = by["v0.2.0"]
    assert v2["miou_lo"] < v2["miou"] < v2["miou_hi"]
    assert v2["commit"] == world["commits"][1]
    assert by["v0.1.0"]["data_sha256"] != v2["data_sha256"] == by["v0.3.0"]["data_sha256"]
    assert v2["params_changed"]["train.iterations"] == [4, 300]
    assert v2["params_changed"]["synth.val"] == [2, 16]
    assert by["v0.1.0"]["params_changed"] is None  # the first version
    assert by["v0.3.0"]["miou"] < v2["miou"]
    assert "3 version(s)" in _seg(world["proj"], "registry", "show").output


# ----------------------------------------------------------------------------- promote


def test_the_first_promotion_takes_an_empty_stage(world):
    out = _seg(world["proj"], "promote", "deeplab", "v0.1.0", "--to", "prod").output
    assert "no version holds prod yet" in out
    assert _origin_tags(world)["deeplab#prod#1"] == world["commits"][0]


def test_a_concurrent_promotion_is_rejected_then_gated_again(world):
    """v0.2.0 passes its gate against v0.1.0, but while its tag is being pushed, another clone
    assigns prod to v0.3.0 under the same tag name (deeplab#prod#2). The push is rejected; the
    promotion fetches, gates v0.2.0 against v0.3.0 (the new holder) and takes deeplab#prod#3.
    v0.1.0 was scored on other val data: it is scored again here on the current data."""
    proj, (c1, c2, c3) = world["proj"], world["commits"]
    other = _clone(world, "b")
    marker = world["base"] / "raced"
    hook = proj / ".git" / "hooks" / "pre-push"
    hook.write_text(
        "#!/bin/sh\n"
        f"[ -e '{marker}' ] && exit 0\n"
        f"touch '{marker}'\n"
        f"cd '{other}' && git fetch -q origin '+refs/tags/*:refs/tags/*' && "
        f"'{BIN / 'gto'}' assign deeplab --version v0.3.0 --stage prod -m 'from clone b' "
        ">/dev/null && git push -q origin 'refs/tags/deeplab#prod#2'\n"
    )
    hook.chmod(0o755)
    try:
        out = gate.promote(proj, "deeplab", "v0.2.0", "prod")
    finally:
        hook.unlink()
    assert marker.exists()  # the race happened
    assert out.tag == "deeplab#prod#3" and out.passed
    assert out.holder.version == "v0.3.0"  # gated again, against the new holder
    assert any("deeplab#prod#2 was taken" in n for n in out.notes), out.notes
    assert out.comparison.delta.lo > 0, out.line
    tags = _origin_tags(world)
    assert (tags["deeplab#prod#2"], tags["deeplab#prod#3"]) == (c3, c2)
    assert registry.resolve(other, "deeplab#prod").version == "v0.2.0"  # fetched from origin
    assert c1  # (v0.1.0's tag stays where it was)


def test_a_holder_scored_on_older_val_data_is_scored_again(world):
    """The gate of v0.2.0 against v0.1.0 (which holds no stage now: asked directly): v0.1.0
    was scored on the 2-frame val data, so the gate scores it here on the current 16 frames,
    with v0.2.0's settings, instead of refusing."""
    from pipeline import compare

    proj = world["proj"]
    v1 = registry.resolve(proj, "deeplab@v0.1.0")
    v2 = registry.resolve(proj, "deeplab@v0.2.0")
    a, b, notes = gate._comparable_counts(proj, v1, v2, registry._root_params(proj))
    assert len(a.keys) == len(b.keys) == 16 and compare.why_not_comparable(a, b) is None
    assert notes and "deeplab@v0.1.0 scored again on the current val data" in notes[0]
    assert a.meta["registry"]["version"] == "v0.1.0"


def test_a_worse_candidate_is_not_promoted_and_nothing_changes(world):
    proj = world["proj"]
    before = (_origin_tags(world), _git(proj, "tag", "-l"))
    result = _seg(proj, "promote", "deeplab", "v0.3.0", "--to", "prod", code=1)
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("regression: ΔmIoU -"), result.output  # far beyond max_drop 1.0
    assert "against deeplab@v0.2.0" in line
    assert (_origin_tags(world), _git(proj, "tag", "-l")) == before
    out = gate.gate(proj, "deeplab", "v0.3.0")
    assert out.regression and not out.passed and out.comparison.delta.hi < -0.01


def test_a_forced_promotion_records_its_reason(world):
    proj = world["proj"]
    result = _seg(proj, "promote", "deeplab", "v0.3.0", "--force", "--reason", "rollback drill")
    assert "forced: deeplab@v0.3.0 -> prod (rollback drill)" in result.output
    message = _git(proj, "tag", "-l", "--format=%(contents)", "deeplab#prod#4")
    assert "forced by hand: rollback drill" in message and "regression: ΔmIoU" in message
    assert _origin_tags(world)["deeplab#prod#4"] == world["commits"][2]
    assert registry.resolve(proj, "deeplab#prod").version == "v0.3.0"


# ----------------------------------------------------------------------------- other clone


def test_another_clone_predicts_evaluates_and_exports_through_the_registry(world, tmp_path):
    """A fresh clone (no DVC cache) resolves deeplab#prod, fetches its weights from the DVC
    remote, and names the version in what it writes."""
    clone = _clone(world, "c")
    images = world["proj"] / "data" / "synthetic" / "leftImg8bit" / "val"
    frames = sorted(images.rglob("*.png"))[:2]
    out = _seg(clone, "predict", *map(str, frames), "--model", "deeplab#prod", "--out", "pred")
    assert "with deeplab@v0.3.0" in out.output
    prov = json.loads((clone / "pred" / "provenance.json").read_text())
    assert prov["registry"]["version"] == "v0.3.0" and prov["registry"]["stage"] == "prod"
    assert prov["model"]["sha256"] == world["w4"]  # v0.3.0's weights: the 4-step ones
    assert len(list((clone / "pred").glob("*_labelIds.png"))) == 2

    shards = world["proj"] / "data" / "shards" / "val"
    _seg(clone, "eval", "--model", "deeplab@v0.2.0", "--shards", str(shards), "--out", "ev")
    metrics = json.loads((clone / "ev" / "metrics.json").read_text())
    assert metrics["provenance"]["registry"]["version"] == "v0.2.0"
    assert metrics["provenance"]["checkpoint"]["sha256"] == world["w300"]
    recorded = json.loads(
        _git(world["proj"], "show", f"{world['commits'][1]}:outputs/eval/metrics.json")
    )
    assert metrics["miou"] == pytest.approx(recorded["miou"], abs=1e-12)

    _seg(clone, "export", "deeplab#prod", "--format", "torchscript", "--check-size", "64", "128")
    from pipeline.engine.export import load_exported

    meta = load_exported(clone / "deeplab-v0.3.0.torchscript.pt").metadata
    assert meta["registry"]["version"] == "v0.3.0"


def test_compare_versions_checkpoints_and_folders(world):
    proj = world["proj"]
    got = json.loads(_seg(proj, "compare", "deeplab@v0.3.0", "deeplab@v0.2.0", "--json").output)
    assert got["delta_miou"]["lo"] > 0 and got["frames"] == 16
    assert got["resamples"] == 2000 and got["method"] == "studentized"
    same = json.loads(_seg(proj, "compare", "outputs/eval", "deeplab@v0.3.0", "--json").output)
    assert same["delta_miou"] == {"value": 0.0, "lo": 0.0, "hi": 0.0, "defined": 1.0}


# ----------------------------------------------------------------------------- bad input


def test_bad_references_fail_in_one_line_and_change_nothing(world):
    proj = world["proj"]
    before = (_git(proj, "tag", "-l"), sorted(p.name for p in (proj / "outputs").iterdir()))
    cases = [
        (("predict", "x.png", "--model", "nosuch#prod"), ("unknown model 'nosuch'", "deeplab")),
        (("eval", "--model", "deeplab@v9.9.9"), ("no version v9.9.9", "v0.1.0")),
        (("promote", "deeplab", "v0.2.0", "--to", "qa"), ("unknown stage 'qa'", "prod")),
        (("eval", "--model", "deeplab#staging"), ("no version of deeplab is in stage 'staging'",)),
        (("promote", "deeplab", "v0.2.0", "--force"), ("--force needs --reason",)),
        (("compare", "deeplab@v0.1.0", "deeplab@v0.2.0"), ("different val data",)),
        (("registry", "register", "deeplab", "no-such-exp"), ("no-such-exp: no such commit",)),
    ]
    for args, needles in cases:
        _one_line_error(_seg(proj, *args, code=1), *needles)
    after = (_git(proj, "tag", "-l"), sorted(p.name for p in (proj / "outputs").iterdir()))
    assert after == before


def test_compare_refuses_other_eval_settings(world, tmp_path):
    from stages import steps

    proj = world["proj"]
    with gate._cwd(proj):
        p = steps.load("params.yaml", ["evaluate.flip=false"])
        steps.evaluate(p, out=tmp_path / "noflip", history=False)
    result = _seg(proj, "compare", "outputs/eval", str(tmp_path / "noflip"), code=1)
    _one_line_error(result, "different eval settings: flip true vs false")


def test_a_version_whose_weights_are_in_no_remote(world, tmp_path):
    """A commit whose outputs were never pushed to the DVC remote, tagged by hand: register
    refuses it once its cache is gone, and another clone cannot fetch it: one line, no file."""
    from dvc.repo import Repo

    proj = world["proj"]
    work = _clone(world, "d")
    shutil.copytree(proj / "data", work / "data", dirs_exist_ok=True)
    shutil.copytree(
        proj / "outputs", work / "outputs", ignore=shutil.ignore_patterns("registry"),
        dirs_exist_ok=True,
    )  # fmt: skip
    (work / "outputs" / "train" / "best.pt").write_bytes(b"never pushed")
    with gate._cwd(work), Repo(str(work)) as repo:
        repo.commit("train", force=True)
    _git(work, "add", "-A")
    _git(work, "commit", "-q", "-m", "unpushed weights")
    commit = _git(work, "rev-parse", "HEAD")
    _git(work, "push", "-q", "origin", "HEAD:unpushed")
    shutil.rmtree(work / ".dvc" / "cache")
    result = _seg(work, "registry", "register", "deeplab", commit, code=1)
    _one_line_error(result, "outputs/train/best.pt is in no DVC remote (storage)")
    assert "deeplab@v0.9.0" not in _origin_tags(world)
    _git(work, "tag", "-a", "deeplab@v0.9.0", commit, "-m", "by hand")
    _git(work, "push", "-q", "origin", "deeplab@v0.9.0")
    clone = _clone(world, "e")
    result = _seg(clone, "predict", "x.png", "--model", "deeplab@v0.9.0", code=1)
    _one_line_error(
        result, "deeplab@v0.9.0", "is in no DVC remote (storage)", "not in this clone's cache"
    )
    assert not (clone / "outputs" / "registry").exists() and not (clone / "predictions").exists()


def test_a_pruned_sweep_trial_is_never_registered(tmp_path):
    """A trial the sweep's pruner stopped (its DVCLive metrics carry `pruned`) is refused in one
    line, before anything is tagged or pushed."""
    import shutil
    import subprocess

    repo = tmp_path / "repo"
    metrics = repo / "outputs/train/dvclive/metrics.json"
    metrics.parent.mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    metrics.write_text('{"step": 50, "val": {"miou": 0.01}, "pruned": 50}')
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "trial"], cwd=repo, check=True)
    with pytest.raises(registry.RegistryError, match="pruned at step 50: its weights are not"):
        registry.register(repo, "deeplab", "HEAD")
    assert registry.pruned_at(repo, "HEAD") == 50
    assert not subprocess.run(["git", "tag"], cwd=repo, capture_output=True, text=True).stdout


def test_the_gate_artifact_has_a_table_and_a_forest_plot_of_each_class_delta():
    """The run's `model-gate` artifact: per-class Δ with intervals as a table and as a picture
    (a point on its interval per class, a zero line)."""
    import base64
    import io
    from types import SimpleNamespace

    from PIL import Image

    from stages.promotion import gate_markdown

    per_class = [
        {"class": "road", "delta": {"value": 0.02, "lo": 0.01, "hi": 0.03}},
        {"class": "train", "delta": {"value": -0.04, "lo": -0.09, "hi": 0.01}},
        {"class": "bus", "delta": {"value": None, "lo": None, "hi": None}},
    ]
    comparison = SimpleNamespace(to_dict=lambda: {"per_class": per_class})
    out = SimpleNamespace(candidate=SimpleNamespace(ref="deeplab@v0.2.0"), stage="prod",
                          line="promoted: ΔmIoU +0.4 [+0.1, +0.8]", comparison=comparison)  # fmt: skip
    text = gate_markdown(out)
    assert "| road | +2.00 | [+1.00, +3.00] |" in text and "| bus | - | - |" in text
    uri = text.split("![per-class delta](", 1)[1].split(")", 1)[0]
    png = Image.open(io.BytesIO(base64.b64decode(uri.removeprefix("data:image/png;base64,"))))
    assert png.format == "PNG" and png.height == 30 + 18 * 2  # a row per class with an interval

"""Grouped k-fold: fold assignment, the readers' key filter, fold training/eval, the summary."""

from __future__ import annotations

import itertools
import json
import os
import statistics
from pathlib import Path

import numpy as np
import pytest
from conftest import make_project, tiny_params, write_frame
from PIL import Image
from typer.testing import CliRunner

from pipeline.data.folds import assign, fold_keys, make_folds, summarize
from pipeline.data.readers import EvalReader, Subset, TrainStream
from pipeline.data.shards import read_manifest, write_shards
from pipeline.errors import ConfigError
from pipeline.params import params_from_dict
from stages.cli import app


def test_readers_take_a_subset_of_keys(tmp_path):
    root = tmp_path / "cs"
    keys = [write_frame(root, "train", city, i) for i, city in enumerate("abcabc")]
    out = tmp_path / "train"
    write_shards(root, "train", out, samples_per_shard=2)
    some = frozenset(keys[1::2])  # every other frame, spread over all three shards
    assert [s["key"] for s in EvalReader(Subset(out, some))] == sorted(some)
    ranks = [[s["key"] for s in EvalReader(Subset(out, some), r, 2)] for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(some) and not set(ranks[0]) & set(ranks[1])
    seen = [
        s["key"] for s in itertools.islice(TrainStream(Subset(out, some), shuffle_buffer=2), 30)
    ]
    assert set(seen) == some  # only the subset, and all of it, over several epochs


# ---- fold assignment ---------------------------------------------------------------------


def test_assign_balances_frames_and_breaks_ties_by_name():
    # CamVid's training split: three drives of 62, 101 and 204 frames
    assert assign({"0001TP": 62, "0006R0": 101, "0016E5": 204}, 3) == [
        ["0016E5"], ["0006R0"], ["0001TP"]
    ]  # fmt: skip
    # largest first into the lightest fold; equal sizes go by name, equal loads to fold 0 first
    sizes = {"e": 5, "d": 5, "c": 3, "b": 2, "a": 2, "f": 1}
    folds = assign(sizes, 2)
    assert folds == [["c", "d", "f"], ["a", "b", "e"]]
    assert [sum(sizes[g] for g in f) for f in folds] == [9, 9]
    assert assign(dict(reversed(sizes.items())), 2) == folds  # input order does not matter


@pytest.mark.parametrize("k", [1, 4])
def test_assign_needs_two_folds_and_a_group_per_fold(k):
    with pytest.raises(ConfigError, match="data.folds"):
        assign({"0001TP": 62, "0006R0": 101, "0016E5": 204}, k)


def test_folds_of_a_split_are_disjoint_grouped_and_cover_it(tmp_path):
    root = tmp_path / "cs"
    cities = ["aachen"] * 5 + ["bonn"] * 2 + ["koeln"] * 3 + ["ulm"] * 2 + ["jena"] * 1
    for i, city in enumerate(cities):
        write_frame(root, "train", city, i, h=8, w=16)
    shards = tmp_path / "train"
    write_shards(root, "train", shards, samples_per_shard=4)
    doc = make_folds(shards, 3)
    keys = [set(f["keys"]) for f in doc["folds"]]
    city_of = {r["key"]: r["group"] for r in read_manifest(shards).to_pylist()}
    assert set().union(*keys) == set(city_of)  # cover the split
    assert sum(len(k) for k in keys) == len(city_of)  # disjoint
    for f, ks in zip(doc["folds"], keys, strict=True):
        assert {city_of[k] for k in ks} == set(f["groups"])  # grouped: a city in one fold only
        assert f["samples"] == len(ks)
    assert [f["groups"] for f in doc["folds"]] == [["aachen"], ["jena", "koeln"], ["bonn", "ulm"]]  # fmt: skip
    assert make_folds(shards, 3) == doc  # deterministic
    train, val = fold_keys(doc, 1)
    assert val == keys[1] and train == keys[0] | keys[2]
    with pytest.raises(ConfigError, match="fold 3: the folds file has 3 folds"):
        fold_keys(doc, 3)
    with pytest.raises(ConfigError, match="6 folds need at least 6 groups, there are 5"):
        make_folds(shards, 6)


def test_frames_without_a_group_are_their_own_group(tmp_path):
    """VOC: independent photos, no group in the manifest: folds split them one by one."""
    root = tmp_path / "voc"
    for i in range(5):
        key = f"2007_00000{i}"
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(
            root / "JPEGImages" / f"{key}.jpg"
        )
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(
            root / "SegmentationClass" / f"{key}.png"
        )
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("".join(f"2007_00000{i}\n" for i in range(5)))
    write_shards(root, "train", tmp_path / "s", dataset="voc")
    assert read_manifest(tmp_path / "s").column("group").to_pylist() == [None] * 5
    doc = make_folds(tmp_path / "s", 2)
    assert [f["samples"] for f in doc["folds"]] == [3, 2]


def test_fold_params_are_checked():
    base = tiny_params()
    for folds, ids, message in (
        (1, [0], "data.folds: 0 .* or a number of folds K >= 2, got 1"),
        (3, [0, 1], r"data.fold_ids: must be \[0, 1, 2\] for data.folds: 3"),
        (0, [0], r"data.fold_ids: must be \[\] for data.folds: 0"),
    ):
        raw = {**base, "data": {**base["data"], "folds": folds, "fold_ids": ids}}
        with pytest.raises(ConfigError, match=message):
            params_from_dict(raw)
    raw = {**base, "data": {**base["data"], "folds": 3, "fold_ids": [0, 1, 2]}}
    assert params_from_dict(raw).data.folds == 3


def test_summary_is_mean_and_sample_std():
    per_fold = [
        {
            "miou": 0.5,
            "pixel_accuracy": 0.9,
            "num_images": 3,
            "per_class_iou": {"a": 0.2, "b": None},
        },
        {
            "miou": 0.7,
            "pixel_accuracy": 0.8,
            "num_images": 2,
            "per_class_iou": {"a": 0.6, "b": 0.4},
        },
    ]
    s = summarize(per_fold)
    assert s["miou"] == {"mean": pytest.approx(0.6), "std": pytest.approx(0.1414213562), "n": 2}
    assert s["per_class_iou"]["b"] == {"mean": 0.4, "std": None, "n": 1}
    assert s["per_fold"]["fold-1"] == {"miou": 0.7, "images": 2}
    assert summarize([]) == {"folds": 0}


# ---- training and evaluating every fold (CPU, synthetic scenes) --------------------------


@pytest.fixture(scope="module")
def kfold_project(scratch) -> Path:
    """Synthetic scenes (3 cities x 2 train frames), 2 folds trained 2 steps each, evaluated,
    summarized through the stage functions that `seg kfold` and dvc.yaml call."""
    from stages import steps

    overrides = {"data.folds": 2, "data.fold_ids": [0, 1], "train.iterations": 2}
    path = make_project(scratch("kfold"), **overrides)
    cwd = os.getcwd()
    os.chdir(path)
    try:
        p = steps.load("params.yaml")
        steps.kfold_split(p)
        for k in range(2):
            steps.train(p, fold=k)
            steps.evaluate(p, fold=k)
        steps.kfold_summarize(p)
    finally:
        os.chdir(cwd)
    return path


def test_every_fold_trains_outside_and_is_scored_on_its_own_groups(kfold_project):
    from stages import steps

    doc = json.loads((kfold_project / "outputs/kfold/folds.json").read_text())
    manifest = read_manifest(kfold_project / "data/shards/train").to_pylist()
    city_of = {r["key"]: r["group"] for r in manifest}
    assert sorted(g for f in doc["folds"] for g in f["groups"]) == sorted(set(city_of.values()))
    assert sorted(k for f in doc["folds"] for k in f["keys"]) == sorted(city_of)
    # 3 cities of 2 frames; by name into the lighter fold, ties to fold 0
    assert [f["groups"] for f in doc["folds"]] == [["pixelburg", "synthtown"], ["rastervale"]]
    cwd = os.getcwd()
    os.chdir(kfold_project)
    try:
        p = steps.load("params.yaml")
        for k, f in enumerate(doc["folds"]):
            train, val, _ = steps._fold_parts(p, k)
            assert val.keys == set(f["keys"]) and not train.keys & val.keys
            assert train.keys | val.keys == set(city_of)
            assert {city_of[key] for key in train.keys}.isdisjoint(f["groups"])
            m = json.loads(
                (kfold_project / f"outputs/kfold/fold-{k}/eval/metrics.json").read_text()
            )
            assert m["num_images"] == f["samples"]  # scored on its own fold only
            assert m["provenance"]["fold"]["groups"] == f["groups"]
            assert m["provenance"]["checkpoint"]["path"].endswith(f"fold-{k}/train/last.pt")
            assert m["provenance"]["checkpoint"]["step"] == 2
    finally:
        os.chdir(cwd)
    assert not (kfold_project / "outputs/runs.parquet").exists()  # folds stay out of `seg runs`


def test_summary_equals_the_mean_of_the_fold_metrics_files(kfold_project):
    files = [kfold_project / f"outputs/kfold/fold-{k}/eval/metrics.json" for k in range(2)]
    per_fold = [json.loads(f.read_text()) for f in files]
    summary = json.loads((kfold_project / "outputs/kfold_summary.json").read_text())
    assert summary["folds"] == 2 and summary["dataset"] == "cityscapes"
    mious = [m["miou"] for m in per_fold]
    assert summary["miou"]["mean"] == pytest.approx(statistics.mean(mious), abs=1e-12)
    assert summary["miou"]["std"] == pytest.approx(statistics.stdev(mious), abs=1e-12)
    assert len(set(mious)) > 1  # the folds differ, so the std is a real spread
    for name, s in summary["per_class_iou"].items():
        values = [
            m["per_class_iou"][name] for m in per_fold if m["per_class_iou"][name] is not None
        ]
        assert s["n"] == len(values)
        if values:
            assert s["mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
        if len(values) > 1:
            assert s["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)


def test_cli_prints_the_summary_table(kfold_project):
    runner = CliRunner()
    cwd = os.getcwd()
    os.chdir(kfold_project)
    try:
        result = runner.invoke(app, ["kfold"])
        summary = json.loads(Path("outputs/kfold_summary.json").read_text())
        no_summary = runner.invoke(app, ["kfold", "-S", "data.outputs=elsewhere"])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    assert f"2-fold cityscapes: mIoU {100 * summary['miou']['mean']:.2f}" in result.output
    road = summary["per_class_iou"]["road"]
    assert "road" in result.output and f"{100 * road['mean']:.2f}" in result.output
    assert no_summary.exit_code == 1
    assert "elsewhere/kfold_summary.json: no k-fold summary yet" in no_summary.output


def test_fold_errors_name_the_fix(kfold_project, tmp_path):
    import shutil

    from pipeline.errors import CheckpointError, DataError
    from stages import steps

    proj = shutil.copytree(kfold_project, tmp_path / "proj")
    cwd = os.getcwd()
    os.chdir(proj)
    try:
        p = steps.load("params.yaml")
        with pytest.raises(ConfigError, match="fold 2: the folds file has 2 folds"):
            steps.train(p, fold=2)
        # a resume onto other folds (the stamp next to last.pt says which) is refused
        stamp = Path("outputs/kfold/fold-0/train/fold.json")
        stamp.write_text(json.dumps({"fold": 0, "val_keys_sha256": "other"}))
        with pytest.raises(
            CheckpointError, match="fold-0/train/last.pt: cannot resume: it trained on other folds"
        ):
            steps.train(p, resume=steps.Resume.CONTINUE, fold=0)
        p3 = steps.load("params.yaml", ["data.folds=3", "data.fold_ids=[0, 1, 2]"])
        with pytest.raises(
            DataError, match="has 2 folds but data.folds is 3; run `seg kfold split`"
        ):
            steps.evaluate(p3, fold=0)
        Path("outputs/kfold/folds.json").unlink()
        with pytest.raises(DataError, match=r"folds.json: no folds file \(run `seg kfold split`"):
            steps.train(p, fold=0)
    finally:
        os.chdir(cwd)


# ---- the DVC graph ------------------------------------------------------------------------

FOLD_STAGES = ("kfold_train@0", "kfold_train@1", "kfold_eval@0", "kfold_eval@1", "kfold_summary")


@pytest.mark.e2e
@pytest.mark.slow
# past CI's budget (make test-soak): two minutes of dvc repro; CI's test_dvc_deps runs the
# k-fold stages through `dvc repro` too, once
@pytest.mark.soak
def test_dvc_repro_runs_every_fold_and_reruns_them_all_on_a_param_change(tmp_path):
    import yaml
    from test_dvc import _new_project, dvc, git

    proj = _new_project(tmp_path / "proj")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["data"].update(folds=2, fold_ids=[0, 1])
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(proj, "commit", "-qam", "2 folds")

    out = dvc(proj, "repro").stdout
    for stage in ("kfold_split", *FOLD_STAGES):
        assert f"Running stage '{stage}'" in out, out
    per_fold = [
        json.loads((proj / f"outputs/kfold/fold-{k}/eval/metrics.json").read_text()) for k in (0, 1)
    ]
    summary = json.loads((proj / "outputs/kfold_summary.json").read_text())
    assert summary["miou"]["mean"] == pytest.approx(statistics.mean(m["miou"] for m in per_fold))
    shown = json.loads(dvc(proj, "metrics", "show", "--json").stdout)
    (workspace,) = shown.values()
    assert workspace["data"]["outputs/kfold_summary.json"]["data"]["miou"] == summary["miou"]
    # everything the fold stages leave is DVC-tracked, git-ignored, or a metrics file for git
    changed = {line[3:] for line in git(proj, "status", "--porcelain", "-uall").splitlines()}
    stray = {
        f
        for f in changed
        if f not in {"dvc.lock", "outputs/kfold_summary.json"}
        and not f.endswith(".gitignore")
        and not f.startswith(("outputs/train/dvclive/", "outputs/eval/"))
        and not (
            f.startswith("outputs/kfold/fold-")
            and ("/dvclive/" in f or f.endswith("eval/metrics.json"))
        )
    }
    assert not stray, sorted(stray)
    git(proj, "add", "-A")
    git(proj, "commit", "-qm", "repro")

    out = dvc(proj, "repro").stdout  # nothing changed: only the working point is asked again
    ran = [line for line in out.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'working_point':"], out
    assert git(proj, "status", "--porcelain") == ""

    params["train"]["lr"] = 0.02  # one param: every fold trains and is scored again
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc(proj, "repro", "kfold_summary").stdout  # (the main train/evaluate left out)
    for stage in FOLD_STAGES:
        assert f"Running stage '{stage}'" in out, out
    assert "Stage 'kfold_split' didn't change, skipping" in out, out
    after = json.loads((proj / "outputs/kfold_summary.json").read_text())
    assert after["miou"] != summary["miou"]

"""Synthetic Cityscapes scenes: layout, label semantics, determinism, safe writes, the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.data import synth
from pipeline.data.labels import get_spec
from pipeline.data.pngio import read_png
from pipeline.data.sources import CityscapesAdapter
from pipeline.data.synth import SUMMARY_FILE, generate_cityscapes
from pipeline.errors import ConfigError, DataError
from stages.cli import app

H, W = 64, 128


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "cityscapes"
    calls = []
    summary = generate_cityscapes(
        root,
        {"train": 6, "val": 2},
        height=H,
        width=W,
        seed=3,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert calls[0] == (0, 8) and calls[-1] == (8, 8)
    return root, summary


def test_layout_is_read_by_the_cityscapes_adapter(synth_root):
    root, summary = synth_root
    adapter = CityscapesAdapter()
    train, val = adapter.samples(root, "train"), adapter.samples(root, "val")
    assert len(train) == 6 and len(val) == 2
    assert {s.meta["city"] for s in train} == set(synth.CITIES["train"])
    assert {s.meta["city"] for s in val} <= set(synth.CITIES["val"])
    assert train[0].key.endswith("_000019") and all(s.instance is not None for s in train)
    image = read_png(train[0].image)
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    train_ids = adapter.read_label(train[0])
    assert train_ids.shape == (H, W) and train_ids.dtype == np.uint8
    assert summary["frames"] == {"train": 6, "val": 2}
    assert (root / SUMMARY_FILE).is_file()
    assert not list(root.parent.glob(".cityscapes.synth-*")), "temporary folder left behind"


def test_labels_cover_classes_void_and_ignored_ids(synth_root):
    root, summary = synth_root
    spec = get_spec("cityscapes")
    ids = set()
    for path in (root / "gtFine" / "train").rglob("*_labelIds.png"):
        ids |= set(np.unique(read_png(path)).tolist())
    assert ids <= set(summary["label_ids"])
    train_classes = {int(spec.label_to_train[i]) for i in ids} - {255}
    assert len(train_classes) >= 12, [spec.class_names[t] for t in sorted(train_classes)]
    assert len(summary["classes_per_split"]["train"]) == len(train_classes)
    # Void ids the real data has: ego vehicle, rectification border, out of roi -> ignore.
    assert {1, 2, 3} <= ids
    assert all(spec.label_to_train[i] == 255 for i in (1, 2, 3))


def test_instance_ids_follow_cityscapes(synth_root):
    root, _ = synth_root
    for label_path in (root / "gtFine" / "train").rglob("*_labelIds.png"):
        label = read_png(label_path)
        inst = read_png(str(label_path).replace("_labelIds", "_instanceIds"))
        assert inst.dtype == np.uint16
        objects = inst >= 1000
        # Objects: labelId * 1000 + n; everything else its plain labelId.
        assert np.array_equal(inst[objects] // 1000, label[objects])
        assert np.array_equal(inst[~objects], label[~objects])
        assert set(np.unique(label[objects]).tolist()) <= {24, 25, 26, 27, 28, 31, 32, 33}
        assert 26 in np.unique(label[objects])  # every scene has a car instance


def test_same_seed_gives_identical_bytes_any_worker_count(tmp_path, synth_root):
    root, _ = synth_root
    again = tmp_path / "again"
    generate_cityscapes(again, {"train": 6, "val": 2}, height=H, width=W, seed=3, workers=2)
    assert _files(again) == _files(root)
    fewer = tmp_path / "fewer"  # frames are independent: a shorter split is a prefix
    generate_cityscapes(fewer, {"train": 2}, height=H, width=W, seed=3)
    for name, data in _files(fewer).items():
        if name != SUMMARY_FILE:
            assert _files(root)[name] == data
    other = tmp_path / "other"
    generate_cityscapes(other, {"train": 2}, height=H, width=W, seed=4)
    assert _files(other) != _files(fewer)


def test_full_size_frame_renders(tmp_path):
    image, label, inst = synth.render_scene(synth.frame_rng(0, "train", 0), 1024, 2048)
    assert image.shape == (1024, 2048, 3) and label.shape == inst.shape == (1024, 2048)


def test_existing_root_is_refused_then_replaced_with_overwrite(tmp_path):
    root = tmp_path / "out"
    generate_cityscapes(root, {"train": 1}, height=32, width=64, seed=0)
    with pytest.raises(DataError, match=str(root)):
        generate_cityscapes(root, {"train": 1}, height=32, width=64, seed=1)
    summary = generate_cityscapes(root, {"val": 2}, height=32, width=64, seed=1, overwrite=True)
    assert summary["frames"] == {"val": 2}
    assert not (root / "leftImg8bit" / "train").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # overwrite never deletes a folder that is not a synthetic root
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a synthetic root"):
        generate_cityscapes(precious, {"train": 1}, height=32, width=64, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    generate_cityscapes(empty, {"train": 1}, height=32, width=64)  # an empty folder is fine
    assert (empty / SUMMARY_FILE).is_file()


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    real, calls = synth.render_scene, []

    def flaky(rng, height, width):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(rng, height, width)

    monkeypatch.setattr(synth, "render_scene", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_cityscapes(tmp_path / "out", {"train": 3}, height=32, width=64)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"splits": {}}, "at least one split"),
        ({"splits": {"train": -1}}, "integer >= 0"),
        ({"splits": {"train": 0}}, "0 frames"),
        ({"splits": {"Train/x": 1}}, "split name"),
        ({"splits": {"train": 1}, "height": 16}, "height"),
        ({"splits": {"train": 1}, "width": 31}, "width"),
        ({"splits": {"train": 1}, "workers": -1}, "workers"),
    ],
)
def test_bad_arguments_raise_config_error(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        generate_cityscapes(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_writes_a_root_and_reports_errors_in_one_line(tmp_path):
    runner = CliRunner()
    out = tmp_path / "demo"
    args = [
        "synth",
        str(out),
        "--train",
        "2",
        "--val",
        "1",
        "--height",
        "32",
        "--width",
        "64",
        "--workers",
        "1",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 train, 1 val" in result.output and "classes" in result.output
    assert len(CityscapesAdapter().samples(out, "val")) == 1
    again = runner.invoke(app, args)
    assert again.exit_code == 1
    assert "error:" in again.output and "--overwrite" in again.output
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    bad = runner.invoke(app, ["synth", str(tmp_path / "x"), "--height", "8"])
    assert bad.exit_code == 1 and "height" in bad.output

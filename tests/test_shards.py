"""Shards: conversion, byte-identical output, manifest, readers, and bad input."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_ROOT, needs_sample, write_frame
from PIL import Image
from typer.testing import CliRunner

from pipeline.data.labels import get_spec
from pipeline.data.pngio import read_png
from pipeline.data.readers import EvalReader, TrainStream, eval_loader, skip_for_resume
from pipeline.data.shards import class_pixel_counts, read_manifest, write_shards
from pipeline.errors import DataError
from stages.cli import app


@needs_sample
def test_real_cityscapes_frame_converts_by_official_table(tmp_path):
    out = tmp_path / "val"
    write_shards(SAMPLE_ROOT, "val", out)
    (sample,) = list(EvalReader(out))
    gt = SAMPLE_ROOT / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png"
    expected = get_spec("cityscapes").label_to_train[read_png(gt)]
    assert sample["key"] == "frankfurt_000000_000294"
    assert torch.equal(sample["label"], torch.from_numpy(expected))
    image = read_png(
        str(gt).replace("gtFine_labelIds", "leftImg8bit").replace("gtFine", "leftImg8bit"), "RGB"
    )
    assert torch.equal(sample["image"].permute(1, 2, 0), torch.from_numpy(image))
    assert sample["instance"].dtype == torch.int32 and int(sample["instance"].max()) >= 24000
    # the README's reference: the table agrees with the rendered labelTrainIds on ~99.77 %
    rendered = read_png(str(gt).replace("labelIds", "labelTrainIds"))
    assert 0.995 < (expected == rendered).mean() < 1.0


def test_shards_are_byte_identical_and_manifest_is_complete(tiny_root, tmp_path):
    a = write_shards(tiny_root, "train", tmp_path / "a", samples_per_shard=4, workers=1)
    write_shards(tiny_root, "train", tmp_path / "b", samples_per_shard=4, workers=2)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["manifest.parquet", "shard-000000.tar", "shard-000001.tar"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a.samples == 6 and a.shards == 2
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:
        names = tar.getnames()
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in tar.getmembers())
    assert names[:4] == [
        "alpha_000000_000019.image.png",
        "alpha_000000_000019.instance.png",
        "alpha_000000_000019.json",
        "alpha_000000_000019.label.png",
    ]
    table = read_manifest(tmp_path / "a")
    assert table.column("key").to_pylist() == sorted(table.column("key").to_pylist())
    row = table.to_pylist()[0]
    assert row["height"] == 32 and row["width"] == 64 and len(row["image_sha256"]) == 64
    # class counts come from the labels: every pixel is counted once, as a class or as ignore
    counts = class_pixel_counts(tmp_path / "a")
    assert counts.sum() + sum(table.column("ignore_pixels").to_pylist()) == 6 * 32 * 64
    assert counts[get_spec("cityscapes").class_names.index("car")] > 0


def test_eval_reader_yields_each_sample_once_in_order_and_splits_by_rank(tiny_root, tmp_path):
    write_shards(tiny_root, "train", tmp_path / "s", samples_per_shard=4)
    keys = [s["key"] for s in EvalReader(tmp_path / "s")]
    assert keys == sorted(keys) and len(keys) == 6
    parts = [[s["key"] for s in EvalReader(tmp_path / "s", rank=r, world_size=4)] for r in range(4)]
    assert sorted(k for p in parts for k in p) == keys
    assert [len(p) for p in parts] == [2, 2, 1, 1]


def test_train_stream_is_seeded_split_and_decode_only(tiny_root, tmp_path):
    write_shards(tiny_root, "train", tmp_path / "s", samples_per_shard=2)

    def take(n, shuffle_buffer=3, **kw):
        it = iter(TrainStream(tmp_path / "s", shuffle_buffer=shuffle_buffer, **kw))
        return [next(it) for _ in range(n)]

    a, b = take(8, seed=1), take(8, seed=1)
    assert [s["key"] for s in a] == [s["key"] for s in b]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))
    assert [s["key"] for s in take(8, seed=2)] != [s["key"] for s in a]
    # decoded at the stored size: scale, crop and flip happen on the device, batched
    assert a[0]["image"].shape == (3, 32, 64) and a[0]["image"].dtype == torch.uint8
    assert a[0]["label"].shape == (32, 64) and a[0]["label"].dtype == torch.uint8
    # two ranks read different shards (3 shards >= 2 consumers: shard split)
    r0 = {s["key"] for s in take(2, shuffle_buffer=1, seed=1, rank=0, world_size=2)}
    r1 = {s["key"] for s in take(2, shuffle_buffer=1, seed=1, rank=1, world_size=2)}
    assert len(r0) == len(r1) == 2 and not r0 & r1
    # resume: skipping what was consumed continues the same sequence
    assert [s["key"] for s in take(5, seed=1, skip=3)] == [s["key"] for s in take(8, seed=1)][3:]
    assert skip_for_resume(5, batch_size=2, num_workers=2) == [6, 4]


def test_test_split_is_sharded_without_labels(tmp_path):
    root = tmp_path / "cs"
    write_frame(root, "test", "berlin", 0)
    for p in (root / "gtFine").rglob("*.png"):
        p.unlink()
    write_shards(root, "test", tmp_path / "t")
    (s,) = list(EvalReader(tmp_path / "t"))
    assert s["label"] is None and s["image"].shape == (3, 32, 64)


def _assert_no_output(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


@pytest.mark.parametrize("damage", ["missing_label", "size_mismatch", "truncated", "unknown_id"])
def test_bad_input_names_file_and_leaves_nothing(tiny_root, tmp_path, damage):
    gt = tiny_root / "gtFine/train/beta/beta_000004_000019_gtFine_labelIds.png"
    match damage:
        case "missing_label":
            gt.unlink()
        case "size_mismatch":
            Image.fromarray(np.zeros((16, 64), np.uint8)).save(gt)
        case "truncated":
            gt.write_bytes(gt.read_bytes()[:60])
        case "unknown_id":
            Image.fromarray(np.full((32, 64), 40, np.uint8)).save(gt)
    out = tmp_path / "out" / "train"
    out.parent.mkdir()
    with pytest.raises(DataError, match="beta_000004_000019_gtFine_labelIds.png"):
        write_shards(tiny_root, "train", out, samples_per_shard=2)
    _assert_no_output(tmp_path, out)
    # --skip-bad: the bad sample is left out and listed in the summary and the manifest
    summary = write_shards(tiny_root, "train", out, samples_per_shard=2, skip_bad=True)
    assert summary.samples == 5 and summary.skipped[0][0] == "beta_000004_000019"
    errors = dict(
        zip(*read_manifest(out).select(["key", "error"]).to_pydict().values(), strict=True)
    )
    assert "beta_000004_000019_gtFine_labelIds.png" in errors["beta_000004_000019"]
    assert errors["alpha_000000_000019"] is None


def test_empty_split_and_existing_output_are_errors(tiny_root, tmp_path):
    (tiny_root / "leftImg8bit" / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*_leftImg8bit.png"):
        write_shards(tiny_root, "empty", tmp_path / "e")
    out = tmp_path / "exists"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="exists"):
        write_shards(tiny_root, "val", out)
    with pytest.raises(DataError, match="not a shard folder"):  # --overwrite never deletes it
        write_shards(tiny_root, "val", out, overwrite=True)
    assert (out / "precious.txt").read_text() == "keep me"


def test_cli_preprocess_and_stats(tiny_root, tmp_path):
    runner = CliRunner()
    out = tmp_path / "val"
    result = runner.invoke(app, ["preprocess", str(tiny_root), "val", str(out), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "3 samples -> 1 shard(s)" in result.output
    result = runner.invoke(app, ["stats", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert '"class": "car"' in result.output
    result = runner.invoke(app, ["preprocess", str(tiny_root), "val", str(out)])
    assert result.exit_code == 1 and "exists" in result.output


def test_shards_read_from_pipe_and_fsspec_urls(tiny_root, tmp_path):
    write_shards(tiny_root, "val", tmp_path / "s")
    shard = tmp_path / "s" / "shard-000000.tar"
    local = [s["key"] for s in EvalReader(tmp_path / "s")]
    assert [s["key"] for s in EvalReader([f"pipe:cat {shard}"])] == local
    assert [s["key"] for s in EvalReader([f"file://{shard}"])] == local
    import fsspec

    mem = fsspec.filesystem("memory")
    mem.pipe("/bucket/shard-000000.tar", shard.read_bytes())
    assert [s["key"] for s in EvalReader(["memory://bucket/shard-000000.tar"])] == local
    it = iter(TrainStream([f"pipe:cat {shard}"], shuffle_buffer=1))
    assert next(it)["image"].shape == (3, 32, 64)


# ----------------------------------------------------------------------------- damaged shards


def _damage(shard: Path, key: str, member: str, how: str) -> None:
    """Flip bytes of one member's data, or of its tar header (as a disk or a copy would)."""
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        info = tar.getmember(f"{key}.{member}")
    start = info.offset_data if how == "data" else info.offset
    for i in range(start + 10, start + 60):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["data", "header"])
def test_damaged_val_shard_names_the_shard_and_the_key(tiny_root, tmp_path, how):
    out = tmp_path / "val"
    write_shards(tiny_root, "val", out, samples_per_shard=2)
    key = "gamma_000101_000019"  # the second sample of shard 0
    _damage(out / "shard-000000.tar", key, "label.png", how)
    for workers in (0, 2):  # checked in the decode workers too
        with pytest.raises(DataError) as err:
            for _ in eval_loader(out, batch_size=2, workers=workers):
                pass
        assert "shard-000000.tar" in str(err.value) and key in str(err.value)
    # an intact split reads whole, each sample once, in one or two workers alike
    write_shards(tiny_root, "val", out, samples_per_shard=2, overwrite=True)
    for workers in (0, 2):
        keys = [k for batches in eval_loader(out, 2, workers) for b in batches for k in b["key"]]
        assert sorted(keys) == sorted(s["key"] for s in EvalReader(out))

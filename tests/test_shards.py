"""Shards: conversion, byte-identical output, manifest, readers, and bad input."""

from __future__ import annotations

import re
import shutil
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
from pipeline.data.shards import class_pixel_counts, manifest_info, read_manifest, write_shards
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


@pytest.mark.parametrize("image_format", ["png", "zstd", "npy"])
def test_shards_are_byte_identical_and_manifest_is_complete(tiny_root, tmp_path, image_format):
    kw = {"samples_per_shard": 4, "image_format": image_format}
    a = write_shards(tiny_root, "train", tmp_path / "a", workers=1, **kw)
    write_shards(tiny_root, "train", tmp_path / "b", workers=2, **kw)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["manifest.parquet", "shard-000000.tar", "shard-000001.tar"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a.samples == 6 and a.shards == 2
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:
        names = tar.getnames()
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in tar.getmembers())
    image = {"png": "image.png", "zstd": "image.up.npy.zst", "npy": "image.npy"}[image_format]
    assert names[:4] == [
        f"alpha_000000_000019.{image}",
        "alpha_000000_000019.instance.png",  # the source's 16-bit PNG, as it is
        "alpha_000000_000019.json",
        "alpha_000000_000019.label.npy.zst",
    ]
    table = read_manifest(tmp_path / "a")
    assert table.column("key").to_pylist() == sorted(table.column("key").to_pylist())
    row = table.to_pylist()[0]
    assert row["height"] == 32 and row["width"] == 64 and len(row["image_sha256"]) == 64
    assert len(row["image_xxh3"]) == len(row["label_xxh3"]) == 16
    info = manifest_info(tmp_path / "a")  # the codec is named in the manifest
    assert info["image_format"] == image_format and info["format_version"] == "2"
    assert info["codec"].startswith("images: Up filter + zstd-1, labels: zstd-3 (zstandard 0.25.0")
    # every pixel as the source has it, whatever the codec
    for sample in EvalReader(tmp_path / "a"):
        key = sample["key"]
        city = key.split("_")[0]
        src = tiny_root / "leftImg8bit/train" / city / f"{key}_leftImg8bit.png"
        assert torch.equal(sample["image"].permute(1, 2, 0), torch.from_numpy(read_png(src)))
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
    _damage(out / "shard-000000.tar", key, "label.npy.zst", how)
    for workers in (0, 2):  # checked in the decode workers too
        with pytest.raises(DataError) as err:
            for _ in eval_loader(out, batch_size=2, workers=workers):
                pass
        line = str(err.value).strip().splitlines()[-1]  # a worker's: after its traceback
        assert "shard-000000.tar" in line and key in line
        if how == "data":  # the member itself is named
            assert f"shard-000000.tar: {key}.label.npy.zst: does not match its sha256" in line
    # an intact split reads whole, each sample once, in one or two workers alike
    write_shards(tiny_root, "val", out, samples_per_shard=2, overwrite=True)
    for workers in (0, 2):
        keys = [k for batches in eval_loader(out, 2, workers) for b in batches for k in b["key"]]
        assert sorted(keys) == sorted(s["key"] for s in EvalReader(out))


# ----------------------------------------------------------------------------- old shards

# written by the writer before the codecs (format 1: image/label/instance PNG members, no xxh3
# columns, no format_version), from conftest.write_frame's gamma 100-102 frames
FORMAT1 = Path(__file__).parent / "data" / "format1-val"


def test_shards_of_the_first_format_read_and_are_checked(tmp_path):
    info = manifest_info(FORMAT1)
    assert info["format_version"] == "1" and "codec" not in info
    old = list(EvalReader(FORMAT1))  # sha256-checked, as ever
    root = tmp_path / "cs"
    for i in range(3):
        write_frame(root, "val", "gamma", 100 + i)
    write_shards(root, "val", tmp_path / "new", samples_per_shard=2, image_format="zstd")
    new = list(EvalReader(tmp_path / "new"))
    assert [s["key"] for s in old] == [s["key"] for s in new]
    for a, b in zip(old, new, strict=True):
        for name in ("image", "label", "instance"):
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    # training checks the old members by sha256 (they have no xxh3), and names a damaged one
    stream = TrainStream(FORMAT1, shuffle_buffer=1)
    assert stream.algo == "sha256"
    assert {next(iter(stream))["key"]} <= {s["key"] for s in old}
    copy = tmp_path / "damaged"
    shutil.copytree(FORMAT1, copy)
    _damage(copy / "shard-000000.tar", "gamma_000100_000019", "label.png", "data")
    with pytest.raises(DataError, match="shard-000000.tar: gamma_000100_000019.label.png: does "):
        list(zip(range(6), TrainStream(copy, shuffle_buffer=1), strict=False))


def test_a_reader_mid_epoch_never_mixes_in_a_split_written_over_it(tiny_root, tmp_path):
    """`seg preprocess --overwrite` of a local split while training reads it: every sample
    the stream yields is one of the manifest it pinned, and the first shard of the new data it
    opens stops it with one line naming the shard and the member."""
    out = tmp_path / "train"
    write_shards(tiny_root, "train", out, samples_per_shard=1, image_format="zstd")
    old = {s["key"]: s["image"] for s in EvalReader(out)}
    loader = torch.utils.data.DataLoader(
        TrainStream(out, seed=1, shuffle_buffer=1), batch_size=None, num_workers=1,
        prefetch_factor=1,
    )  # fmt: skip
    stream = iter(loader)
    seen = [next(stream) for _ in range(2)]
    for i in range(6):  # every frame changes
        write_frame(tiny_root, "train", "alpha" if i < 3 else "beta", i, seed=9)
    write_shards(tiny_root, "train", out, samples_per_shard=1, image_format="zstd", overwrite=True)
    with pytest.raises(DataError) as err:
        for _ in range(12):
            seen.append(next(stream))
    line = str(err.value).strip().splitlines()[-1]
    assert re.search(r"train/shard-00000\d\.tar: \w+_0000\d\d_000019\.image\.up\.npy\.zst: does not "
                     r"match its xxh3 in the manifest this reader pinned", line), line  # fmt: skip
    assert seen and all(torch.equal(s["image"], old[s["key"]]) for s in seen)

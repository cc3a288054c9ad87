"""Evaluation at decode speed, checked on CPU: batched equals per-frame, workers change
nothing, bf16 autocast scores like fp32, and a damaged shard stops `seg eval` in one line."""

from __future__ import annotations

import shutil
import tarfile

import pytest
import torch
from conftest import LEARNED_MIOU
from test_shards import _damage
from typer.testing import CliRunner

from pipeline.data.labels import get_spec
from pipeline.engine.checkpoint import build_from_checkpoint
from pipeline.engine.evaluate import InferenceOptions, evaluate
from stages.cli import app


@pytest.fixture(scope="module")
def demo_model(learned_project):
    """A model trained long enough to have learned the synthetic scenes (conftest.LEARN)."""
    model, _ = build_from_checkpoint(learned_project / "outputs/train/best.pt")
    return model, learned_project / "data/shards/val"


@pytest.fixture(scope="module")
def model_and_shards(trained_project):
    model, _ = build_from_checkpoint(trained_project / "outputs/train/best.pt")
    return model, trained_project / "data/shards/val"


def test_batched_with_workers_equals_frame_by_frame(model_and_shards):
    model, shards = model_and_shards
    spec = get_spec("cityscapes")
    one, acc1 = evaluate(model, shards, spec, torch.device("cpu"), batch_size=1, workers=0)
    many, acc2 = evaluate(model, shards, spec, torch.device("cpu"), batch_size=2, workers=2)
    assert torch.equal(acc1.confusion, acc2.confusion)
    assert torch.equal(acc1.instance_stats, acc2.instance_stats)
    assert one["images"] == many["images"] == 2 and one["miou"] == many["miou"]
    assert one["iiou"] == many["iiou"]


def test_bf16_autocast_scores_within_a_tenth_of_a_point_of_fp32(demo_model):
    model, shards = demo_model
    spec = get_spec("cityscapes")
    cpu = torch.device("cpu")
    fp32, _ = evaluate(model, shards, spec, cpu, batch_size=4)
    bf16, _ = evaluate(model, shards, spec, cpu, InferenceOptions(amp=torch.bfloat16), 4)
    print(f"fp32 mIoU {100 * fp32['miou']:.3f}, bf16 {100 * bf16['miou']:.3f}")
    assert fp32["miou"] > LEARNED_MIOU  # its argmax is not noise (4 steps: ~0.03)
    assert abs(100 * (bf16["miou"] - fp32["miou"])) <= 0.1


def test_damaged_shard_fails_seg_eval_in_one_line_without_metrics(
    trained_project, tmp_path, monkeypatch
):
    proj = tmp_path / "proj"
    shutil.copytree(trained_project, proj)
    monkeypatch.chdir(proj)
    shard = sorted((proj / "data/shards/val").glob("shard-*.tar"))[0]
    with tarfile.open(shard) as tar:
        key = tar.getnames()[0].split(".")[0]
    _damage(shard, key, "image.png", "data")
    result = CliRunner().invoke(app, ["eval"], env={"COLUMNS": "300"})
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and shard.name in lines[-1] and key in lines[-1]
    assert "Traceback" not in result.output
    assert not (proj / "outputs/eval/metrics.json").exists()


@pytest.mark.slow  # `make test-slow` (and CI) runs it
def test_workers_start_after_a_prefect_flow_ran_in_this_process(model_and_shards):
    """An in-process Prefect flow leaves threads behind; workers forked from such a process
    died at exit. They start from a forkserver then (pipeline.data.readers.worker_context)."""
    from prefect import flow

    @flow(persist_result=False)
    def noop() -> int:
        return 1

    assert noop() == 1
    model, shards = model_and_shards
    result, _ = evaluate(model, shards, get_spec("cityscapes"), torch.device("cpu"), workers=2)
    assert result["images"] == 2

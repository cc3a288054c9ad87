"""The training loop's working point, checked on CPU: it never waits on the host between
reports, it honours train.log_every, and validation goes through the evaluation path."""

from __future__ import annotations

import pytest
import torch
from conftest import make_project

from stages import steps

# Python-level conversions that copy a tensor's value to the host (on CUDA: wait for the GPU)
_SYNCS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")


@pytest.fixture(scope="module")
def proj(scratch):
    return make_project(scratch("loop") / "p")


def _count_syncs(monkeypatch, run) -> int:
    count = 0
    originals = {name: getattr(torch.Tensor, name) for name in _SYNCS}

    def counting(name):
        def method(self, *args, **kwargs):
            nonlocal count
            count += 1
            return originals[name](self, *args, **kwargs)

        return method

    with monkeypatch.context() as m:
        for name in _SYNCS:
            m.setattr(torch.Tensor, name, counting(name))
        run()
    return count


def test_no_host_sync_between_reports(proj, monkeypatch):
    """N and 2N steps, each with one report, one validation and one checkpoint at the end:
    every conversion the extra N steps add would be a per-step wait for the device."""
    monkeypatch.chdir(proj)

    def run(n: int):
        # workers=1: decoding and collating happen in a worker process, as on a GPU node
        over = [f"train.iterations={n}", f"train.log_every={n}", f"train.val_interval={n}"]
        over += [f"train.checkpoint_interval={n}", "train.workers=1", "train.ohem=true"]
        over += ["train.class_weights=inverse_log", "train.grad_accum=2"]
        return lambda: steps.train(steps.load("params.yaml", over))

    short, long = _count_syncs(monkeypatch, run(3)), _count_syncs(monkeypatch, run(6))
    assert short > 0  # the counter works: the report and the validation read values
    assert long == short, f"{(long - short) / 3:.1f} host syncs per step"


def test_reports_every_log_every_steps(proj, monkeypatch):
    monkeypatch.chdir(proj)
    seen = []

    class Sink:
        def on_step(self, info):
            seen.append(info)

        def on_eval(self, step, metrics):
            seen.append({"eval": step, "miou": metrics["miou"]})

    p = steps.load("params.yaml", ["train.iterations=7", "train.log_every=3"])
    steps.train(p, sink=Sink())
    assert [s.get("step", s.get("eval")) for s in seen] == [2, 3, 4, 6, 6, 7, 7]
    reports = [s for s in seen if "loss" in s]
    assert all(s["loss"] > 0 and s["images_per_s"] > 0 for s in reports)
    assert [s["step"] for s in reports] == [3, 6, 7]


def test_a_repository_without_a_commit_is_named_not_a_dvclive_traceback(tmp_path, monkeypatch):
    """`git init`, no commit yet: DVCLive's "Empty git repo" traceback became one line."""
    import subprocess

    from pipeline.errors import ConfigError
    from stages.train_log import TrainLog

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="commit first") as err:
        TrainLog(tmp_path / "outputs" / "train", resume=False)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "init"], cwd=tmp_path, check=True)  # fmt: skip
    TrainLog(tmp_path / "outputs" / "train", resume=False).live.end()

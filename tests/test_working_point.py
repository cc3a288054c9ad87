"""The working point follows the machine: precision by device and CPU capability, `seg doctor`,
and the single-process pieces of the GPU paths that a CPU can show (issue 16): OHEM's
threshold, shard reads per consumer, optimizer-state layouts on resume, one image per GPU
with SyncBN, no cuDNN autotuning in validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_project, write_frame
from typer.testing import CliRunner

from pipeline.data.readers import TrainStream
from pipeline.data.shards import write_shards
from pipeline.engine import device as dev
from pipeline.engine.losses import kth_smallest
from pipeline.errors import ConfigError
from stages.cli import app

CPU = torch.device("cpu")
runner = CliRunner()
# what oneDNN and ATen run at on an AVX2-only CPU (no AVX-512, no native bf16)
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


# ----------------------------------------------------------------------------- precision


# Known CPUs: their flags (the ones that matter) and torch's kernel level on them, what
# `amp: auto` must pick there, and the reason it gives (Intel's and AMD's ISA tables).
KNOWN_CPUS = {
    "Sapphire Rapids": ({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "AVX512", "bf16",
                        "amp: auto; the CPU has amx_bf16 and avx512_bf16"),
    "Zen 4": ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", "bf16",
              "amp: auto; the CPU has avx512_bf16"),
    "Skylake-SP": ({"avx2", "avx512f"}, "AVX512", "fp32",
                   "amp: auto; fp32 on CPU: no avx512_bf16 or amx_bf16 in the CPU flags"),
    "Zen 2 (AVX2 only)": ({"avx2"}, "AVX2", "fp32",
                          "amp: auto; fp32 on CPU: no avx512_bf16 or amx_bf16 in the CPU flags"),
    "Zen 4 under ATEN_CPU_CAPABILITY=avx2": (
        {"avx2", "avx512f", "avx512_bf16"}, "AVX2", "fp32",
        "amp: auto; fp32 on CPU: torch's CPU kernels run at AVX2 (ATEN_CPU_CAPABILITY)"),
}  # fmt: skip


@pytest.fixture
def known_cpu(monkeypatch):
    """`known_cpu(flags, capability)`: the engine sees that CPU (its /proc/cpuinfo flags and
    torch's kernel level), on x86, with no ISA cap set; the real CPU again afterwards."""

    def use(flags: set[str], capability: str) -> None:
        monkeypatch.setattr(dev, "_cpu_flags", lambda: set(flags))
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(dev.platform, "machine", lambda: "x86_64")
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        dev.cpu_info.cache_clear()

    yield use
    dev.cpu_info.cache_clear()


@pytest.mark.parametrize("cpu", list(KNOWN_CPUS))
def test_auto_on_cpu_is_bf16_only_where_the_cpu_has_it(known_cpu, cpu):
    flags, capability, name, why = KNOWN_CPUS[cpu]
    known_cpu(flags, capability)
    prec = dev.precision("auto", CPU)
    assert (prec.name, prec.why, prec.scaler) == (name, why, False)
    assert prec.dtype == {"bf16": torch.bfloat16, "fp32": None}[name]


def test_a_resume_onto_another_precision_is_refused_unless_allowed(
    known_cpu, tmp_path, monkeypatch
):
    """Killed on a host with native bf16 (amp: auto: bf16), resumed where auto is fp32: `seg
    train --auto-resume` refuses in one line and leaves last.pt as it was; allowed (the env
    var dvc repro passes on, or --allow-precision-change), it goes on in fp32 and the
    checkpoint's working point records where the precision changed. (One bf16 step: bf16
    autocast is 10-100x slower than fp32 on an AVX2-only CPU.)"""
    from pipeline.engine import checkpoint
    from stages import steps

    zen4, zen2 = KNOWN_CPUS["Zen 4"], KNOWN_CPUS["Zen 2 (AVX2 only)"]
    proj = make_project(tmp_path / "p", **{"train.amp": "auto", "train.iterations": 2,
                                          "train.checkpoint_interval": 1})  # fmt: skip
    monkeypatch.chdir(proj)
    known_cpu(*zen4[:2])
    steps.train(steps.load("params.yaml"), stop_after=1)
    last = proj / "outputs/train/last.pt"
    assert checkpoint.load(last)["working_point"]["precision"] == "bf16"
    before = last.read_bytes()

    known_cpu(*zen2[:2])
    refused = runner.invoke(app, ["train", "--auto-resume"])
    assert refused.exit_code == 1, refused.output
    (line,) = [ln for ln in refused.output.splitlines() if ln.startswith("error: ")]
    assert "trained in bf16 up to step 1; here amp: auto resolves to fp32" in line, line
    assert "--allow-precision-change" in line and last.read_bytes() == before

    allowed = runner.invoke(app, ["train", "--auto-resume"],
                            env={"SEG_ALLOW_PRECISION_CHANGE": "1"})  # fmt: skip
    assert allowed.exit_code == 0, allowed.output
    ckpt = checkpoint.load(last)
    assert ckpt["working_point"]["precision"] == "fp32" and ckpt["step"] == 2
    (change,) = ckpt["working_point"]["precision_changes"]
    assert (change["step"], change["from"], change["to"]) == (1, "bf16", "fp32")
    summary = json.loads((proj / "outputs/train/summary.json").read_text())
    assert summary["working_point"]["precision_changes"] == [change]


def test_a_onednn_cap_below_bf16_keeps_auto_at_fp32(known_cpu, monkeypatch):
    known_cpu({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "AVX512")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    prec = dev.precision("auto", CPU)
    assert prec.name == "fp32"
    assert prec.why == (
        "amp: auto; fp32 on CPU: ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN below AVX512_CORE_BF16"
    )


def test_explicit_modes_on_cpu():
    assert dev.precision("off", CPU) == dev.Precision("fp32", None, False, "amp: off")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        dev.precision("fp16", CPU)
    with pytest.raises(ConfigError, match="not one of"):
        dev.precision("half", CPU)


def test_on_an_avx2_only_cpu_auto_is_fp32_and_explicit_bf16_warns():
    """A real process with oneDNN and ATen held at AVX2 (what an AVX2-only CPU runs)."""
    code = (
        "import logging, torch; logging.basicConfig(format='%(message)s')\n"
        "from pipeline.engine.device import precision\n"
        "cpu = torch.device('cpu')\n"
        "print(precision('auto', cpu).name, precision('bf16', cpu).name)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **AVX2_ONLY},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert proc.stdout.split() == ["fp32", "bf16"]
    warning = proc.stderr.strip().splitlines()
    assert len(warning) == 1 and "without native bf16" in warning[0]
    assert "slower than fp32" in warning[0]


def test_doctor_names_the_precision_and_why(tmp_path, monkeypatch, known_cpu):
    from conftest import tiny_params

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(json.dumps(tiny_params()))
    known_cpu({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "AVX512")  # Sapphire Rapids
    res = CliRunner().invoke(app, ["doctor", "--json", "-S", "train.amp=auto"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["commands"]["train"]["precision"] == "bf16"
    assert report["commands"]["train"]["why"] == "amp: auto; the CPU has amx_bf16 and avx512_bf16"
    assert report["commands"]["eval"]["precision"] == "fp32"  # tiny_params: amp off
    assert report["machine"]["cores"] == os.cpu_count()
    assert report["commands"]["train"]["compile"] is False  # auto: not on CPU
    # a real process held at AVX2, whatever this CPU has: fp32, and the trap of bf16 named
    auto = subprocess.run(
        [sys.executable, "-m", "stages.cli", "doctor", "--json", "-S", "train.amp=auto"],
        env={**os.environ, **AVX2_ONLY}, cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert auto.returncode == 0, auto.stderr
    train = json.loads(auto.stdout)["commands"]["train"]
    assert train["precision"] == "fp32"
    assert train["why"].startswith("amp: auto; fp32 on CPU: "), train["why"]
    res = subprocess.run(
        [sys.executable, "-m", "stages.cli", "doctor", "-S", "train.amp=bf16"],
        env={**os.environ, **AVX2_ONLY}, cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0
    out = " ".join(res.stderr.split())  # rich wraps lines
    assert "native bf16: no" in out and "train.amp: bf16 on a CPU without" in out


def test_doctor_warns_of_few_shards_and_small_shm(tmp_path, monkeypatch):
    from conftest import make_project

    from stages import doctor, steps

    proj = make_project(tmp_path / "p")  # 6 train frames, 4 per shard: 2 shards
    monkeypatch.chdir(proj)
    p = steps.load("params.yaml", ["train.workers=2"])
    report = doctor.diagnose(p, gpus=2)
    assert report["shards"] == {"train": "data/shards/train", "count": 2, "consumers": 4}
    assert any("2 shard(s) for 4 consumers" in w for w in report["warnings"])
    # 2 workers x 4 batches x 1 image x 64x128 x 4 bytes = 256 KiB in flight
    assert report["shm"]["loaders_need_gib"] == round(2 * 4 * 1 * 64 * 128 * 4 / 2**30, 2)
    monkeypatch.setattr(
        doctor.shutil, "disk_usage", lambda _p: type("U", (), {"total": 1, "free": 1})()
    )
    report = doctor.diagnose(p, gpus=2)
    assert any("/dev/shm" in w and "bus error" in w for w in report["warnings"])


def test_doctor_warns_when_the_loader_will_set_the_pace(tmp_path):
    """On a GPU node: the cores left for loader workers x what one decodes per second (the
    measured per-core figure of the shards' codec), against what the GPUs train on."""
    from stages.doctor import LOADER_FPS_PER_CORE, gpu_step_rate, loader_pace

    assert LOADER_FPS_PER_CORE["zstd"] > 2 * LOADER_FPS_PER_CORE["png"]
    # one GPU at 200 img/s, 16 cores, 8 workers: PNG shards cannot feed it, zstd can
    png = loader_pace(16, 1, 8, "png", (1024, 2048), 200.0, "test")
    assert png["loader_cores"] == 8 and png["supply_frames_per_s"] < 200
    assert png["warning"].startswith("the loader will set the pace: 8 loader core(s) x ")
    assert "(png shards at 1024x2048)" in png["warning"] and "image_format: zstd" in png["warning"]
    assert loader_pace(16, 1, 8, "zstd", (1024, 2048), 200.0)["warning"] is None
    # 8 GPUs on 16 cores: 8 cores left for the loaders, whatever train.workers says
    assert loader_pace(16, 8, 12, "zstd", (1024, 2048), 200.0)["loader_cores"] == 8
    # smaller frames decode faster in proportion
    small = loader_pace(16, 1, 8, "png", (512, 1024), 200.0)
    assert small["frames_per_s_per_core"] == 4 * png["frames_per_s_per_core"]
    # gpu_check's figure where it ran on this node, else the H100 figure
    step = tmp_path / "step.json"
    step.write_text(json.dumps({"rows": [{"name": "plain fp32 eager", "images_per_s": 50.0},
                                         {"name": "ours (bf16)", "images_per_s": 321.0}]}))  # fmt: skip
    assert gpu_step_rate(step)[0] == 321.0
    assert gpu_step_rate(tmp_path / "none.json")[0] == 200.0


# ----------------------------------------------------------------------------- OHEM threshold


def test_ohem_threshold_methods_agree():
    """kthvalue (CPU), sort (CUDA) and topk give the same k-th smallest, ties included."""
    g = torch.Generator().manual_seed(0)
    for n, k in ((1000, 1), (1000, 1000), (4096, 100), (5000, 2500)):
        x = torch.rand(n, generator=g)
        x[::7] = 1.0  # ignored pixels count as probability 1 (ties)
        x[::11] = x[3]  # more ties
        want = x.sort().values[k - 1]
        for method in ("kthvalue", "sort", "topk", None):
            assert kth_smallest(x, k, method) == want, (n, k, method)


# ----------------------------------------------------------------------------- shard reads


def _count_member_reads(monkeypatch) -> list:
    """Names of the tar members whose bytes are read (extractfile), in order."""
    reads = []
    original = tarfile.TarFile.extractfile

    def counting(self, member):
        reads.append(member.name if isinstance(member, tarfile.TarInfo) else member)
        return original(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", counting)
    return reads


def test_no_consumer_reads_samples_it_does_not_keep(tmp_path, monkeypatch):
    """1 shard of 12 frames, 4 ranks: each reads its own 3 samples' members and no others',
    and its first 3 samples are 3 distinct frames (a pass shorter than the shuffle buffer is
    shuffled whole, not through a buffer of repeats)."""
    root = tmp_path / "cs"
    for i in range(12):
        write_frame(root, "train", "alpha", i, h=16, w=32)
    write_shards(root, "train", tmp_path / "s", samples_per_shard=12)
    reads = _count_member_reads(monkeypatch)
    kept = []
    for rank in range(4):
        reads.clear()
        it = iter(TrainStream(tmp_path / "s", seed=0, rank=rank, world_size=4))
        first = [next(it)["key"] for _ in range(3)]
        # its share: every 4th sample in shard order (the assignment as before the fix)
        share = {f"alpha_{i:06d}_000019" for i in range(rank, 12, 4)}
        assert set(first) == share, first  # 3 distinct frames, not repeats
        read_keys = {name.split(".")[0] for name in reads}
        assert read_keys == share, f"rank {rank} read {sorted(read_keys - share)} too"
        kept.append(set(first))
    assert set.union(*kept) == {f"alpha_{i:06d}_000019" for i in range(12)}


def test_a_consumer_without_samples_is_an_error_not_a_hang(tmp_path):
    from pipeline.errors import DataError

    root = tmp_path / "cs"
    for i in range(2):
        write_frame(root, "train", "alpha", i, h=16, w=32)
    write_shards(root, "train", tmp_path / "s", samples_per_shard=2)
    with pytest.raises(DataError, match="fewer samples than consumers"):
        next(iter(TrainStream(tmp_path / "s", rank=3, world_size=4)))


# ----------------------------------------------------------------------------- resume layouts


def test_cpu_checkpoint_resumes_under_the_fused_optimizers_layout_rules():
    """Momentum buffers saved from NCHW parameters (a CPU run), loaded for channels-last
    parameters (CUDA): the fused kernel needs both alike (CUDA rejects a mismatch, the CPU
    kernel silently computes garbage); resumed, a fused step equals the foreach step."""
    from pipeline.engine.train import _restore_optimizer

    torch.manual_seed(0)
    w, g = torch.randn(8, 4, 3, 3), torch.randn(8, 4, 3, 3)
    source = torch.nn.Parameter(w.clone())  # NCHW, as saved by a CPU run
    source.grad = g.clone()
    opt = torch.optim.SGD([source], lr=0.1, momentum=0.9)
    opt.step()
    ckpt = {"optimizer": opt.state_dict(), "scaler": {}}
    results = {}
    for fused in (True, False):
        p = torch.nn.Parameter(source.detach().clone().to(memory_format=torch.channels_last))
        p.grad = g.clone().to(memory_format=torch.channels_last)
        resumed = torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=fused)
        scaler = torch.amp.GradScaler("cpu", enabled=True)  # an fp16 run's scaler
        _restore_optimizer(resumed, scaler, ckpt, Path("last.pt"))  # empty scaler state: fresh
        buf = resumed.state[p]["momentum_buffer"]
        assert buf.stride() == p.stride()
        resumed.step()
        results[fused] = p.detach().clone()
    assert torch.allclose(results[True], results[False], atol=1e-6)


def test_one_image_per_gpu_is_accepted_with_sync_bn():
    from pipeline.engine.train import _local_batch
    from pipeline.params import TrainParams

    tp = TrainParams(batch_size=8)
    assert _local_batch(tp, 8, sync_bn=True) == 1  # the recipe's batch 8 on 8 GPUs
    with pytest.raises(ConfigError, match=">= 2 per process"):
        _local_batch(tp, 8, sync_bn=False)  # plain BN: one value per channel in ASPP pooling
    with pytest.raises(ConfigError):
        _local_batch(TrainParams(batch_size=1), 1, sync_bn=True)


def test_validation_runs_without_cudnn_autotuning(tmp_path, monkeypatch):
    """In-training validation turns cuDNN's autotuner off (every VOC frame size would tune
    again) and back on for training."""
    from pipeline.engine import train as train_mod

    seen = []

    def fake_evaluate(*args, **kwargs):
        seen.append(torch.backends.cudnn.benchmark)
        return {"miou": 0.0}, None

    monkeypatch.setattr(train_mod, "evaluate", fake_evaluate)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    train_mod._validate(torch.nn.Linear(1, 1), None, None, CPU, None, 1, 0)
    assert seen == [False] and torch.backends.cudnn.benchmark is True


def test_metrics_carry_the_resolved_working_point(trained_project, tmp_path, monkeypatch):
    from stages import steps

    monkeypatch.chdir(trained_project)
    p = steps.load("params.yaml", ["evaluate.amp=auto"])
    metrics = steps.evaluate(p, out=tmp_path / "eval")
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())["provenance"]
    point = saved["working_point"]
    expected = dev.precision("auto", CPU)
    assert point["precision"] == expected.name and point["precision_why"] == expected.why
    assert point["device"] == "cpu" and point["torch"] == torch.__version__
    assert point["cpu"]["native_bf16"] == dev.cpu_info()["native_bf16"]
    train_point = saved["train_working_point"]  # from the checkpoint: tiny_params has amp off
    assert train_point["precision"] == "fp32" and train_point["compile"] is False
    assert metrics["miou"] == json.loads((tmp_path / "eval" / "metrics.json").read_text())["miou"]
    summary = json.loads((trained_project / "outputs/train/summary.json").read_text())
    assert summary["working_point"]["precision"] == "fp32"
    assert np.isfinite(metrics["miou"])

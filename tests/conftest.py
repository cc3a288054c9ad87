"""Shared fixtures: small real PNG files in the Cityscapes layout."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from servers import prefect_server  # noqa: F401  (one Prefect server per pytest run)

# The real data beside the checkout (../shared/data); tests that read it skip without it.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SAMPLE_ROOT = SHARED_DATA / "cityscapes_sample"
needs_sample = pytest.mark.skipif(
    not SAMPLE_ROOT.is_dir(), reason=f"the real Cityscapes frame is not at {SAMPLE_ROOT}"
)

# Prefect must never touch the user's ~/.prefect from tests (a folder of the session's own).
if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], True)
# A flow run in a test without PREFECT_API_URL starts Prefect's ephemeral server on a new
# database: 30-37 s on a busy 2-core machine, and Prefect waits 20 s by default; 120 s as
# `seg flow` gives it (stages.deployments.EPHEMERAL_STARTUP_S). Set before prefect is imported.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry from tests

# label ids used by `write_frame`: road 7, sidewalk 8, building 11, sky 23, car 26, ego vehicle 1
BLOCK_IDS = (23, 11, 8, 7, 26, 1)


def write_frame(
    root: Path, split: str, city: str, idx: int, h: int = 32, w: int = 64, seed: int = 0
) -> str:
    """One Cityscapes-layout frame: horizontal bands of label ids, an image coloured by them."""
    rng = np.random.default_rng([seed, idx])
    key = f"{city}_{idx:06d}_000019"
    bands = np.sort(rng.choice(np.arange(1, h), size=len(BLOCK_IDS) - 1, replace=False))
    label = np.zeros((h, w), np.uint8)
    for lid, (a, b) in zip(BLOCK_IDS, zip([0, *bands], [*bands, h], strict=True), strict=True):
        label[a:b] = lid
    inst = label.astype(np.uint16)
    inst[label == 26] = 26 * 1000 + idx % 3
    colors = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    image = colors[label]
    img_dir = root / "leftImg8bit" / split / city
    gt_dir = root / "gtFine" / split / city
    img_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(img_dir / f"{key}_leftImg8bit.png")
    Image.fromarray(label).save(gt_dir / f"{key}_gtFine_labelIds.png")
    Image.fromarray(inst).save(gt_dir / f"{key}_gtFine_instanceIds.png")
    return key


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    """A Cityscapes root with 6 train and 3 val frames of 32x64."""
    root = tmp_path / "cityscapes"
    for i in range(6):
        write_frame(root, "train", "alpha" if i < 3 else "beta", i)
    for i in range(3):
        write_frame(root, "val", "gamma", 100 + i)
    return root


def tiny_params(**overrides) -> dict:
    """The repo's params.yaml shrunk to seconds: 64x128 synthetic frames, a few steps."""
    import yaml

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["synth"].update(train=6, val=2, height=64, width=128)
    raw["preprocess"].update(workers=1, samples_per_shard=4)
    raw["train"].update(
        iterations=4, batch_size=2, crop_size=[64, 64], val_interval=2, checkpoint_interval=2,
        workers=0, device="cpu", warmup_iters=0, log_every=1, amp="off",
    )  # fmt: skip
    # fp32 whatever params.yaml's `auto` resolves to here: every test runs the precision it
    # means to test (bf16 autocast is 10-100x slower than fp32 on an AVX2-only CPU)
    raw["evaluate"].update(batch_size=2, device="cpu", workers=0, amp="off")
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        raw[section][name] = value
    return raw


def make_project(path: Path, **overrides) -> Path:
    """A working directory with params.yaml, synthetic data and its shards."""
    import yaml

    from stages import steps

    path.mkdir(parents=True, exist_ok=True)
    (path / "params.yaml").write_text(yaml.safe_dump(tiny_params(**overrides)))
    cwd = os.getcwd()
    os.chdir(path)
    try:
        p = steps.load("params.yaml")
        s, pre = p.synth, p.preprocess
        steps.synth(s.out, {"train": s.train, "val": s.val}, s.height, s.width, s.seed, 1)
        for split in ("train", "val"):
            steps.preprocess(
                p.data.root, split, steps.shard_dir(p, split), p.data.dataset,
                pre.samples_per_shard, pre.image_format, workers=1,
            )  # fmt: skip
    finally:
        os.chdir(cwd)
    return path


# Long enough to learn the tiny synthetic scenes: 300 steps of batch 4 on 64x64 crops in fp32
# reach 23.3 % best val mIoU with params.yaml's demo model and lr (150 steps: 11.7 %, 200:
# 20.6 % in 15.8 s with the data, 2 cores, AVX2 kernels; 4 steps: 3-5 %). Tests that
# must show a model learned assert LEARNED_MIOU, which such a run clears with margin. 16 val
# frames (the demo has 64): on 4 frames of 64x128 a few pixels of a rare class move the mIoU by
# tenths of a point (bf16 vs fp32 measured 0.30 apart there, 0.02 on 16 frames).
LEARN = {
    "synth.val": 16, "train.iterations": 300, "train.batch_size": 4, "train.val_interval": 100,
    "train.checkpoint_interval": 300, "train.log_every": 100,
}  # fmt: skip
LEARNED_MIOU = 0.15


def _trained(path: Path) -> Path:
    """`steps.train` in the project at `path`, with its params.yaml."""
    from stages import steps

    cwd = os.getcwd()
    os.chdir(path)
    try:
        steps.train(steps.load("params.yaml"))
    finally:
        os.chdir(cwd)
    return path


@pytest.fixture(scope="module")
def scratch(request, tmp_path_factory) -> Iterator[Callable[[str], Path]]:
    """`scratch(name)`: a new folder for a module's fixtures, removed when the module ends if no
    test has failed so far (as pytest's `tmp_path_retention_policy = "failed"` does for a
    passed test's tmp_path). Without it a module's projects, shards and checkpoints stayed on
    disk to the end of the session: 7.2 GB for `make test` alone, and CI's disk filled up."""
    made: list[Path] = []

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    if request.session.testsfailed == 0:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def learned_project(tmp_path_factory) -> Path:
    """A tiny project trained for 300 steps (LEARN; shared, read-only: copy before changing)."""
    return _trained(make_project(tmp_path_factory.mktemp("learned"), **LEARN))


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory) -> Path:
    """A tiny project trained for 4 steps (shared, read-only for tests: copy before changing)."""
    return _trained(make_project(tmp_path_factory.mktemp("proj")))


def pytest_terminal_summary(terminalreporter, config) -> None:
    """What tests/test_docs.py ran and skipped, by name, at the end of every run that ran it
    (not only under `pytest -s`): a skipped docs block is never silent."""
    for line in getattr(config, "docs_report", []):
        terminalreporter.write_line(line)

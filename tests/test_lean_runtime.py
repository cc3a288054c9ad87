"""A GPU node's lean runtime: `seg train`, `seg eval` and `seg predict` run where only the core
dependencies are installed (torch, torchvision, numpy, pillow, pyarrow, webdataset, typer,
rich, pyyaml). The orchestration extra (DVC, DVCLive, Prefect, cityscapesscripts) and
matplotlib are made unimportable in the subprocess; training then logs to a plain file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import make_project

ABSENT = ("dvc", "dvclive", "prefect", "cityscapesscripts", "matplotlib", "fastapi", "sqlalchemy")

LAUNCHER = f"""
import sys
from importlib.abc import MetaPathFinder

class Absent(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (lean runtime test)")
        return None

sys.meta_path.insert(0, Absent())
from stages.cli import app
sys.argv[0] = "seg"
app()
"""


def _seg(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"seg {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_train_eval_predict_without_the_orchestration_extra(tmp_path):
    proj = make_project(tmp_path / "p")
    _seg(proj, "train")
    log = [
        json.loads(line)
        for line in (proj / "outputs/train/train_log.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in log if "train/loss" in r] == [1, 2, 3, 4]
    assert any("val/miou" in r for r in log)
    assert not (proj / "outputs/train/dvclive").exists()
    _seg(proj, "eval")
    metrics = json.loads((proj / "outputs/eval/metrics.json").read_text())
    assert len(metrics["per_class_iou"]) == 19 and (proj / "outputs/eval/confusion.png").is_file()
    images = proj / "data/synthetic/leftImg8bit/val"
    _seg(proj, "predict", str(images), "--checkpoint", "outputs/train/best.pt", "--out", "pred")
    assert len(list((proj / "pred").glob("*_labelIds.png"))) == 2

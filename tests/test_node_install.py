"""`make node` on a GPU node keeps the node's torch: a real throwaway venv with an older torch
(a wheel from pip's find-links folder; 2.13.0+cpu on this project's machines) and pip's real
resolver against the package index (`--dry-run --report`: what pip would install).

Without the constraint `make node` passes, pip takes the newest torchvision, which needs the
newest torch, and would replace the node's torch with it and a CUDA stack (measured:
benchmarks/results/2026-12-06-cpu-node-install.md); this test checks the install line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _older_torch_wheel() -> Path | None:
    """A torch wheel for this Python, older than the installed torch, in pip's find-links."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    mine = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    links = os.environ.get("PIP_FIND_LINKS", "") + " /opt/wheels"
    for folder in links.split():
        for wheel in sorted(Path(folder).glob(f"torch-*-{tag}-{tag}-*linux*x86_64.whl")):
            version = tuple(int(x) for x in re.findall(r"\d+", wheel.name.split("-")[1])[:2])
            if version < mine:
                return wheel
    return None


WHEEL = _older_torch_wheel()


@pytest.mark.slow  # a venv, a torch wheel, pip resolving against the index: `make test-slow`
@pytest.mark.skipif(
    WHEEL is None, reason="no torch wheel older than the installed one in find-links"
)
def test_make_node_keeps_the_node_torch(tmp_path):
    node = tmp_path / "node"
    subprocess.run([sys.executable, "-m", "venv", str(node)], check=True)
    py = node / "bin" / "python"
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile", str(WHEEL)],
        check=True,
    )
    torch_version = WHEEL.name.split("-")[1]  # e.g. 2.13.0+cpu
    report = tmp_path / "report.json"
    done = subprocess.run(
        ["make", "-s", "node", f"PY={py}", f"NODE_PIP=-q --dry-run --report {report}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"keeping torch=={torch_version}" in done.stdout
    install = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in
               json.loads(report.read_text())["install"]}  # fmt: skip
    assert "torch" not in install, install
    assert not [name for name in install if name.startswith("nvidia-")], install
    # the torchvision made for that torch: 2.x pairs with 0.(x + 15)
    minor = int(torch_version.split(".")[1])
    assert install["torchvision"].startswith(f"0.{minor + 15}."), install["torchvision"]
    assert "deeplab-pipeline" in install and "s3fs" in install


def test_make_node_without_torch_says_so_in_one_line(tmp_path):
    node = tmp_path / "node"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(node)], check=True)
    done = subprocess.run(
        ["make", "-s", "node", f"PY={node / 'bin' / 'python'}"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert f"error: no torch in {node / 'bin' / 'python'}: install the node torch first" in (
        done.stderr
    )

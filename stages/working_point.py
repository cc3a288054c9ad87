"""The working point DVC sees: what the stages' `device` and `amp` (and train's `compile`,
`channels_last`) resolve to on this machine, in files the train and evaluate stages depend on.

DVC hashes files and params, not what `amp: auto` becomes: bf16 on a GPU or a CPU with native
bf16, fp32 on an AVX2-only CPU, fp16 with a GradScaler on a V100. Without this, `dvc status`
says "up to date" on a machine that would compute another result. The working_point stage
(`seg working-point`, always_changed in dvc.yaml) runs at every `dvc repro` and rewrites
{outputs}/working_point/train.json and evaluate.json only when the point changed; on another
kind of machine train and evaluate are then stale, and a fresh clone writes them anew.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.atomic import atomic_write
from pipeline.params import Params

STAGE = "working_point"


def folder(p: Params) -> Path:
    return Path(p.data.outputs) / "working_point"


def texts(p: Params) -> dict[str, str]:
    """File name -> its JSON text on this machine (engine/device.py decisive_point)."""
    from pipeline.engine.device import decisive_point

    t, e = p.train, p.evaluate
    points = {
        "train.json": decisive_point(t.device, t.amp, t.compile, t.channels_last),
        "evaluate.json": decisive_point(e.device, e.amp),
    }
    return {name: json.dumps(point, indent=2) + "\n" for name, point in points.items()}


def write(p: Params, root: Path | str = ".") -> dict[str, bool]:
    """Write the files that changed; file name -> whether it was rewritten."""
    out = Path(root) / folder(p)
    out.mkdir(parents=True, exist_ok=True)
    changed = {}
    for name, text in texts(p).items():
        path = out / name
        changed[name] = not path.is_file() or path.read_text(encoding="utf-8") != text
        if changed[name]:
            atomic_write(path, text)
    return changed


def is_current(root: Path | str, p: Params, recorded: list[tuple] | None) -> bool:
    """Would the stage change nothing? Its files hold this machine's point and are the
    ones dvc.lock records (`recorded`: (path, md5) of the stage's outputs there). A flow asks
    this in its own process before it starts `dvc repro` for the stage."""
    if not recorded:
        return False
    want = {str(folder(p) / name): text for name, text in texts(p).items()}
    for path, md5 in recorded:
        file = Path(root) / path
        if path not in want or not file.is_file():
            return False
        data = file.read_bytes()
        if data.decode("utf-8", "replace") != want[path] or hashlib.md5(data).hexdigest() != md5:
            return False
    return set(want) == {path for path, _ in recorded}

"""A training's callbacks: its curves to DVCLive (metrics and plots DVC understands), a sweep's
pruner asked at each validation, checkpoints pushed to the run store."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from stages.resume import RunStore

log = logging.getLogger("seg")


class TrainLog:
    """Training callbacks -> DVCLive (metrics and plots dvc understands) where it is installed,
    else a plain `train_log.jsonl` (a lean GPU node without the orchestration extra); plus an
    optional sink (the CLI's progress bar)."""

    def __init__(
        self, out: Path, resume: bool, sink=None, store: RunStore | None = None, trial=None
    ) -> None:
        self.sink, self.store, self.trial = sink, store, trial
        self.prune = False  # the sweep's pruner said stop at the last validation
        try:
            from dvclive import Live
        except ImportError:
            self.live, self.file = None, out / "train_log.jsonl"
            out.mkdir(parents=True, exist_ok=True)
            if not resume:
                self.file.unlink(missing_ok=True)
            log.info("dvclive is not installed: training curves go to %s", self.file)
            return
        from scmrepo.exceptions import SCMError

        try:
            self.live = Live(
                dir=str(out / "dvclive"), resume=resume, save_dvc_exp=False, dvcyaml=False
            )
        except SCMError as exc:  # DVCLive asks git for HEAD: "Empty git repo" before a commit
            raise ConfigError(
                f"{Path.cwd()}: git cannot name this repository's commit ({exc}): DVCLive logs "
                "training against one; commit first (git add -A && git commit -m init)"
            ) from None

    def _write(self, step: int, values: dict) -> None:
        if self.live is None:
            with open(self.file, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
            return
        self.live.step = step
        for name, value in values.items():
            self.live.log_metric(name, value)

    def on_step(self, info: dict) -> None:
        self._write(
            info["step"],
            {
                "train/loss": info["loss"],
                "train/lr": info["lr"],
                "train/images_per_s": info["images_per_s"],
            },
        )
        if self.sink:
            self.sink.on_step(info)

    def on_eval(self, step: int, metrics: dict) -> None:
        self._write(
            step, {"val/miou": metrics["miou"], "val/pixel_accuracy": metrics["pixel_accuracy"]}
        )
        if self.sink:
            self.sink.on_eval(step, metrics)
        if self.trial is not None:
            self.prune = self.trial.report(step, metrics["miou"])

    def should_stop(self) -> bool:
        return self.prune

    def mark_pruned(self, step: int) -> None:
        """The pruned mark in the training's metrics (DVCLive's metrics.json: `dvc exp show`
        shows it), or its log without DVCLive."""
        if self.live is not None:
            self.live.summary["pruned"] = step
            self.live.make_summary()
        else:
            self._write(step, {"pruned": step})

    def on_checkpoint(self, path: Path, step: int) -> None:
        if self.store is not None:
            self.store.push(path, step)

    def close(self) -> None:
        if self.live is not None:
            self.live.end()

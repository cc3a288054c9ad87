"""The pipeline's stages as Prefect flows: one flow per stage, and `pipeline` that runs them all.

A flow is the sequence of its steps and nothing more; the steps are the functions in
`stages.steps` (the same code `seg` and `dvc repro` run), wrapped as tasks. Tasks pass paths
and small values, never tensors. Retries only where I/O can fail, and never for a `SegError`
(a bad path or a wrong checkpoint does not fix itself). No Prefect result caching: DVC owns
caching, so every task has `cache_policy=NO_CACHE, persist_result=False`.

Without PREFECT_API_URL the flows run in Prefect's ephemeral mode (a throwaway local API);
with it, runs show up in the Prefect UI with their parameters, logs and artifacts.
Flow parameters are the params file and `section.key=value` overrides, read relative to the
working directory (the project root), like every other stage.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipeline.errors import ConfigError, SegError
from pipeline.params import Params
from stages import steps

_NO_CACHE = {"cache_policy": NO_CACHE, "persist_result": False}
# The library logs to "seg" (e.g. whether training resumes). With
# PREFECT_LOGGING_EXTRA_LOGGERS=seg (set by `seg flow`/`seg serve`) those records reach the run
# logs; INFO, because the root logger's WARNING would drop them.
logging.getLogger("seg").setLevel(logging.INFO)
IO_RETRIES = 2  # shards and PNGs live on disks and network mounts; a second read usually works


class ServerUnreachable(SegError):
    """PREFECT_API_URL is set, but no Prefect API answers there."""


def _retry_on_io(_task, _task_run, state) -> bool:
    """Retry an I/O failure (OSError); a user error (SegError) fails at once."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, OSError) and not isinstance(exc, SegError)


_IO = {"retries": IO_RETRIES, "retry_delay_seconds": 2, "retry_condition_fn": _retry_on_io}


# ----------------------------------------------------------------------------- server check


def check_server(timeout: float = 5.0) -> str | None:
    """The Prefect API URL when one is set and answers, None in ephemeral mode.

    Raises ServerUnreachable in one line before any work starts, instead of Prefect's retries
    and traceback once the first flow run is being created.
    """
    import httpx
    from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return None
    key = PREFECT_API_KEY.value()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    hint = "start one with `prefect server start --host 127.0.0.1`, or unset PREFECT_API_URL"
    try:
        r = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout, headers=headers)
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        raise ServerUnreachable(
            f"Prefect API at {url} is unreachable ({reason}): {hint} to run without a server"
        ) from None
    if r.status_code >= 400 and r.status_code not in (401, 403):
        raise ServerUnreachable(
            f"{url}/health answered HTTP {r.status_code}: not a Prefect API "
            "(PREFECT_API_URL usually ends in /api, e.g. http://127.0.0.1:4200/api)"
        )
    return url


# ----------------------------------------------------------------------------- tasks


@task(name="synthesize", **_IO, **_NO_CACHE)
def synthesize(p: Params) -> dict:
    summary = steps.synth(p)
    return {"root": summary["root"], "frames": summary["frames"], "classes": summary["classes"]}


@task(name="write-shards", task_run_name="write-shards-{split}", **_IO, **_NO_CACHE)
def write_shards(p: Params, split: str) -> dict:
    return steps.preprocess(p, split)


class LogSink:
    """Training callbacks -> Prefect run logs, every `every` steps (and the first and last)."""

    def __init__(self, logger, every: int) -> None:
        self.logger = logger
        self.every = max(1, every)

    def on_step(self, info: dict) -> None:
        step, total = info["step"], info["total"]
        if step == 1 or step % self.every == 0 or step == total:
            self.logger.info(
                "step %d/%d  loss %.4f  lr %.2e  %.1f img/s",
                step, total, info["loss"], info["lr"], info["images_per_s"],
            )  # fmt: skip

    def on_eval(self, step: int, metrics: dict) -> None:
        self.logger.info(
            "step %d: val mIoU %.2f  pixel acc %.2f",
            step, 100 * metrics["miou"], 100 * metrics["pixel_accuracy"],
        )  # fmt: skip


@task(name="train-model", retries=0, **_NO_CACHE)  # hours of compute: resume, don't retry
def train_model(p: Params, resume: bool, log_every: int) -> dict:
    return steps.train(
        p,
        resume=steps.Resume.AUTO if resume else steps.Resume.NEW,
        sink=LogSink(get_run_logger(), log_every),
    )


@task(name="train-model-torchrun", retries=0, **_NO_CACHE)
def train_model_torchrun(params: str, overrides: list[str] | None, resume: bool, gpus: int) -> dict:
    """The flow orchestrates, torch.distributed is the engine: `seg train` under torchrun with
    `gpus` processes on this node; rank 0 writes the checkpoints and summary.json."""
    import json

    from pipeline.errors import SegError
    from stages import launch

    p = steps.load(params, overrides)
    mode = steps.Resume.AUTO if resume else steps.Resume.NEW
    args = launch.train_args(params, overrides, mode)
    code = launch.launch(launch.Topology(gpus), args, p.train.device)
    if code != 0:
        raise SegError(f"torchrun training with {gpus} processes exited with code {code}")
    return json.loads((steps.train_dir(p) / "summary.json").read_text())


@task(name="evaluate-checkpoint", **_IO, **_NO_CACHE)
def evaluate_checkpoint(p: Params, checkpoint: str | None) -> str:
    """Score the checkpoint; returns the path of metrics.json (the metrics stay on disk)."""
    steps.evaluate(p, checkpoint)
    return str(steps.eval_dir(p) / "metrics.json")


@task(name="publish-metrics", **_NO_CACHE)
def publish_metrics(metrics_json: str) -> dict:
    """metrics.json -> a per-class IoU table and a markdown summary in the Prefect UI."""
    import json

    m = json.loads(Path(metrics_json).read_text())
    create_table_artifact(
        table=[
            {
                "class": name,
                "iou": _round(iou),
                "precision": _round(m["per_class_precision"].get(name)),
                "recall": _round(m["per_class_recall"].get(name)),
            }
            for name, iou in m["per_class_iou"].items()
        ],
        key="per-class-iou",
        description=f"Per-class IoU on the val shards (None: class absent); from {metrics_json}",
    )
    create_markdown_artifact(
        markdown=summary_markdown(m, metrics_json),
        key="evaluation-summary",
        description="mIoU, pixel accuracy and provenance of this evaluation",
    )
    return {"miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"], "metrics": metrics_json}


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def summary_markdown(m: dict, metrics_json: str) -> str:
    prov = m.get("provenance", {})
    git = prov.get("git") or {}
    data = prov.get("data") or {}
    ckpt = prov.get("checkpoint") or {}
    dirty = {True: " (dirty)", False: "", None: " (unknown)"}[git.get("dirty")]
    lines = [
        f"# Evaluation: mIoU {_pct(m['miou'])}",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| mIoU (%) | {_pct(m['miou'])} |",
        f"| pixel accuracy (%) | {_pct(m['pixel_accuracy'])} |",
        f"| mean accuracy (%) | {_pct(m.get('mean_accuracy'))} |",
        f"| images | {m.get('num_images', '-')} |",
        "",
        "## Provenance",
        "",
        f"- git revision: `{git.get('revision') or 'unknown'}`{dirty}",
        f"- params hash: `{prov.get('params_hash')}`",
        f"- train params hash: `{prov.get('train_params_hash')}`",
        f"- data: `{data.get('path')}` sha256 `{data.get('sha256')}`"
        + (f", dvc md5 `{data['dvc_md5']}`" if data.get("dvc_md5") else ""),
        f"- checkpoint: `{ckpt.get('path')}` (step {ckpt.get('step')}) sha256 `{ckpt.get('sha256')}`",
        f"- time: {prov.get('time')}",
        f"- metrics file: `{metrics_json}`",
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- flows


@flow(name="seg-synth", persist_result=False)
def synth_flow(params: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Write the synthetic Cityscapes-format scenes (synth.out)."""
    return synthesize(steps.load(params, overrides))


@flow(name="seg-preprocess", persist_result=False)
def preprocess_flow(
    params: str = "params.yaml",
    overrides: list[str] | None = None,
    splits: list[str] | None = None,
) -> list[dict]:
    """Convert the train and val splits of data.root into shards (or just `splits`)."""
    p = steps.load(params, overrides)
    return [write_shards(p, s) for s in splits or (p.data.train_split, p.data.val_split)]


@flow(name="seg-train", persist_result=False)
def train_flow(
    params: str = "params.yaml",
    overrides: list[str] | None = None,
    resume: bool = True,
    log_every: int = 50,
    gpus: int = 0,
) -> dict:
    """Train on the shards. `resume` continues an unfinished run of the same params only;
    `gpus` > 1 runs DDP under torchrun (one process per GPU; on CPU with train.device=cpu)."""
    if gpus > 1:
        return train_model_torchrun(params, overrides, resume, gpus)
    return train_model(steps.load(params, overrides), resume, log_every)


@flow(name="seg-evaluate", persist_result=False)
def evaluate_flow(
    params: str = "params.yaml",
    overrides: list[str] | None = None,
    checkpoint: str | None = None,
) -> dict:
    """Score a checkpoint (default outputs/train/best.pt) on the val shards; publish artifacts."""
    p = steps.load(params, overrides)
    return publish_metrics(evaluate_checkpoint(p, checkpoint))


@flow(name="seg-pipeline", persist_result=False)
def pipeline_flow(
    params: str = "params.yaml",
    overrides: list[str] | None = None,
    resume: bool = True,
    log_every: int = 50,
    gpus: int = 0,
) -> dict:
    """synth (when data.root is synth.out) -> preprocess train+val -> train -> evaluate."""
    p = steps.load(params, overrides)
    if Path(p.data.root) == Path(p.synth.out):
        synth_flow(params, overrides)
    preprocess_flow(params, overrides)
    train_flow(params, overrides, resume=resume, log_every=log_every, gpus=gpus)
    return evaluate_flow(params, overrides)


FLOWS = {
    "synth": synth_flow,
    "preprocess": preprocess_flow,
    "train": train_flow,
    "evaluate": evaluate_flow,
    "pipeline": pipeline_flow,
}


def deployment(
    name: str = "nightly",
    cron: str = "0 3 * * *",
    timezone: str | None = None,
    params: str = "params.yaml",
    overrides: list[str] | None = None,
):
    """The pipeline flow as a deployment on a cron schedule (what `seg serve` serves)."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.types.entrypoint import EntrypointType

    try:
        schedule = CronSchedule(cron=cron, timezone=timezone)  # validated: one-line errors
    except ValueError as exc:
        msg = exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc)  # pydantic's
        msg = msg.removeprefix("Value error, ")
        raise ConfigError(f"--cron {cron!r} --timezone {timezone!r}: {msg}") from None
    return pipeline_flow.to_deployment(
        name,
        schedules=[schedule],
        parameters={"params": params, "overrides": overrides or []},
        description="The whole pipeline (synth, preprocess, train, evaluate) on a schedule.",
        tags=["seg"],
        # `stages.flows:pipeline_flow` imports from the installed package in any project folder;
        # runs start in the serving process's working directory, where params.yaml is.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )

"""What a run shows in the Prefect UI: the stage table (`dvc-stages`), the per-class IoU
table and the evaluation summary (from metrics.json), and the run's own record (`run`)."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from stages import steps
from stages.dvc_stages import TASK_OPTS
from stages.progress import pct


@task(name="publish-metrics", **TASK_OPTS)
def publish_metrics(root: str, evaluated: bool) -> dict:
    """metrics.json -> a per-class IoU table and a markdown summary in the Prefect UI."""
    p = steps.load(Path(root) / "params.yaml")
    metrics_json = str(steps.eval_dir(p) / "metrics.json")
    m = json.loads((Path(root) / metrics_json).read_text())
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
    note = "evaluated in this run" if evaluated else "up to date: from an earlier run (dvc.lock)"
    create_markdown_artifact(
        markdown=summary_markdown(m, metrics_json, note),
        key="evaluation-summary",
        description="mIoU, pixel accuracy and provenance of the current evaluation",
    )
    return {"miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"], "metrics": metrics_json}


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


def summary_markdown(m: dict, metrics_json: str, note: str = "") -> str:
    prov = m.get("provenance", {})
    git = prov.get("git") or {}
    data = prov.get("data") or {}
    ckpt = prov.get("checkpoint") or {}
    dirty = {True: " (dirty)", False: "", None: " (unknown)"}[git.get("dirty")]
    lines = [
        f"# Evaluation: mIoU {pct(m['miou'])}",
        "",
        *([f"_{note}_", ""] if note else []),
        "| metric | value |",
        "| --- | --- |",
        f"| mIoU (%) | {pct(m['miou'])} |",
        f"| pixel accuracy (%) | {pct(m['pixel_accuracy'])} |",
        f"| mean accuracy (%) | {pct(m.get('mean_accuracy'))} |",
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


def stages_markdown(results: list[dict], planned: list[str], failed: str | None = None) -> str:
    """The run's stage table: what DVC ran, what was up to date, and why."""
    done = {r["stage"]: r for r in results}
    ran = sum(r["result"] != "up to date" for r in results)
    lines = [
        f"# DVC stages: {ran} ran, {len(results) - ran} up to date"
        + (f", failed at {failed}" if failed else ""),
        "",
        "| stage | result | why | seconds | notes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for stage in planned:
        r = done.get(stage)
        if r is not None:
            notes = "<br>".join(n.replace("|", "\\|") for n in r.get("notes") or []) or "-"
            lines.append(
                f"| {stage} | {r['result']} | {r['why'] or '-'} | {r['seconds']:.1f} | {notes} |"
            )
        else:
            lines.append(f"| {stage} | {'failed' if stage == failed else 'not run'} | - | - | - |")
    return "\n".join(lines) + "\n"


def run_markdown(run: dict, out: dict, setup_s: float, restore_s: float) -> str:
    """The run's own artifact: what it was and where its results went."""
    over = ", ".join(f"`{o}`" for o in run["overrides"]) or "none"
    miou = f"{pct(out['miou'])} %" if "miou" in out else "not evaluated (not a target)"
    lines = [
        f"# Run {run['name']}",
        "",
        "| | |",
        "| --- | --- |",
        f"| commit | `{run['commit']}` ({run['source']}) |",
        f"| overrides | {over} |",
        f"| targets | {', '.join(run['targets'] or []) or 'all'} |",
        f"| experiment | `{out.get('experiment')}` (`dvc exp show`, `dvc exp pull origin "
        f"{out.get('experiment')}`) |",
        f"| host | {run['host']} |",
        f"| mIoU | {miou} |",
        f"| stages that ran | {', '.join(_ran_names(out)) or 'none: all up to date'} |",
        f"| workspace | made in {setup_s:.1f} s, outputs restored in {restore_s:.1f} s |",
        f"| checkpoints | {run['checkpoints']} |",
    ]
    return "\n".join(lines) + "\n"


def _ran_names(out: dict) -> list[str]:
    return [s for s, r in out["stages"].items() if r != "up to date"]

"""A scheduled run's model, through the registry's gate (stages/registry.py): registered as a
new version of the model (its experiment's commit), compared with the stage's holder (a
paired bootstrap of ΔmIoU over the val frames), and promoted only when the interval's lower
bound is above `registry.min_gain`.

- promoted: the run completes, its stage tag on origin;
- not promoted: the run completes with the gate's line as its state message ("not
  promoted: ΔmIoU +0.4 [-0.3, +1.1] (min_gain 0.0) ...");
- a regression (the interval's upper bound below `-registry.max_drop`): the run fails with
  "regression: ...", and emits the event `seg.model.regression`, which the deployment's
  automation (`notify_on_regression`, made by `seg deploy --notify URL`) turns into one
  webhook call.

The comparison is the run's artifact `model-gate`: per-class Δ with its interval.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from pipeline.errors import SegError
from stages.dvc_stages import TASK_OPTS

REGRESSION_EVENT = "seg.model.regression"


class Regression(SegError):
    """The run's model is worse than the stage's holder by more than registry.max_drop."""


@task(name="promote-model", **TASK_OPTS)
def promote_model(root: str, experiment: str, stage: str, model: str = "deeplab") -> dict:
    """Register the run's experiment as a version of `model` and promote it to `stage` when
    the gate passes. Raises Regression (after emitting REGRESSION_EVENT) on a regression."""
    from prefect.events import emit_event

    from stages import gate, registry

    logger = get_run_logger()
    version = registry.register(root, model, rev=experiment, bump="patch")
    logger.info("registered %s (experiment %s)", version.ref, experiment)
    out = gate.promote(root, model, version.version, stage)
    for note in out.notes:
        logger.info("%s", note)
    create_markdown_artifact(
        markdown=gate_markdown(out), key="model-gate",
        description=f"{version.ref} against {stage}'s holder: ΔmIoU and each class's Δ",
    )  # fmt: skip
    result = {"version": version.ref, "stage": stage, "promoted": out.tag is not None,
              "line": out.line, "tag": out.tag}  # fmt: skip
    if out.regression:
        emit_event(
            event=REGRESSION_EVENT,
            resource={"prefect.resource.id": f"seg.model.{model}", "prefect.resource.name": model},
            payload={"line": out.line, "version": version.ref, "stage": stage},
        )  # fmt: skip
        raise Regression(out.line)
    logger.info("%s", out.line)
    if out.tag:
        logger.info("%s holds %s now (tag %s, on origin where there is one)", version.ref, stage,
                    out.tag)  # fmt: skip
    return result


def gate_markdown(out) -> str:
    """The gate's decision and per-class Δ (mIoU points) with their intervals."""
    lines = [f"# {out.candidate.ref} -> {out.stage}", "", f"**{out.line}**", ""]
    comp = out.comparison.to_dict() if out.comparison is not None else None
    if comp:
        lines += ["| class | Δ IoU (points) | interval |", "| --- | --- | --- |"]
        for row in comp.get("per_class", []):
            d = row["delta"]
            value, lo, hi = d.get("value"), d.get("lo"), d.get("hi")
            fmt = "-" if value is None else f"{100 * value:+.2f}"
            span = "-" if lo is None or hi is None else f"[{100 * lo:+.2f}, {100 * hi:+.2f}]"
            lines.append(f"| {row['class']} | {fmt} | {span} |")
        plot = delta_png(comp.get("per_class", []))
        if plot:
            lines += ["", "Each class's Δ IoU with its interval (points):", "",
                      f"![per-class delta]({plot})"]  # fmt: skip
    return "\n".join(lines) + "\n"


def delta_png(per_class: list[dict]) -> str | None:
    """Each class's Δ IoU as a point on its interval, a zero line through them (a forest plot),
    as a PNG data URI (PIL only); None when no class has an interval."""
    import base64
    import io

    from PIL import Image, ImageDraw

    rows = [(r["class"], r["delta"]) for r in per_class
            if r["delta"].get("lo") is not None and r["delta"].get("hi") is not None]  # fmt: skip
    if not rows:
        return None
    span = max(max(abs(d["lo"]), abs(d["hi"])) for _, d in rows) or 0.01
    w, row_h, left, right = 520, 18, 130, 20
    h = 30 + row_h * len(rows)
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)

    def x(v: float) -> float:
        return left + (w - left - right) * (v + span) / (2 * span)

    draw.line([(x(0), 4), (x(0), h - 24)], fill="#999999")
    for i, (name, d) in enumerate(rows):
        y = 10 + i * row_h + row_h / 2
        colour = (0, 110, 50) if d["lo"] > 0 else (170, 30, 30) if d["hi"] < 0 else (8, 48, 107)
        draw.text((4, y - 6), str(name)[:18], fill="black")
        draw.line([(x(d["lo"]), y), (x(d["hi"]), y)], fill=colour, width=2)
        if d.get("value") is not None:
            cx = x(d["value"])
            draw.ellipse([cx - 3, y - 3, cx + 3, y + 3], fill=colour)
    draw.text((left, h - 18), f"{-100 * span:+.1f}", fill="black")
    draw.text((w - right - 40, h - 18), f"{100 * span:+.1f}", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def notify_on_regression(deployment_id, deployment_name: str, url: str) -> str:
    """A webhook notification block for `url` and the automation that sends it once per
    REGRESSION_EVENT of this deployment's runs (made or replaced). Returns its name."""
    from prefect.automations import AutomationCore, EventTrigger, Posture, SendNotification
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.events import ResourceSpecification

    from stages.deployments import api_display

    slug = "".join(c if c.isalnum() else "-" for c in deployment_name.lower()).strip("-")
    block = CustomWebhookNotificationBlock(
        name=f"{deployment_name} model regression", url=url, method="POST",
        json_data={"text": "{{subject}}: {{body}}", "deployment": deployment_name},
    )  # fmt: skip
    block_id = block.save(f"seg-{slug}-regression", overwrite=True)
    name = f"{deployment_name}: notify a model regression"
    automation = AutomationCore(
        name=name,
        description=f"A run of {deployment_name} whose model regressed: one call to "
        f"{api_display(url)} (made by `seg deploy --notify`)",
        trigger=EventTrigger(
            expect={REGRESSION_EVENT},
            match_related=ResourceSpecification(
                {
                    "prefect.resource.role": "deployment",
                    "prefect.resource.id": [f"prefect.deployment.{deployment_id}"],
                }
            ),
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[
            SendNotification(
                block_document_id=block_id,
                subject=f"{deployment_name}: model regression",
                body="{{ event.payload.line }}",
            )
        ],
    )
    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(name):
            client.delete_automation(old.id)
        client.create_automation(automation)
    return name

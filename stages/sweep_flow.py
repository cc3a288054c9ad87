"""A sweep as a Prefect flow run: it hands out trials (Optuna asks), runs each as a run of the
pipeline (on the pool's workers, or one after another here with `--local`), and keeps going
until its budget is spent, whatever happens to a trial, a worker or itself.

- A trial is a pipeline run (stages/flows.py) at the sweep's pinned commit with the trial's
  overrides: a workspace of its own, an experiment named after its flow run, its checkpoints
  pushed while it trains. Its training reports val mIoU to the study at each validation and
  stops when the pruner says so (stages/sweep.py TrialLink); the run then tells the study
  the trial's end: its mIoU, or pruned (`finish_trial`).
- A trial whose run Crashed (its worker or machine died: Prefect does not retry those) is
  submitted again with the same overrides: the new run resumes from the checkpoint the dead
  one pushed. A run that Failed ends its trial as failed.
- The sweep's state is the study (Optuna's storage) and the trials' flow run ids in it: a
  sweep killed and started again under the same name keeps its finished trials, takes over
  the running ones, and trains none twice.
- Budget: `trials` in all (finished, pruned, failed), `timeout` seconds of this sweep run; at
  the budget no trial is handed out and the running ones finish.
- The table artifact `sweep-NAME` (trials ranked by val mIoU) is written as trials end, with
  the best mIoU so far against trials as a picture.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from pipeline.errors import ConfigError
from stages import sweep

POLL_S = 5.0  # how often a sweep on the pool looks at its trials


def study_of(name: str, storage_url: str, settings: sweep.Settings | None = None):
    """The sweep's Optuna study: created with `settings` (kept in its user attributes) or, when
    it exists, loaded; a rerun with another search space or sampler is refused in one line."""
    import optuna

    space = sweep.Space.from_dict(settings.space) if settings else None
    store = sweep.storage(storage_url)
    try:
        study = optuna.load_study(study_name=name, storage=store)
    except KeyError:
        if settings is None:
            raise ConfigError(f"no sweep named {name!r} in {storage_url}") from None
        study = optuna.create_study(study_name=name, storage=store, direction="maximize")
        study.set_user_attr("settings", _settings_json(settings))
        return _with_sampler(study, settings, space)
    kept = sweep.Settings(**json.loads(study.user_attrs["settings"]))
    if settings is not None:
        differ = [
            k for k in ("space", "sampler", "prune")
            if json.dumps(getattr(kept, k), sort_keys=True)
            != json.dumps(getattr(settings, k), sort_keys=True)
        ]  # fmt: skip
        if differ:
            raise ConfigError(
                f"sweep {name!r} exists with another {', '.join(differ)}: continue it with the "
                "same -S / --sampler / --prune, or give this one another name"
            )
    return _with_sampler(study, kept, sweep.Space.from_dict(kept.space))


def _settings_json(settings: sweep.Settings) -> str:
    from dataclasses import asdict

    return json.dumps(asdict(settings))


def _with_sampler(study, settings: sweep.Settings, space: sweep.Space):
    import optuna

    return optuna.load_study(
        study_name=study.study_name, storage=study._storage,
        sampler=sweep.sampler(settings.sampler, space, settings.seed),
        pruner=sweep.pruner(settings.prune),
    )  # fmt: skip


def settings_of(study) -> sweep.Settings:
    return sweep.Settings(**json.loads(study.user_attrs["settings"]))


# ----------------------------------------------------------------------------- a trial's end


def finish_trial(link: sweep.TrialLink, out: dict) -> str:
    """Tell the study how a trial's run ended (called by the run itself, at its end): its val
    mIoU (k-fold mean when folds are on), or pruned. Records the experiment, host and the
    run's minutes. Returns the state told."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=link.study, storage=sweep.storage(link.storage))
    store = study._storage
    for key in ("experiment", "host"):
        value = out.get(key) or (out.get("run") or {}).get(key)
        if value is not None:
            store.set_trial_user_attr(link.trial_id, key, value)
    if out.get("pruned") is not None:
        store.set_trial_user_attr(link.trial_id, "pruned_at", out["pruned"])
        study.tell(link.number, state=TrialState.PRUNED)
        return "pruned"
    value = out.get("miou")
    if out.get("kfold") is not None:
        store.set_trial_user_attr(link.trial_id, "kfold", out["kfold"])
        value = out["kfold"]["mean"]
    if value is None:
        study.tell(link.number, state=TrialState.FAIL)
        return "failed (no val mIoU: the run did not evaluate)"
    study.tell(link.number, float(value))
    return f"complete, val mIoU {100 * value:.2f}"


# ----------------------------------------------------------------------------- the flow


@flow(name="seg-sweep", persist_result=False)
def sweep_flow(
    name: str,
    storage: str,
    settings: dict | None = None,
    parallel: int = 1,
    deployment: str | None = None,
    local: bool = False,
    log_every: int = 50,
) -> dict:
    """Run sweep `name` to its budget: trials on `deployment` (`seg-pipeline/...`, on a work
    pool) at most `parallel` at once, or here one after another (`local`)."""
    logger = get_run_logger()
    study = study_of(name, storage, sweep.Settings(**settings) if settings else None)
    s = settings_of(study)
    space = sweep.Space.from_dict(s.space)
    t0 = time.monotonic()
    logger.info(
        "sweep %s: %s, %d trials, pruning %s, at commit %s, %s", name, s.sampler, s.trials,
        s.prune, s.commit[:12], "here, one at a time" if local else
        f"on {deployment}, {parallel} at once",
    )  # fmt: skip
    runner = _Local(name, storage, s, log_every) if local else _Pool(deployment, name, storage, s)
    runner.take_over(study, logger)
    while True:
        for number, outcome in runner.ended(study):
            logger.info("trial %d: %s", number, outcome)
            publish(study)
        over = s.timeout is not None and time.monotonic() - t0 >= s.timeout
        asked = len(study.trials)
        while not over and asked < s.trials and runner.running() < max(1, parallel):
            trial = study.ask(space.distributions())
            overrides = space.overrides(trial.params)
            trial.set_user_attr("overrides", overrides)
            logger.info("trial %d: %s", trial.number, " ".join(overrides))
            runner.submit(study, trial.number, trial._trial_id, overrides)
            asked += 1
        if runner.running() == 0:
            break
        runner.wait()
    publish(study)
    best = best_trial(study)
    return {"trials": len(study.trials), "best": best and {"number": best.number,
            "miou": best.value, "overrides": best.user_attrs.get("overrides")}}  # fmt: skip


class _Pool:
    """Trials as runs of the trials' deployment on the work pool."""

    def __init__(self, deployment: str | None, name: str, storage: str, s: sweep.Settings):
        if not deployment:
            raise ConfigError("a sweep on a pool needs its trials' deployment")
        self.deployment, self.name, self.storage, self.s = deployment, name, storage, s
        self.flying: dict[int, str] = {}  # trial number -> flow run id

    def _client(self):
        from prefect.client.orchestration import get_client

        return get_client(sync_client=True)

    def submit(self, study, number: int, trial_id: int, overrides: list[str]) -> None:
        link = self._link(study, number, trial_id, overrides)
        with self._client() as client:
            d = client.read_deployment_by_name(self.deployment)
            run = client.create_flow_run_from_deployment(
                d.id, parameters={"overrides": overrides, "commit": self.s.commit,
                                  "trial": json.loads(link.to_env()[link.ENV])},
                tags=["seg-sweep", f"sweep:{self.name}", f"trial:{number}"],
            )  # fmt: skip
        study._storage.set_trial_user_attr(trial_id, "flow_run_id", str(run.id))
        runs = study._storage.get_trial(trial_id).user_attrs.get("flow_runs", [])
        study._storage.set_trial_user_attr(trial_id, "flow_runs", [*runs, str(run.id)])
        self.flying[number] = str(run.id)

    def _link(self, study, number, trial_id, overrides) -> sweep.TrialLink:
        return _link(self.storage, self.name, number, trial_id, overrides, self.s)

    def take_over(self, study, logger) -> None:
        """Trials a killed sweep left running: watched again, or resubmitted when their run
        is gone."""
        from optuna.trial import TrialState

        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            run_id = t.user_attrs.get("flow_run_id")
            if run_id:
                self.flying[t.number] = run_id
                logger.info("trial %d: taken over (flow run %s)", t.number, run_id)
            else:  # asked, never submitted: the sweep died in between
                self.submit(study, t.number, t._trial_id, t.user_attrs.get("overrides", []))

    def running(self) -> int:
        return len(self.flying)

    def wait(self) -> None:
        time.sleep(POLL_S)

    def ended(self, study):
        """(number, what happened) of the trials whose runs ended since the last look; a run
        that Crashed is submitted again (it resumes from its pushed checkpoint)."""
        from optuna.trial import TrialState

        with self._client() as client:
            states = {n: client.read_flow_run(rid).state for n, rid in self.flying.items()}
        for number, state in states.items():
            if state is None or not state.is_final():
                continue
            del self.flying[number]
            trial = study.trials[number]
            if trial.state != TrialState.RUNNING:  # its run told the study
                yield number, _told(trial)
            elif state.is_crashed():
                yield number, f"its run crashed ({state.message}): submitted again, to resume"
                self.submit(study, number, trial._trial_id, trial.user_attrs["overrides"])
            else:
                study.tell(number, state=TrialState.FAIL)
                yield number, f"failed: its run ended {state.name} ({state.message})"


class _Local:
    """Trials here, one after another, as subflows (`seg sweep --local`: no server needed)."""

    def __init__(self, name: str, storage: str, s: sweep.Settings, log_every: int):
        self.name, self.storage, self.s, self.log_every = name, storage, s, log_every
        self.done: list[tuple[int, str]] = []

    def submit(self, study, number: int, trial_id: int, overrides: list[str]) -> None:
        from optuna.trial import TrialState

        from stages.flows import pipeline_flow

        link = _link(self.storage, self.name, number, trial_id, overrides, self.s)
        try:
            pipeline_flow(
                overrides=overrides, commit=self.s.commit, workspace=True,
                trial=json.loads(link.to_env()[link.ENV]), log_every=self.log_every,
            )  # fmt: skip
        except Exception as exc:  # the trial failed; the sweep goes on
            if study.trials[number].state == TrialState.RUNNING:
                study.tell(number, state=TrialState.FAIL)
            self.done.append((number, f"failed: {str(exc).splitlines()[0][:200]}"))
            return
        self.done.append((number, _told(study.trials[number])))

    def take_over(self, study, logger) -> None:
        """A trial left running by a killed local sweep died with it: run it again (it
        resumes from its pushed checkpoint)."""
        from optuna.trial import TrialState

        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            logger.info("trial %d: its run died with the sweep: running it again", t.number)
            self.submit(study, t.number, t._trial_id, t.user_attrs.get("overrides", []))

    def running(self) -> int:
        return 0

    def wait(self) -> None:
        pass

    def ended(self, study):
        done, self.done = self.done, []
        yield from done


def _link(storage, name, number, trial_id, overrides, s: sweep.Settings) -> sweep.TrialLink:
    from stages import steps

    p = steps.load("params.yaml", overrides)
    return sweep.TrialLink(storage, name, trial_id, number, s.prune, p.train.iterations,
                           p.train.val_interval)  # fmt: skip


def _told(trial) -> str:
    value = f", val mIoU {100 * trial.value:.2f}" if trial.value is not None else ""
    return f"{trial.state.name.lower()}{value}"


# ----------------------------------------------------------------------------- results


def best_trial(study):
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(done, key=lambda t: t.value, default=None)


def table(study) -> list[dict]:
    """The trials, ranked: finished by val mIoU (best first), then running, pruned, failed."""
    from optuna.trial import TrialState

    order = {TrialState.COMPLETE: 0, TrialState.RUNNING: 1, TrialState.PRUNED: 2}
    rows = []
    for t in study.trials:
        end = t.datetime_complete
        minutes = (
            (end - t.datetime_start).total_seconds() / 60 if end and t.datetime_start else None
        )
        kfold = t.user_attrs.get("kfold") or {}
        last = max(t.intermediate_values.items(), default=(None, None))
        rows.append({
            "trial": t.number,
            "state": t.state.name.lower(),
            "val_miou": None if t.value is None else round(100 * t.value, 2),
            "std": None if "std" not in kfold else round(100 * kfold["std"], 2),
            "last_reported": None if last[1] is None else f"{100 * last[1]:.2f} at {last[0]}",
            "overrides": " ".join(o for o in t.user_attrs.get("overrides", [])),
            "experiment": t.user_attrs.get("experiment"),
            "host": t.user_attrs.get("host"),
            "minutes": None if minutes is None else round(minutes, 1),
            "_rank": (order.get(t.state, 3), -(t.value or 0.0), t.number),
        })  # fmt: skip
    rows.sort(key=lambda r: r.pop("_rank"))
    return rows


def markdown(study) -> str:
    rows = table(study)
    s = settings_of(study)
    head = ["trial", "state", "val mIoU", "±", "last reported", "overrides", "experiment", "host",
            "min"]  # fmt: skip
    lines = [
        f"# Sweep {study.study_name}: {len(rows)} of {s.trials} trials ({s.sampler}, pruning "
        f"{s.prune}, commit `{s.commit[:12]}`)", "",
        "| " + " | ".join(head) + " |", "|" + " --- |" * len(head),
    ]  # fmt: skip
    for r in rows:
        cells = [r["trial"], r["state"], r["val_miou"], r["std"], r["last_reported"],
                 f"`{r['overrides']}`", r["experiment"], r["host"], r["minutes"]]  # fmt: skip
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    plot = best_so_far_png(study)
    if plot:
        lines += ["", "Best val mIoU so far, by trial:", "", f"![best so far]({plot})"]
    return "\n".join(lines) + "\n"


def best_so_far_png(study) -> str | None:
    """The best val mIoU so far against the trial number, as a PNG data URI (PIL only)."""
    import base64
    import io

    from PIL import Image, ImageDraw

    values, best = [], None
    for t in study.trials:
        if t.value is not None:
            best = t.value if best is None else max(best, t.value)
        values.append(best)
    points = [(i, v) for i, v in enumerate(values) if v is not None]
    if not points:
        return None
    w, h, m = 480, 200, 30
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    hi = hi if hi > lo else lo + 0.01
    n = max(len(values) - 1, 1)
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.line([(m, h - m), (w - 10, h - m)], fill="black")
    d.line([(m, 10), (m, h - m)], fill="black")
    xy = [
        (m + (w - m - 10) * i / n, h - m - (h - m - 10) * (v - lo) / (hi - lo)) for i, v in points
    ]
    d.line(xy, fill=(8, 48, 107), width=2) if len(xy) > 1 else None
    for x, y in xy:
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(8, 48, 107))
    d.text((m + 4, 12), f"{100 * hi:.1f} %", fill="black")
    d.text((m + 4, h - m - 14), f"{100 * lo:.1f} %", fill="black")
    d.text((w - 90, h - m + 6), f"trials: {len(values)}", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def publish(study) -> None:
    """The sweep's table, as a Prefect artifact (a new version each time a trial ends)."""
    key = "sweep-" + "".join(c if c.isalnum() else "-" for c in study.study_name.lower())
    create_markdown_artifact(markdown=markdown(study), key=key[:64],
                             description="The sweep's trials, ranked by val mIoU")  # fmt: skip


def root_of() -> Path:
    from stages.dvc_stages import project_root

    return project_root()

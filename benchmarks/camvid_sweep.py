"""Tune recipes/camvid-cpu.yaml on real photos: a TPE sweep with pruning, then the winner and
the untuned values trained at the full 15-minute budget.

    python benchmarks/camvid_sweep.py sweep --root DIR [--trials 16] [--camvid PATH]
    python benchmarks/camvid_sweep.py final --root DIR [--which winner,untuned] [--iterations N]
        [--out FILE.md]

`sweep` builds a project in DIR/proj once (this checkout's files, `seg recipe camvid-cpu
--root CAMVID`, the shards made by DVC, a git commit), starts a real `prefect server` and runs
`seg sweep camvid-cpu --local --sampler tpe --prune median` over SPACE with the trial's short
schedule (TRIAL): each trial a pipeline run (train, evaluate on the 101 val frames at the full
360x480), a DVC experiment. Run it again with the same DIR and it continues the study (Optuna's
journal in the project): finished trials are kept. It prints the ranked table and the trial
time pruning saved (each pruned trial's unrun steps at the completed trials' mean time a step).

`final` trains, in the same project, the best trial's values and the untuned ones (UNTUNED:
recipes/camvid.yaml scaled down to a 2-core CPU as a new user would) at the recipe's full
iterations with `seg train` + `seg eval`, one after the other, and reports each one's val mIoU
and training minutes (the 15-minute budget is the train command's wall time, validations in).
`recipe` trains recipes/camvid-cpu.yaml as shipped (no sweep needed in DIR); `--iterations N`
runs the recipe's schedule (two validations) at N steps. Time it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import yaml
from sweep_scaling import BIN, REPO, bench_env, checkout_copy, machine, prefect_server, sh, stop

CAMVID = REPO.parent / "shared" / "data" / "camvid"
NAME = "camvid-cpu"
# A trial: 300 steps (~4 min of training), validated every 100 (the pruner's reports).
TRIAL = {"iterations": 300, "val_interval": 100, "checkpoint_interval": 100, "warmup_iters": 30}
SPACE = [
    "train.lr=tag(log, interval(0.01, 0.3))",
    "train.weight_decay=tag(log, interval(0.00001, 0.001))",
    "train.scale_range=choice([0.5,1.0],[0.5,1.5],[0.75,1.25],[0.5,2.0])",
    "train.class_weights=null,inverse_log",
    "train.photometric=true,false",
]
# recipes/camvid.yaml as the new user scaled it to a 2-core CPU: MobileNetV3 V3+ at
# 176x240 crops, lr 0.1, batch 8 (camvid.yaml's plain 3x3 head: ~2.6x the separable head's
# step time here: 200 steps and two validations took 9.8 minutes, so 300 fill the 15).
UNTUNED = {"model": {"backbone": "mobilenet_v3_large", "separable_head": False,
                     "pretrained_backbone": None},
           "crop_size": [176, 240], "lr": 0.1, "batch_size": 8, "iterations": 300, "warmup_iters": 30,
           "val_interval": 150, "checkpoint_interval": 150, "workers": 1}  # fmt: skip


def project(root: Path, env: dict, camvid: Path) -> Path:
    """DIR/proj, made once: this checkout, the camvid-cpu recipe, the trial's schedule, fp32."""
    proj = root / "proj"
    if (proj / ".git").is_dir():
        return proj
    checkout_copy(proj, env)
    sh([str(BIN / "seg"), "recipe", NAME, "--root", str(camvid)], proj, env)
    raw = yaml.safe_load((proj / "params.yaml").read_text())
    raw["train"].update({**TRIAL, "amp": "off"})
    raw["evaluate"]["amp"] = "off"
    (proj / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for cmd in (["git", "init", "-q", "-b", "main"],
                [str(BIN / "dvc"), "repro", "preprocess@train", "preprocess@val"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "camvid-cpu sweep base"]):  # fmt: skip
        sh(cmd, proj, env)
    return proj


def rows(proj: Path, env: dict) -> list[dict]:
    return json.loads(sh([str(BIN / "seg"), "sweep", "show", NAME, "--json"], proj, env))


def best(proj: Path, env: dict) -> dict:
    return max((r for r in rows(proj, env) if r["state"] == "complete"),
               key=lambda r: r["val_miou"])  # fmt: skip


def sweep(args) -> None:
    _, env = bench_env(NAME, args.root)
    server = prefect_server(args.root, env, args.root / "server.log")
    try:
        proj = project(args.root, env, args.camvid)
        t0 = time.monotonic()
        cmd = [str(BIN / "seg"), "sweep", NAME, "--local", "--sampler", "tpe", "--trials",
               str(args.trials), "--prune", "median", "--seed", "0"]  # fmt: skip
        for axis in SPACE:
            cmd += ["-S", axis]
        sh(cmd, proj, env, timeout=12 * 3600)
        took = time.monotonic() - t0
        table = rows(proj, env)
    finally:
        stop(server)
    report(table, took, args)


def report(table: list[dict], took: float, args) -> None:
    steps = TRIAL["iterations"]
    done = [r for r in table if r["state"] == "complete"]
    pruned = [r for r in table if r["state"] == "pruned" and r["last_reported"]]
    unrun = sum(steps - int(r["last_reported"].split(" at ")[1]) for r in pruned)
    mean = sum(r["minutes"] for r in done) / len(done) if done else 0.0
    saved = sum(mean - r["minutes"] for r in pruned)
    lines = [
        f"## The sweep ({time.strftime('%Y-%m-%d')})", "",
        f"Machine: {machine()}; torch {__import__('torch').__version__}; fp32.",
        f"Command: `python benchmarks/camvid_sweep.py sweep --root DIR --trials {args.trials}` "
        f"(this part of it: {took / 60:.1f} min)", "",
        f"Trial: {TRIAL}; space: {' '.join(f'`{s}`' for s in SPACE)}", "",
        "| trial | state | val mIoU (%) | last reported | overrides | min |",
        "| --- | --- | --- | --- | --- | --- |",
        *[f"| {r['trial']} | {r['state']} | {r['val_miou']} | {r['last_reported']} | "
          f"`{r['overrides']}` | {r['minutes']} |" for r in table],
        "", f"{len(done)} complete (mean {mean:.1f} min a trial, evaluation in), "
        f"{len(pruned)} pruned: {unrun} steps unrun, {saved:.1f} trial-minutes saved "
        f"(each pruned trial's minutes against the complete trials' mean); the sweep took "
        f"{sum(r['minutes'] or 0 for r in table):.1f} trial-minutes.",
    ]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


def overrides(prefix: str, values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        if isinstance(value, dict):
            out += overrides(f"{prefix}{key}.", value)
        else:
            out += ["-S", f"{prefix}{key}={json.dumps(value).replace(' ', '')}"]
    return out


def final(args) -> None:
    _, env = bench_env(NAME, args.root)
    proj = project(args.root, env, args.camvid)  # the sweep's, or made here for `recipe`
    full = yaml.safe_load((REPO / "recipes" / f"{NAME}.yaml").read_text())["train"]
    schedule = {k: full[k] for k in ("iterations", "val_interval", "checkpoint_interval",
                                      "warmup_iters")}  # fmt: skip
    if args.iterations:  # the recipe's two validations, at another length
        half = args.iterations // 2
        schedule.update(iterations=args.iterations, val_interval=half, checkpoint_interval=half)
    recipe = [a for k, v in schedule.items() for a in ("-S", f"train.{k}={v}")]
    runs = {"recipe": lambda: recipe, "untuned": lambda: overrides("train.", UNTUNED)}

    def winner() -> list[str]:  # the recipe's schedule, the sweep's best complete trial in DIR
        chosen = re.split(r" (?=[a-z_.]+=)", best(proj, env)["overrides"])
        return recipe + [a for o in chosen for a in ("-S", o)]

    runs["winner"] = winner
    lines = [f"## At the full budget ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {machine()}; torch {__import__('torch').__version__}; fp32.", "",
             "| run | val mIoU (%) | train min | eval min | overrides |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for which in args.which.split(","):
        out = args.root / f"final-{which}"
        sets = runs[which]() + ["-S", f"data.outputs={out}"]
        t0 = time.monotonic()
        sh([str(BIN / "seg"), "train", *sets], proj, env, timeout=3 * 3600)
        t1 = time.monotonic()
        sh([str(BIN / "seg"), "eval", *sets], proj, env, timeout=3600)
        t2 = time.monotonic()
        metrics = json.loads((out / "eval" / "metrics.json").read_text())
        lines.append(f"| {which} | {100 * metrics['miou']:.1f} | {(t1 - t0) / 60:.1f} | "
                     f"{(t2 - t1) / 60:.1f} | `{' '.join(sets[1::2])}` |")  # fmt: skip
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("sweep", "final"))
    ap.add_argument("--root", type=Path, required=True, help="the project's folder (kept)")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--camvid", type=Path, default=CAMVID)
    ap.add_argument("--which", default="winner,untuned", help="of recipe, winner, untuned")
    ap.add_argument("--iterations", type=int, help="final: the recipe's schedule at N steps")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    args.root = args.root.resolve()
    args.root.mkdir(parents=True, exist_ok=True)
    (sweep if args.what == "sweep" else final)(args)


if __name__ == "__main__":
    main()

"""The demo over training seeds: how far the seed alone moves `make demo`'s val mIoU.

    python benchmarks/demo_seeds.py [--seeds 0,1,2,3,4] [--amp off] [--set synth.val=64]
        [-S train.iterations=900,1100] [--workers 2] [--out FILE.md] [--keep DIR]
        [--score-val 128,256]

Builds a project from this checkout with the demo's params.yaml as it is (`train.amp` and
`evaluate.amp` set from --amp, any other key from --set, before the demo's data is made), a
real `prefect server`, and runs the sweep `demo-seeds` over `train.seed` (times any -S grid):
each trial a whole demo run (train, evaluate) in a workspace of its own, a DVC experiment.
`--workers 0` (the default) runs them one after another (`seg sweep --local`, all cores, as
`make demo` does); `--workers N` on a process pool of N workers, one torch thread each
(`seg sweep --pool`, as benchmarks/sweep_scaling.py). Reports each trial's val mIoU and, for
each point of the -S grid, the lowest seed and the spread. The issue's goal: every seed at or
above 50 %, a spread of at most 3 points. `--score-val N,...` scores each trial's best.pt again
on the first N synthetic val frames (the demo's own frames and more of the same kind: synth
draws frame i from its seed, the split and i): how much of the spread is the val set's size.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml
from sweep_scaling import (
    BIN,
    bench_env,
    machine,
    prefect_server,
    project,
    report,
    sh,
    stop,
    sweep,
    with_origin,
)


def settings(pairs: list[str], amp: str) -> dict[str, dict]:
    """`section.key=value` pairs (values in YAML) as params.yaml sections, with amp."""
    sections: dict[str, dict] = {"train": {"amp": amp}, "evaluate": {"amp": amp}}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        section, dot, name = key.partition(".")
        if not (sep and dot and name):
            raise SystemExit(f"--set {pair!r}: expected section.key=value")
        sections.setdefault(section, {})[name] = yaml.safe_load(value)
    return sections


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--amp", default="off", help="off (fp32) | auto | bf16")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("-S", dest="grid", action="append", default=[], metavar="KEY=V1,V2")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--score-val", default="", metavar="N,...")
    ap.add_argument("--keep", type=Path, metavar="DIR",
                    help="build the project in DIR (new) and keep it: the trials' experiments "
                    "and checkpoints, for scoring them again")  # fmt: skip
    args = ap.parse_args()
    if "," not in args.seeds and not args.grid:  # seg sweep wants several trials
        raise SystemExit("--seeds: give two or more; one seed is `seg train -S train.seed=N`")
    grid = [a for g in [f"train.seed={args.seeds}", *args.grid] for a in ("-S", g)]
    if args.keep and args.keep.exists():
        raise SystemExit(f"--keep {args.keep}: exists; give a new folder")
    root, env = bench_env("seg-demo-seeds-", args.keep)
    server = prefect_server(root, env, root / "server.log")
    try:
        proj = project(root, env, **settings(args.set, args.amp))
        if args.workers:
            with_origin(proj, env)
            sh([str(BIN / "prefect"), "work-pool", "create", "bench", "--type", "process"],
               root, env)  # fmt: skip
            (root / "logs").mkdir()
            took, miou = sweep(proj, env, "demo-seeds", args.workers, root / "logs", grid)
        else:
            t0 = time.monotonic()
            sh([str(BIN / "seg"), "sweep", "demo-seeds", "--local", *grid], proj, env,
               timeout=12 * 3600)  # fmt: skip
            took = time.monotonic() - t0
            rows = json.loads(
                sh([str(BIN / "seg"), "sweep", "show", "demo-seeds", "--json"], proj, env)
            )
            miou = {r["overrides"]: r["val_miou"] for r in rows}
        rescored = {n: score_val(proj, env, int(n)) for n in args.score_val.split(",") if n}
    finally:
        stop(server)
    done = {k: v for k, v in miou.items() if v is not None}
    pct = 100 if max(done.values(), default=0) <= 1 else 1  # a fraction or in points
    points: dict[str, list[float]] = {}  # the grid's point (all but the seed) -> its seeds
    for k, v in done.items():
        rest = " ".join(o for o in k.split() if not o.startswith("train.seed="))
        points.setdefault(rest or "(the demo)", []).append(pct * v)
    how = (f"{args.workers} workers of one torch thread each" if args.workers
           else "one after another, all cores")  # fmt: skip
    command = " ".join(["python benchmarks/demo_seeds.py", f"--seeds {args.seeds}",
                        f"--amp {args.amp}", *[f"--set {s}" for s in args.set],
                        *[f"-S {g}" for g in args.grid],
                        *([f"--workers {args.workers}"] if args.workers else [])])  # fmt: skip
    lines = [
        f"# The demo over training seeds ({time.strftime('%Y-%m-%d')})", "",
        f"Machine: {machine()}; torch {__import__('torch').__version__}; amp: {args.amp}; "
        f"trials {how}.", f"Command: `{command}`", "",
        "| trial | val mIoU (%) |", "| --- | --- |",
        *[f"| `{k}` | {pct * v:.1f} |" for k, v in sorted(done.items())], "",
        "| point | seeds | lowest (%) | spread (points) | goal met |",
        "| --- | --- | --- | --- | --- |",
        *[f"| `{p}` | {len(v)} | {min(v):.1f} | {max(v) - min(v):.1f} | "
          f"{'yes' if min(v) >= 50 and max(v) - min(v) <= 3 else 'no'} |"
          for p, v in sorted(points.items())],
        "", f"{len(done)} trials in {took / 60:.1f} min (goal: every seed >= 50 %, a spread "
        "of at most 3 points).",
    ]  # fmt: skip
    if rescored:
        ns = list(rescored)
        lines += [
            "", "Each trial's best.pt scored again on the first N synthetic val frames "
            "(`--score-val`; all cores, the trial's precision):", "",
            "| trial | " + " | ".join(f"val {n} (%)" for n in ns) + " |",
            "| --- |" + " --- |" * len(ns),
            *[f"| `{k}` | " + " | ".join(f"{100 * rescored[n][k]:.1f}" for n in ns) + " |"
              for k in sorted(done)],
            "| lowest / spread | " + " | ".join(
                f"{100 * min(rescored[n].values()):.1f} / "
                f"{100 * (max(rescored[n].values()) - min(rescored[n].values())):.1f}"
                for n in ns) + " |",
        ]  # fmt: skip
    report(lines, args.out, None if args.keep else root)


def score_val(proj: Path, env: dict, n: int) -> dict[str, float]:
    """Each trial (its overrides) -> val mIoU of its best.pt on the first `n` synthetic val
    frames. The checkpoint comes from DVC's cache (the md5 in the experiment's dvc.lock); the
    frames from `seg synth` with the project's synth params, sharded as its preprocess does."""
    params = yaml.safe_load((proj / "params.yaml").read_text())
    syn, pre = params["synth"], params["preprocess"]
    root = proj.parent / f"val-{n}"
    seg = str(BIN / "seg")
    sh([seg, "synth", str(root / "frames"), "--train", "0", "--val", str(n), "--height",
        str(syn["height"]), "--width", str(syn["width"]), "--seed", str(syn["seed"]),
        "--overwrite"], proj, env)  # fmt: skip
    sh([seg, "preprocess", str(root / "frames"), "val", str(root / "shards"),
        "--samples-per-shard", str(pre["samples_per_shard"]),
        "--image-format", pre["image_format"]], proj, env)  # fmt: skip
    rows = json.loads(sh([seg, "sweep", "show", "demo-seeds", "--json"], proj, env))
    if sh(["git", "remote"], proj, env).split():  # a pool's trials pushed theirs to origin
        sh(["git", "fetch", "-q", "origin", "+refs/exps/*:refs/exps/*"], proj, env)
    revs = {e["name"]: e["rev"]
            for row in json.loads(sh([str(BIN / "dvc"), "exp", "show", "--json"], proj, env))
            for group in row.get("experiments") or [] for e in group["revs"]}  # fmt: skip
    out = {}
    for r in rows:
        if r["val_miou"] is None:
            continue
        lock = yaml.safe_load(sh(["git", "show", f"{revs[r['experiment']]}:dvc.lock"], proj, env))
        (md5,) = [o["md5"] for o in lock["stages"]["train"]["outs"]
                  if o["path"].endswith("/best.pt")]  # fmt: skip
        ckpt = proj / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
        if not ckpt.is_file():
            raise SystemExit(f"{ckpt}: trial {r['overrides']}'s best.pt is not in the cache")
        dest = root / "eval" / r["experiment"]
        sh([seg, "eval", "--checkpoint", str(ckpt), "--shards", str(root / "shards"),
            "--out", str(dest)], proj, env)  # fmt: skip
        out[r["overrides"]] = json.loads((dest / "metrics.json").read_text())["miou"]
    return out


if __name__ == "__main__":
    main()

"""The table of benchmarks/gpu_check.sh, from the JSON files it left in one folder.

python benchmarks/gpu_report.py /tmp/gpu_check > gpu_check.md
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _rows(name: str, out: Path) -> dict:
    data = _json(out / f"{name}.json")
    return {r["name"].split(":")[0]: r for r in data["rows"]} if data else {}


def _train_rate(out: Path, name: str) -> float | None:
    """Sustained images/s of a `seg train` run: the mean of its reports after the first
    (which holds start-up and compilation)."""
    rates = []
    log = out / f"{name}_log.jsonl"
    if log.is_file():
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        rates = [r["train/images_per_s"] for r in rows if "train/images_per_s" in r]
    else:  # DVCLive (the orchestrating side) instead of the plain log
        tsv = out / f"{name}_images_per_s.tsv"
        if tsv.is_file():
            rates = [float(r["images_per_s"]) for r in csv.DictReader(tsv.open(), delimiter="\t")]
    rates = rates[1:] if len(rates) > 1 else rates
    return sum(rates) / len(rates) if rates else None


def _f(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _rc(out: Path, name: str) -> str:
    rc = out / f"{name}.rc"
    if not rc.is_file():
        return "not run"
    return "ok" if rc.read_text().strip() == "0" else f"FAILED (see {name}.txt)"


def report(out: Path) -> str:
    step, nobench = _rows("step", out), _rows("step_nobench", out)
    loader, cv = _rows("loader_synth", out), _rows("loader_camvid", out)
    plain, ours = step.get("plain fp32 eager"), step.get("ours")
    lines = [
        "| measure | measured | goal |",
        "| --- | --- | --- |",
    ]

    def add(measure, measured, goal=""):
        lines.append(f"| {measure} | {measured} | {goal} |")

    if plain:
        add("step, plain fp32 eager", f"{plain['images_per_s']:.1f} img/s, MFU {_f(plain.get('mfu_pct'))} %, "
            f"peak {_f(plain.get('steady'))} GiB ({_f(plain.get('with_warmup'))} with warm-up)", "baseline")  # fmt: skip
    if nobench.get("plain fp32 eager"):
        r = nobench["plain fp32 eager"]
        add("same, cudnn.benchmark off", f"{r['images_per_s']:.1f} img/s, peak {_f(r.get('steady'))} GiB "
            f"({_f(r.get('with_warmup'))} with warm-up)", "explains the fp32 peak")  # fmt: skip
    if ours:
        speed = ours["images_per_s"] / plain["images_per_s"] if plain else None
        add(f"step, {ours['name']}", f"{ours['images_per_s']:.1f} img/s ({_f(speed, '{:.2f}')}x), "
            f"MFU {_f(ours.get('mfu_pct'))} %, peak {_f(ours.get('steady'))} GiB", ">= 2.5x, >= 20 %")  # fmt: skip
    fp16 = _rows("step_fp16", out).get("ours")
    if fp16:
        add("step, forced fp16 + GradScaler (fused SGD, eager)", f"{fp16['images_per_s']:.1f} img/s, "
            f"peak {_f(fp16.get('steady'))} GiB", "runs (the pre-Ampere path)")  # fmt: skip
    ohem = _json(out / "ohem.json")
    if ohem:
        times = ", ".join(f"{r['method']} {r['ms']:.2f} ms" for r in ohem["rows"])
        add(f"OHEM threshold over {ohem['pixels']:,} pixels (k {ohem['k']:,})",
            f"{times}; same value: {ohem['same']}; default {ohem['default']}",
            "default = fastest")  # fmt: skip
    sb = _json(out / "syncbn.json")
    if sb:
        add(f"2 processes on one GPU, {'SyncBN' if sb['sync_bn'] else 'BN (no CUDA)'}: eager",
            f"{sb['eager_steps_per_s']:.2f} steps/s, {_f(sb.get('host_syncs_per_eager_step'), '{}')} "
            "host syncs per step", "")  # fmt: skip
        add("same, compiled (what `compile: auto` declines)",
            f"{sb['compiled_steps_per_s']:.2f} steps/s ({sb['compiled_speedup']:.2f}x eager), "
            f"{sb['graph_breaks']} graph breaks, {sb['unique_graphs']} graphs, compile "
            f"{sb['compile_s']:.0f} s", "eager unless > 1.0x")  # fmt: skip
    graphs = _rows("step_cudagraphs", out).get("ours")
    if graphs:
        speed = graphs["images_per_s"] / ours["images_per_s"] if ours else None
        add("same, + CUDA graphs (compile mode reduce-overhead)",
            f"{graphs['images_per_s']:.1f} img/s ({_f(speed, '{:.2f}')}x ours), peak {_f(graphs.get('steady'))} GiB",
            "adopt in the loop if > 1.0x")  # fmt: skip
    if loader:
        fed = loader.get("step, fed by the shard loader", {}).get("images_per_s")
        over = loader.get("overhead_pct", {}).get("value")
        alone = loader.get("loader alone", {}).get("images_per_s")
        add("step fed by the shard loader (synthetic shards)",
            f"{_f(fed)} img/s, {_f(over, '{:+.1f}')} % step time; loader alone {_f(alone)} img/s", "<= 5 %")  # fmt: skip
    for fmt in ("png", "zstd"):
        m = _rows(f"loader_mosaic_{fmt}", out)
        if m:
            fed = m.get("step, fed by the shard loader", {}).get("images_per_s")
            over = m.get("overhead_pct", {}).get("value")
            alone = m.get("loader alone", {}).get("images_per_s")
            add(f"step fed by the loader, 1024x2048 photo mosaics, {fmt} shards",
                f"{_f(fed)} img/s, {_f(over, '{:+.1f}')} % step time; loader alone {_f(alone)} img/s",
                "zstd: <= 5 %" if fmt == "zstd" else "PNG, for comparison")  # fmt: skip
    rate = _train_rate(out, "train_synth")
    ref = ours["images_per_s"] if ours else None
    add("`seg train` sustained (synthetic shards, compiled)",
        f"{_f(rate)} img/s = {_f(100 * rate / ref if rate and ref else None)} % of the step", ">= 95 %")  # fmt: skip
    if cv:
        res = cv.get("step, batch already on the device", {}).get("images_per_s")
        fed = cv.get("step, fed by the shard loader", {}).get("images_per_s")
        over = cv.get("overhead_pct", {}).get("value")
        add(
            "CamVid: step fed by the loader (uncompiled)",
            f"{_f(fed)} img/s vs {_f(res)} resident ({_f(over, '{:+.1f}')} %)",
        )
    for name, what in (("eval_whole_1_0", "whole, scale 1.0"), ("eval_slide_1_0", "slide, scale 1.0"),
                       ("eval_whole_1_0_1_25", "whole, scales [1.0, 1.25] (the demo's)")):  # fmt: skip
        m = _json(out / f"{name}.json")
        if m:
            add(f"`seg eval` {what}, {m['images']} full-resolution frames",
                f"{m['images_per_s']:.1f} img/s, peak {_f(m.get('peak_memory_gib'))} GiB",
                ">= 50 img/s" if name == "eval_whole_1_0" else "")  # fmt: skip
    add(
        "`seg train --gpus 1`, os8_from (DDP rebuilt at OS8, BN frozen)",
        _rc(out, "train_gpus1_os8"),
        "runs",
    )
    add(
        "a CPU-made checkpoint resumed on the GPU (fused SGD, channels-last)",
        _rc(out, "resume_cuda"),
        "runs",
    )
    sync = _json(out / "sync.json")
    if sync:
        add("host syncs per step between reports", f"{sync['per_step']:.2f}", "0")
    machine = (
        (out / "machine.txt").read_text().strip().replace("\n", "; ")
        if (out / "machine.txt").is_file()
        else "?"
    )
    errors = (out / "errors.txt").read_text().strip() if (out / "errors.txt").is_file() else ""
    if (out / "skipped.txt").is_file():
        errors += "\n" + (out / "skipped.txt").read_text().strip()
    return (
        f"machine: {machine}\n\n"
        + "\n".join(lines)
        + ("\n\nerrors:\n" + errors if errors else "")
        + "\n"
    )


if __name__ == "__main__":
    print(report(Path(sys.argv[1])))

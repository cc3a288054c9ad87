"""`seg doctor`: the machine and the working point each command would use here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from stages.commands.options import ParamsOpt, SetOpt
from stages.errors import cli_errors


def register(app: typer.Typer) -> None:
    app.command()(doctor)


@cli_errors
def doctor(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    gpus: Annotated[
        int, typer.Option(help="Processes per node the run would use (seg train --gpus N).")
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """The machine (CPU, GPUs, versions) and what train and eval would run with here: device,
    precision and why, compile, channels-last, loader workers; /dev/shm and free disk; a
    warning for each known trap."""
    from stages import steps
    from stages.doctor import diagnose

    report = diagnose(steps.load(params, set_), gpus)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from stages.progress import console

    m = report["machine"]
    isa = "AVX-512" if m["avx512"] else "AVX2" if m["avx2"] else "no AVX2"
    console.print(
        f"[bold]machine[/] {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
        f"{isa}, kernels {m['cpu_capability']}; native bf16: "
        f"{'yes' if m['native_bf16'] else 'no'} ({m['bf16_why']})",
        highlight=False,
    )
    for g in m["gpus"]:
        console.print(
            f"[bold]gpu {g['index']}[/] {g['name']} (sm {g['capability']}, {g['memory_gib']} GiB)"
        )
    gpu = "" if m["gpus"] else ", no GPU"
    console.print(
        f"torch {m['torch']} (CUDA {m['cuda'] or '-'}, cuDNN {m['cudnn'] or '-'}){gpu}",
        highlight=False,
    )
    for name, c in report["commands"].items():
        extra = ""
        if "compile" in c:
            extra = (
                f", compile {'on' if c['compile'] else 'off'}, channels-last "
                f"{'on' if c['channels_last'] else 'off'}, {c['processes']} process(es)"
            )
        console.print(
            f"[bold]{name}[/] {c['device']}, {c['precision']} ({c['why']}){extra}, "
            f"{c['loader_workers']} loader worker(s)",
            highlight=False,
        )
    shm = report["shm"]
    console.print(
        f"/dev/shm {shm['free_gib']} GiB free of {shm['total_gib']} (loaders need "
        f"~{shm['loaders_need_gib']} GiB); free disk: "
        + ", ".join(f"{k} {v} GiB" for k, v in report["free_disk_gib"].items()),
        highlight=False,
    )
    for w in report["warnings"]:
        console.print(f"[bold yellow]warning:[/] {w}", highlight=False)
    if not report["warnings"]:
        console.print("no warnings")

"""Options that several `seg` commands take: each defined once, here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="The params file.")]

_SET_HELP = "Override a param, e.g. -S train.lr=0.02 (repeatable)."


def _set_option(help_: str):
    return Annotated[list[str] | None, typer.Option("--set", "-S", help=help_)]


SetOpt = _set_option(_SET_HELP)
# `seg flow`: the override is written to params.yaml and the run saved as an experiment
FlowSetOpt = _set_option(
    _SET_HELP[:-1] + ". `seg flow`: written to params.yaml and saved as a DVC experiment, as "
    "`dvc exp run -S` does; a deployment: its runs' overrides, applied in each run's own "
    "workspace."
)

PrecisionChangeOpt = Annotated[
    bool,
    typer.Option(
        "--allow-precision-change",
        envvar="SEG_ALLOW_PRECISION_CHANGE",
        help="Let a resume continue in another precision than its checkpoint's (amp: auto "
        "on another kind of host); the checkpoint's working point records it. Refused "
        "without it.",
    ),
]

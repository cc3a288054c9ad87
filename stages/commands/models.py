"""`seg models`: parameters and multiply-adds of each architecture, next to the papers'."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from pipeline.errors import ConfigError
from pipeline.models.catalog import ARCHS
from stages.errors import cli_errors


def _parse_size(text: str) -> tuple[int, int]:
    """ "513x513" or "1024x2048" (HxW), or "513" for a square."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = (size[0], size[0])
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(
            f"input size {text!r} is not HxW with positive integers, e.g. 513x513 or 1024x2048"
        )
    return size  # type: ignore[return-value]


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app`."""

    @app.command("models")
    @cli_errors
    def models(
        input_size: Annotated[
            list[str] | None,
            typer.Option(
                "--input-size", "-s", help="HxW input size; repeat for several. [default: 513x513]"
            ),
        ] = None,
        output_stride: Annotated[
            list[int] | None,
            typer.Option(
                "--output-stride", "-o", help="8, 16 or 32; repeat for several. [default: 16]"
            ),
        ] = None,
        arch: Annotated[
            list[str] | None,
            typer.Option("--arch", "-a", help=f"Only these architectures ({', '.join(ARCHS)})."),
        ] = None,
        backbone: Annotated[
            list[str] | None,
            typer.Option("--backbone", "-b", help="Only these backbones (default: all)."),
        ] = None,
        num_classes: Annotated[int, typer.Option("--num-classes", "-k", min=1)] = 19,
        separable: Annotated[
            bool,
            typer.Option("--separable", help="Depthwise-separable ASPP and decoder (paper's SC)."),
        ] = False,
        as_json: Annotated[
            bool, typer.Option("--json", help="Print JSON instead of a table.")
        ] = False,
    ) -> None:
        """List each architecture with its parameters and multiply-adds (torch's FLOP counter)."""
        from pipeline.models import ARCHS, BACKBONES
        from pipeline.models.complexity import complexity_table

        sizes = [_parse_size(s) for s in input_size or ["513x513"]]
        rows = complexity_table(
            archs=arch or ARCHS,
            backbones=backbone or BACKBONES,
            input_sizes=sizes,
            output_strides=output_stride or [16],
            num_classes=num_classes,
            separable=separable,
        )
        if as_json:
            typer.echo(json.dumps([r.to_dict() for r in rows], indent=2))
            return
        _print_table(rows, num_classes, separable)


def _print_table(rows: list, num_classes: int, separable: bool) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    title = (
        f"DeepLab models ({num_classes} classes{', separable ASPP/decoder' if separable else ''})"
    )
    table = Table(
        title=title,
        caption="paper: DeepLabV3+ paper, Tables 3 and 5 (513x513, 21 classes)",
        box=box.SIMPLE,
        pad_edge=False,
        collapse_padding=True,
    )
    for name in ("arch", "backbone", "input", "OS", "params M", "MACs G", "paper G"):
        table.add_column(
            name, justify="left" if name in ("arch", "backbone") else "right", no_wrap=True
        )
    for r in rows:
        h, w = r.input_size
        paper = f"{r.paper_macs / 1e9:.2f}" if r.paper_macs else "-"
        table.add_row(
            r.arch,
            r.backbone,
            f"{h}x{w}",
            str(r.output_stride),
            f"{r.params / 1e6:.2f}",
            f"{r.macs / 1e9:.2f}",
            paper,
        )
    Console().print(table)

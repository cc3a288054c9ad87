"""`seg export`: a checkpoint as ONNX, TorchScript or a torch.export program, verified."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.errors import cli_errors


def register(app: typer.Typer) -> None:
    app.command("export")(export)


@cli_errors
def export(
    checkpoint: Annotated[
        str,
        typer.Argument(
            help="Trained checkpoint (e.g. outputs/train/best.pt), or a registry version "
            "(deeplab#prod, deeplab@v1.3.0), fetched from the DVC remote where needed."
        ),
    ],
    format_: Annotated[
        str, typer.Option("--format", "-f", help="onnx, torchscript or exported-program.")
    ] = "onnx",
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output file (default: next to the checkpoint, NAME.onnx / "
            "NAME.torchscript.pt / NAME.pt2)."
        ),
    ] = None,
    output_stride: Annotated[
        int | None, typer.Option(help="Export at this output stride (default: the checkpoint's).")
    ] = None,
    check_image: Annotated[
        Path | None,
        typer.Option(help="Image for the check against PyTorch (default: seeded noise)."),
    ] = None,
    check_size: Annotated[
        tuple[int, int] | None,
        typer.Option(help="Resize the check image to (h w) (default: its size; noise 512 1024)."),
    ] = None,
) -> None:
    """Export a checkpoint for deployment. The file is written only if its logits match
    PyTorch's on the check image and on a batch of 2 at an odd size (dynamic batch, H, W)."""
    from pipeline.engine.export import SUFFIXES, export_checkpoint
    from stages.progress import console
    from stages.registry import parse_ref

    # an unknown format fails in export_checkpoint, in one line naming the checkpoint
    suffix = SUFFIXES.get(format_, f".{format_}")
    source = None
    if not Path(checkpoint).exists() and parse_ref(checkpoint):
        from stages import model_files, registry

        root = Path.cwd()
        v = registry.resolve(root, checkpoint)
        checkpoint, source = model_files.fetch(root, v), v.provenance()
        out = out or Path(f"{v.name}-{v.version}{suffix}")  # here, not in the fetch cache
    checkpoint = Path(checkpoint)
    out = out or checkpoint.with_name(checkpoint.name.removesuffix(".pt") + suffix)
    with console.status(f"exporting {checkpoint} as {format_}"):
        report = export_checkpoint(
            checkpoint, format_, out, output_stride, check_image, check_size, registry=source
        )
    via = f" ({source['ref']}, commit {source['commit'][:8]})" if source else ""
    console.print(
        f"{checkpoint}{via} -> {out} ({format_}, output stride {report.output_stride}, "
        f"{report.num_classes} classes) in {report.export_seconds:.1f}s; checked against "
        f"PyTorch, {report.summary()}"
    )

"""`seg preprocess` and `seg stats`: dataset roots into shards, and what the shards hold."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.errors import cli_errors


def register(app: typer.Typer) -> None:
    app.command()(preprocess)
    app.command()(stats)


@cli_errors
def preprocess(
    root: Annotated[
        Path,
        typer.Argument(
            help="Dataset root (e.g. a Cityscapes folder with leftImg8bit/ and gtFine/)."
        ),
    ],
    split: Annotated[str, typer.Argument(help="Split to convert: train, val or test.")],
    out: Annotated[
        str,
        typer.Argument(
            help="Output folder for shard-*.tar and manifest.parquet (must not exist); with "
            "--store, for the pointer to them. Or a folder in an object store, written once: "
            "s3://bucket/prefix (credentials: AWS_* variables)."
        ),
    ],
    dataset: Annotated[
        str, typer.Option(help="Dataset layout: cityscapes, voc, vkitti2 or camvid.")
    ] = "cityscapes",
    samples_per_shard: Annotated[int, typer.Option(help="Samples per tar shard.")] = 100,
    image_format: Annotated[
        str,
        typer.Option(
            help="png (the source's bytes), zstd (lossless, decodes ~5x faster: the "
            "Cityscapes recipe's) or npy (raw)."
        ),
    ] = "png",
    workers: Annotated[int, typer.Option(help="Worker processes (default: all CPU cores).")] = 0,
    skip_bad: Annotated[
        bool, typer.Option(help="Skip bad samples (listed in the manifest) instead of failing.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    store: Annotated[
        str | None,
        typer.Option(
            help="An object store for the shards (data.store: s3://bucket/prefix): they go to "
            "STORE/SPLIT/CONTENT-ID/, written once, and OUT gets a pointer to them. "
            "None, null or empty: none (what DVC writes for params.yaml's null)."
        ),
    ] = None,
) -> None:
    """Convert one split (labelIds -> trainIds) into WebDataset tar shards + a Parquet manifest."""
    from stages import steps
    from stages.progress import console, progress_bar

    if store in ("None", "null", ""):
        store = None
    with progress_bar(f"preprocess {split}") as update:
        summary = steps.preprocess(
            root, split, out, dataset, samples_per_shard, image_format, workers, skip_bad,
            overwrite, progress=update, store=store,
        )  # fmt: skip
    where = out
    if summary.location is not None:
        done = "found there already, nothing uploaded" if not summary.uploaded else "uploaded"
        where = f"{summary.location} ({done}; pointer in {out})"
    console.print(
        f"{summary.samples} samples -> {summary.shards} shard(s), {summary.bytes / 1e6:.1f} MB in {where}"
        + (f"; skipped {len(summary.skipped)}" if summary.skipped else ""),
        highlight=False,
        soft_wrap=True,
    )
    for key, reason in summary.skipped:
        console.print(f"  skipped {key}: {reason}", highlight=False)


@cli_errors
def stats(
    shards: Annotated[
        str, typer.Argument(help="A shard folder (or s3:// URL) made by `seg preprocess`.")
    ],
    json_out: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
) -> None:
    """Class pixel frequencies of a split, from its manifest."""
    import json

    from rich.table import Table

    from pipeline.data.shards import class_pixel_counts, manifest_info, read_manifest

    info = manifest_info(shards)
    counts = class_pixel_counts(shards)
    table = read_manifest(shards)
    total = int(counts.sum())
    rows = [
        {
            "train_id": i,
            "class": name,
            "pixels": int(c),
            "fraction": (int(c) / total if total else 0.0),
        }
        for i, (name, c) in enumerate(zip(info["class_names"], counts, strict=True))
    ]
    skipped = [
        k
        for k, e in zip(
            table.column("key").to_pylist(), table.column("error").to_pylist(), strict=True
        )
        if e
    ]
    if json_out:
        typer.echo(
            json.dumps(
                {
                    "dataset": info["dataset"],
                    "split": info["split"],
                    "samples": table.num_rows - len(skipped),
                    "skipped": skipped,
                    "classes": rows,
                },
                indent=2,
            )
        )
        return
    out = Table(title=f"{info['dataset']} {info['split']}: {table.num_rows - len(skipped)} samples")
    for col in ("id", "class", "pixels", "%"):
        out.add_column(col, justify="right" if col != "class" else "left")
    for r in rows:
        out.add_row(
            str(r["train_id"]), r["class"], f"{r['pixels']:,}", f"{100 * r['fraction']:.2f}"
        )
    from stages.progress import console

    console.print(out)
    if skipped:
        console.print(f"skipped samples: {', '.join(skipped)}")

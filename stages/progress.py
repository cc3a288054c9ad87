"""Rich progress bars for library callbacks `progress(done, total)`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def pct(x: float | None) -> str:
    """A score in [0, 1] as a percentage with two decimals; '-' for an undefined one."""
    return "-" if x is None else f"{100 * x:.2f}"


@contextmanager
def progress_bar(description: str, *fields: str) -> Iterator:
    """Yields `update(done, total, **fields)`; extra fields (loss, lr, ...) show after the bar.
    The bar appears at the first update: a command that fails before any progress (a bad
    checkpoint, a full disk) prints its one error line and nothing else."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(f"{f} {{task.fields[{f}]}}") for f in fields),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    bar = Progress(*columns, console=console, transient=False)
    task = None

    def update(done: int, total: int | None = None, **values) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(description, total=None, **{f: "-" for f in fields})
        bar.update(
            task,
            completed=done,
            total=total,
            **{k: v for k, v in values.items() if k in fields},
        )

    try:
        yield update
    finally:
        if task is not None:
            bar.stop()

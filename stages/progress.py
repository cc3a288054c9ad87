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
    """Yields `update(done, total, **fields)`; extra fields (loss, lr, ...) show after the bar."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(f"{f} {{task.fields[{f}]}}") for f in fields),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=None, **{f: "-" for f in fields})
        updated = False

        def update(done: int, total: int | None = None, **values) -> None:
            nonlocal updated
            updated = True
            bar.update(
                task,
                completed=done,
                total=total,
                **{k: v for k, v in values.items() if k in fields},
            )

        try:
            yield update
        except BaseException:
            if not updated:  # failed before any progress: the error is the only line left
                bar.live.transient = True
            raise

"""Turn library errors into a one-line message and a non-zero exit."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NoReturn, TypeVar

import typer
from rich.console import Console

from pipeline.atomic import disk_full
from pipeline.errors import SegError

F = TypeVar("F", bound=Callable)
err_console = Console(stderr=True)


def cli_errors(fn: F) -> F:
    """Decorator for CLI commands: a SegError prints `error: ...` and exits with code 1; so
    does a full disk met outside pipeline.atomic (DVCLive's files, a training log), naming
    the file."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SegError as exc:
            msg = str(exc)
            if "Original Traceback" in msg:  # re-raised from a DataLoader worker: keep the message
                msg = [line for line in msg.splitlines() if line.strip()][-1].split(": ", 1)[-1]
            _fail(msg)
        except OSError as exc:
            if not disk_full(exc):
                raise
            where = exc.filename or "a file"
            _fail(f"{where}: disk full ({exc.strerror}): free space and run again")

    return wrapper  # type: ignore[return-value]


def _fail(msg: str) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=1) from None

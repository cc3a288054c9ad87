"""Turn library errors into a one-line message and a non-zero exit."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console

from pipeline.errors import SegError

F = TypeVar("F", bound=Callable)
err_console = Console(stderr=True)


def cli_errors(fn: F) -> F:
    """Decorator for CLI commands: a SegError prints `error: ...` and exits with code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SegError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=1) from None

    return wrapper  # type: ignore[return-value]

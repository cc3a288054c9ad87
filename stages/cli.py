"""`seg`: the command line of the pipeline. Heavy imports (torch) live inside commands."""

from __future__ import annotations

import typer

from stages.commands import (
    data,
    doctor,
    engine,
    export,
    kfold,
    models,
    pipeline,
    recipes,
    registry,
    sweep,
    synth,
)

app = typer.Typer(
    name="seg",
    help="DeepLabV3/V3+ semantic segmentation: synthesize or convert data, train, evaluate, predict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _module in (
    synth, data, models, engine, export, kfold, recipes, pipeline, sweep, registry, doctor,
):  # fmt: skip
    _module.register(app)


@app.callback()
def _root() -> None:
    """DeepLabV3/V3+ semantic segmentation pipeline (Cityscapes, CamVid, PASCAL VOC, Virtual KITTI)."""
    credentials_out_of_the_url()


def credentials_out_of_the_url(environ=None) -> None:
    """PREFECT_API_URL=http://user:password@host/api: Prefect's HTTP client takes credentials
    from the URL, its event stream (which `seg serve`'s runner opens) only from
    PREFECT_API_AUTH_STRING. They move there, before Prefect reads its settings, and the URL
    keeps the rest; the processes a command starts inherit both. A set auth string wins."""
    import os
    from urllib.parse import unquote, urlsplit, urlunsplit

    env = os.environ if environ is None else environ
    url = env.get("PREFECT_API_URL", "")
    parts = urlsplit(url)
    if parts.password is None or "@" not in parts.netloc:
        return
    if not env.get("PREFECT_API_AUTH_STRING"):
        env["PREFECT_API_AUTH_STRING"] = (
            f"{unquote(parts.username or '')}:{unquote(parts.password)}"
        )
    host = parts.netloc.rpartition("@")[2]
    env["PREFECT_API_URL"] = urlunsplit(parts._replace(netloc=host))


if __name__ == "__main__":
    app()

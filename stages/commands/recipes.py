"""`seg recipe NAME --root DIR`: switch params.yaml to a named recipe in one line; `seg params`
checks it; `seg working-point` writes what its device and amp resolve to on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.commands.options import ParamsOpt, SetOpt
from stages.errors import cli_errors

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def register(app: typer.Typer) -> None:
    app.command()(recipe)
    app.command()(params)
    app.command("working-point")(working_point)


def merge(base: dict, update: dict) -> dict:
    """Recursively overlay `update` onto `base` (a copy)."""
    out = dict(base)
    for key, value in update.items():
        out[key] = (
            merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


@cli_errors
def recipe(
    name: Annotated[
        str, typer.Argument(help="Recipe in recipes/: cityscapes, camvid (a GPU) or camvid-cpu.")
    ],
    root: Annotated[
        Path | None, typer.Option(help="Dataset root to train on (sets data.root).")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Merge a named recipe (and a dataset root) into params.yaml; the old file is kept as params.yaml.bak."""
    import shutil

    import yaml

    from pipeline.atomic import atomic_write
    from pipeline.errors import ConfigError, DataError
    from pipeline.params import params_from_dict, yaml_load
    from stages.progress import console

    available = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    if name not in available:
        raise ConfigError(f"unknown recipe {name!r}; valid: {', '.join(available)}")
    if root is not None and not root.is_dir():
        raise DataError(f"{root}: dataset root not found")
    current = yaml_load(params.read_text()) if params.is_file() else {}
    new = merge(current, yaml_load((RECIPES / f"{name}.yaml").read_text()))
    if root is not None:
        new.setdefault("data", {})["root"] = str(root)
    params_from_dict(new)  # validate before touching the file
    if params.is_file():
        shutil.copy2(params, params.with_name(params.name + ".bak"))
    atomic_write(params, yaml.safe_dump(new, sort_keys=False))
    console.print(
        f"{params}: recipe {name!r} applied"
        + (f", data.root={root}" if root else "")
        + "; now run `dvc repro`"
    )


@cli_errors
def params(
    file: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    show: Annotated[bool, typer.Option(help="Print the resolved params as YAML.")] = False,
) -> None:
    """Validate params.yaml (unknown keys, impossible values); --show prints the resolved params."""
    import yaml

    from pipeline.params import params_hash
    from stages import steps
    from stages.progress import console

    p = steps.load(file, set_)
    if show:
        typer.echo(yaml.safe_dump(p.to_dict(), sort_keys=False))
    console.print(f"{file}: ok (params hash {params_hash(p)[:12]})")


@cli_errors
def working_point(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Write what the stages' device and amp resolve to on this machine (outputs/working_point/):
    the working_point stage, run by every `dvc repro`; the train and evaluate stages depend on
    it, so a machine where `amp: auto` resolves otherwise makes them stale."""
    import json

    from stages import steps, working_point
    from stages.progress import console

    p = steps.load(params, set_)
    for name, was in working_point.write(p).items():
        path = working_point.folder(p) / name
        point = json.dumps(json.loads(path.read_text()))
        console.print(f"{path}: {point}" + ("" if was else " (unchanged)"), highlight=False,
                      soft_wrap=True)  # fmt: skip

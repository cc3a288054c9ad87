"""mkdocs hooks: the pages that must not drift from the code are generated when the site is
built, from the code itself.

- `<!-- generated: cli -->` (reference/cli.md): every `seg` command, argument and option,
  from typer's app in stages/cli.py (its click command tree: names, types, defaults, help).
- `<!-- generated: params -->` (reference/params.md): every params.yaml key, from the
  dataclasses in pipeline/params.py: type, library default, the value params.yaml ships
  (the demo), and the comments beside each in pipeline/params.py and params.yaml.
- results/: a page for each file in benchmarks/results (the file itself, not a copy of its
  figures), and `<!-- generated: results -->` (results/index.md) lists them by date.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import re
import tokenize
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


# ----------------------------------------------------------------------------- mkdocs events


def on_files(files, config):
    """Each results file becomes the page results/<name>.md (benchmarks/results/README.md says what they are)."""
    from mkdocs.structure.files import File

    for path in sorted(RESULTS.glob("20*.md")):
        files.append(File.generated(config, f"results/{path.name}", content=path.read_text()))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    for name, make in (("cli", cli_reference), ("params", params_reference),
                       ("results", results_index)):  # fmt: skip
        marker = f"<!-- generated: {name} -->"
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown


# ----------------------------------------------------------------------------- the CLI


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _param_row(param, ctx) -> str:
    """One argument or option: its names, type (typer's `<type>` as `seg --help` shows it),
    default and help."""
    argument = param.param_type_name == "argument"
    names = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
    if argument:
        names = f"`{param.name.upper()}`" + (" ..." if param.nargs == -1 else "")
    kind = "flag" if getattr(param, "is_flag", False) else param.display_type(ctx).strip("<>")
    if param.multiple:
        kind += " (repeatable)"
    default = param.default
    if param.required:
        default = "required"
    elif callable(default) or default is None or default in ((), []) or argument:
        default = ""
    else:
        if isinstance(default, tuple | list):
            default = " ".join(map(str, default))
        default = f"`{default}`"
    return f"| {names} | {_cell(kind)} | {_cell(default)} | {_cell(param.help or '')} |"


def _command_doc(cmd, path: str) -> list[str]:
    from typer._click.core import Context  # typer vendors its own click

    ctx = Context(cmd, info_name=path)
    out = [f"## `{path}`", "", (cmd.help or "").strip(), ""]
    usage = re.sub(
        r"\{(\w+)\}", lambda m: m.group(1).upper(), " ".join(cmd.collect_usage_pieces(ctx))
    )
    out += ["```text", f"{path} {usage}".rstrip(), "```", ""]
    params = [p for p in cmd.params if p.name != "help" and not getattr(p, "hidden", False)]
    if params:
        out += ["| argument / option | type | default | |", "|---|---|---|---|"]
        out += [_param_row(p, ctx) for p in params]
        out.append("")
    if hasattr(cmd, "list_commands"):  # a group: its commands, each in full
        for name in cmd.list_commands(ctx):
            out += _command_doc(cmd.get_command(ctx, name), f"{path} {name}")
    return out


def seg_command():
    """The root of `seg`: typer's app in stages/cli.py as a command tree."""
    import typer

    from stages.cli import app

    return typer.main.get_command(app)


def cli_reference() -> str:
    from typer._click.core import Context

    root = seg_command()
    names = root.list_commands(Context(root, info_name="seg"))
    out = [
        "Generated from the typer app in `stages/cli.py` when the site is built "
        "(`seg COMMAND --help` prints the same).",
        "",
        " ".join(f"[`{n}`](#seg-{n})" for n in names),
        "",
    ]
    for name in names:
        out += _command_doc(root.get_command(Context(root, info_name="seg"), name), f"seg {name}")
    return "\n".join(out)


# ----------------------------------------------------------------------------- params.yaml


def _comments(source: str) -> dict[int, str]:
    """Line number -> the comment on that line."""
    found: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            found[tok.start[0]] = tok.string.lstrip("#").strip()
    return found


def _field_help(module_file: Path) -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comments beside the field (its own line's, and full
    comment lines right above it) in the dataclass source."""
    source = module_file.read_text()
    lines = source.splitlines()
    comments = _comments(source)
    helps: dict[tuple[str, str], str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                above, n = [], stmt.lineno - 1
                while n >= 1 and lines[n - 1].strip().startswith("#"):
                    above.insert(0, comments[n])
                    n -= 1
                own = [
                    comments[i] for i in range(stmt.lineno, stmt.end_lineno + 1) if i in comments
                ]
                helps[(node.name, stmt.target.id)] = " ".join(above + own)
    return helps


def _yaml_comments(path: Path) -> dict[str, str]:
    """Dotted params.yaml key -> the comment on its line (and on comment-only lines that
    continue it, indented under the comment)."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    last = None
    for line in path.read_text().splitlines():
        m = re.match(r"^(\s*)([A-Za-z_]\w*):(.*)$", line)
        if m:
            indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
            while stack and stack[-1][0] >= indent:
                stack.pop()
            dotted = ".".join([k for _, k in stack] + [key])
            stack.append((indent, key))
            comment = rest.split("#", 1)[1].strip() if "#" in rest else ""
            if comment:
                out[dotted] = comment
            last = dotted if comment else None
        elif last and line.strip().startswith("#") and line.startswith(" " * 20):
            out[last] += " " + line.strip().lstrip("#").strip()
        else:
            last = None
    return out


def _value(v) -> str:
    if v is None:
        return "`null`"
    if isinstance(v, bool):
        return f"`{str(v).lower()}`"
    if isinstance(v, dict):
        return "`{" + ", ".join(f"{k}: {x}" for k, x in v.items()) + "}`"
    return f"`{v}`"


def params_reference() -> str:
    import pipeline.params as params_module
    from pipeline.params import Params, yaml_load

    helps = _field_help(Path(params_module.__file__))
    shipped = yaml_load((REPO / "params.yaml").read_text())
    yaml_help = _yaml_comments(REPO / "params.yaml")
    out = [
        "Generated from the dataclasses in `pipeline/params.py` when the site is built. "
        "*Default* is the library's (a params.yaml without the key gets it); *params.yaml* "
        "is what the file in the repository sets: the CPU demo. Unknown keys and impossible "
        "values stop every command before any work (`seg params` checks the file).",
        "",
    ]

    def section(cls, prefix: str, shipped_part: dict | None) -> None:
        hints = typing.get_type_hints(cls)
        rows, nested = [], []
        for f in dataclasses.fields(cls):
            key = f"{prefix}.{f.name}"
            if dataclasses.is_dataclass(hints[f.name]):
                nested.append((hints[f.name], key, (shipped_part or {}).get(f.name)))
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            mine = (shipped_part or {}).get(f.name, default)
            said = [h for h in (helps.get((cls.__name__, f.name)),) if h]
            if key in yaml_help:
                said.append(f"params.yaml: {yaml_help[key]}")
            kind = str(f.type).replace("|", "or")
            rows.append(
                f"| `{key}` | {_cell(kind)} | {_cell(_value(default))} | "
                f"{_cell(_value(mine))} | {_cell('; '.join(said))} |"
            )
        out.extend([f"## `{prefix}`", ""])
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            out.extend([cls.__doc__.strip(), ""])
        out.extend(["| key | type | default | params.yaml | |", "|---|---|---|---|---|", *rows, ""])
        for sub, sub_key, sub_shipped in nested:
            section(sub, sub_key, sub_shipped)

    for f in dataclasses.fields(Params):
        section(typing.get_type_hints(Params)[f.name], f.name, shipped.get(f.name))
    return "\n".join(out)


# ----------------------------------------------------------------------------- results


def results_index() -> str:
    rows = ["| date | what was measured |", "|---|---|"]
    for path in sorted(RESULTS.glob("20*.md"), reverse=True):
        title = path.read_text().splitlines()[0].lstrip("# ").strip()
        rows.append(f"| {path.name[:10]} | [{_cell(title)}]({path.name}) |")
    return "\n".join(rows)

"""The docs do what they say: every shell block in docs/ runs, in the order of the site's
navigation, in one scratch clone of the project (docs/reference/docs.md says what the runner
changes to fit in minutes, and what the `<!-- docs-test: ... -->` comments mean).

The fast tests check the pages' form (every fence has a language, every comment is one the
runner knows) and that the synopsis blocks name only commands and options `seg` has; the slow
one runs the blocks and prints what it ran and what it skipped, by name, with the seconds.
"""

from __future__ import annotations

import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import tiny_params
from helpers import free_port
from test_dvc import _env

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
VENV = Path(sys.executable).parent.parent
RUN = ("bash", "sh", "shell")  # the fences the runner runs; the others are transcripts or data
BLOCK_TIMEOUT_S = 300
READY_TIMEOUT_S = 120
PREFECT_PORT = "127.0.0.1:4200"

FENCE = re.compile(r"^(\s*)```(.*)$")
ANNOTATION = re.compile(r"^<!-- docs-test: (.*) -->$")
KINDS = re.compile(r"^(needs|skip): (.+)$|^background (until-url|until-log) (.+)$|^synopsis$")


@dataclass
class Block:
    page: str  # relative to docs/
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    note: str | None  # the docs-test comment right above the fence

    @property
    def where(self) -> str:
        return f"docs/{self.page}:{self.line}"


def pages() -> list[str]:
    """The pages in the order of the site's navigation (mkdocs.yml), then any other page."""

    def walk(nav) -> list[str]:
        out: list[str] = []
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            out += walk(value) if isinstance(value, list) else [value]
        return out

    ordered = walk(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"])
    rest = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    return ordered + [p for p in rest if p not in ordered]


def blocks(page: str) -> list[Block]:
    lines = (DOCS / page).read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2).strip()
        end = next(
            j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"
        )  # the closing fence
        body = "\n".join(line.removeprefix(indent) for line in lines[i + 1 : end])
        above = lines[i - 1].strip() if i else ""
        note = ANNOTATION.match(above)
        out.append(Block(page, i + 1, lang, body, note.group(1) if note else None))
        i = end + 1
    return out


def all_blocks() -> list[Block]:
    return [b for page in pages() for b in blocks(page)]


# ----------------------------------------------------------------------------- the pages' form


def test_every_fence_names_its_language_and_every_note_is_known():
    """A fence without a language, or a docs-test comment the runner does not know (or that
    stands above no fence), would let a block escape the runner silently."""
    found = all_blocks()
    assert len([b for b in found if b.lang in RUN]) > 10, "the runner finds the pages' blocks"
    bare = [b.where for b in found if not b.lang]
    assert not bare, f"fences without a language: {bare}"
    unknown = [f"{b.where}: {b.note}" for b in found if b.note and not KINDS.match(b.note)]
    assert not unknown, f"docs-test comments the runner does not know: {unknown}"
    fenced = {(b.page, b.line - 1) for b in found if b.note}
    stray = [
        f"docs/{page}:{n}"
        for page in pages()
        for n, line in enumerate((DOCS / page).read_text().splitlines(), 1)
        if ANNOTATION.match(line.strip()) and (page, n) not in fenced
    ]
    assert not stray, f"docs-test comments not right above a fence: {stray}"


def _seg_options(command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}


def test_synopsis_blocks_name_only_real_commands_and_options():
    """The `seg` lines with placeholders (not run): each command, and each option they show,
    exists in typer's app."""
    from typer._click.core import Context

    sys.path.insert(0, str(DOCS))
    try:
        from hooks import seg_command
    finally:
        sys.path.remove(str(DOCS))
    root = seg_command()
    checked = 0
    for block in [b for b in all_blocks() if b.note == "synopsis"]:
        for line in block.text.splitlines():
            words = shlex.split(line.split("  #")[0])
            if not words or words[0] != "seg":
                continue
            command, rest = root, words[1:]
            while hasattr(command, "list_commands") and rest and not rest[0].startswith("-"):
                sub = command.get_command(Context(command, info_name="seg"), rest[0])
                assert sub is not None, f"{block.where}: no command {rest[0]!r} in {line!r}"
                command, rest = sub, rest[1:]
            for word in rest:
                option = word.strip("[]").split("=")[0]
                if option.startswith("-") and len(option) > 1:
                    assert option in _seg_options(command), f"{block.where}: {option} in {line!r}"
            checked += 1
    assert checked >= 15, checked


# ----------------------------------------------------------------------------- the runner


class PageShell:
    """One bash for a page, as a user's terminal: blocks run in order and share its state
    (cwd, exported variables, an activated venv); any failing command fails the block."""

    def __init__(self, page: str, proj: Path, env: dict, scratch: Path, port: int) -> None:
        self.proj, self.scratch, self.port, self.n = proj, scratch, port, 0
        self.name = page.removesuffix(".md").replace("/", "-")  # its blocks' files: NAME-N.sh
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"], cwd=proj, env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.background: list[tuple[int, Path, str]] = []

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _script(self, text: str) -> Path:
        self.n += 1
        path = self.scratch / f"{self.name}-{self.n}.sh"
        path.write_text(text.replace(PREFECT_PORT, f"127.0.0.1:{self.port}") + "\n")
        return path

    def run(self, block: Block) -> str:
        """Run a block in this shell (stdin from /dev/null: a command that reads it must not
        eat the next block); its output, or a failure naming the block."""
        script = self._script(block.text)
        end = f"__docs_block_{self.n}_done__"
        self.proc.stdin.write(f"set -eo pipefail; source {script} < /dev/null; echo {end}\n")
        self.proc.stdin.flush()
        out, deadline = [], time.monotonic() + BLOCK_TIMEOUT_S
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                pytest.fail(
                    f"{block.where}: over {BLOCK_TIMEOUT_S} s\n{block.text}\n{''.join(out)}"
                )
            if line is None:
                pytest.fail(
                    f"{block.where} failed\n--- block\n{block.text}\n--- output\n{''.join(out)}"
                )
            if line.strip() == end:
                return "".join(out)
            out.append(line)

    def start(self, block: Block, until: str, what: str) -> None:
        """Start a block in the background, in a session of its own, and wait until it is
        ready: `until-url` answers 200, or `until-log` text is in its output."""
        script = self._script(block.text)
        log, pid_file = script.with_suffix(".log"), script.with_suffix(".pid")
        self.proc.stdin.write(
            f"setsid bash -c 'set -eo pipefail; source {script}' < /dev/null > {log} 2>&1 & "
            f"echo $! > {pid_file}\n"
        )
        self.proc.stdin.flush()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not pid_file.is_file() or not pid_file.read_text().strip():
            time.sleep(0.1)
        pid = int(pid_file.read_text())
        self.background.append((pid, log, block.where))
        what = what.strip('"').replace(PREFECT_PORT, f"127.0.0.1:{self.port}")
        while True:
            if until == "until-url":
                try:
                    if httpx.get(what, timeout=2).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            elif what in log.read_text(errors="replace"):
                return
            if not _alive(pid):
                pytest.fail(f"{block.where}: exited before it was ready\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{block.where}: not ready in {READY_TIMEOUT_S} s\n{log.read_text()}")
            time.sleep(0.5)

    def close(self) -> None:
        """Stop the page's background blocks (Ctrl-C, as a user would; SIGTERM after 5 s),
        newest first, then the shell."""
        for pid, _, _ in reversed(self.background):
            for sig, wait in ((signal.SIGINT, 5), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                if not _alive(pid):
                    break
                _signal(pid, sig)
                deadline = time.monotonic() + wait
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.2)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _alive(pgid: int) -> bool:
    """Whether the background block's session still runs. A block started a moment ago may not
    have reached setsid yet: its process lives but no group has its id (CI once failed a block
    as exited, with an empty log, in that gap)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        try:
            stat = Path(f"/proc/{pgid}/stat").read_text()
        except FileNotFoundError:
            return False
        return stat.rpartition(")")[2].split()[0] != "Z"  # a zombie has exited
    return True


def _signal(pgid: int, sig: int) -> None:
    """`sig` to the block's session, or to its process while it has not reached setsid yet."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        try:
            os.kill(pgid, sig)
        except ProcessLookupError:
            pass


def _scratch_clone(path: Path) -> Path:
    """The working tree's files (tracked, and untracked but not ignored) in a new git
    repository, params.yaml scaled down, `.venv` this test's environment (never reinstalled:
    pyproject.toml and constraints.txt get an old mtime, so make finds .venv up to date)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
        check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, path / name)
    # 4 images a step: 2 a process where a page trains on 2 processes (BatchNorm needs 2)
    scaled = tiny_params(**{"train.batch_size": 4})
    (path / "params.yaml").write_text(yaml.safe_dump(scaled, sort_keys=False))
    (path / ".venv").symlink_to(VENV)
    old = time.mktime((2000, 1, 1, 0, 0, 0, 0, 0, -1))
    for name in ("pyproject.toml", "constraints.txt"):
        os.utime(path / name, (old, old))
    return path


def test_a_background_block_lives_from_its_start_and_is_dead_once_it_exits(tmp_path):
    """The runner starts a background block as `setsid bash -c ... &` and reads `$!`: right
    after, the block may not have reached setsid (no group has its id yet). It is alive then;
    one that has exited is not."""
    shell = subprocess.Popen(["bash"], stdin=subprocess.PIPE, text=True, start_new_session=True)
    started = []
    try:
        for i, cmd in enumerate(["sleep 30"] * 10 + ["true"] * 5):
            pid_file = tmp_path / f"{i}.pid"
            shell.stdin.write(f"setsid bash -c '{cmd}' < /dev/null > /dev/null 2>&1 & "
                              f"echo $! > {pid_file}\n")  # fmt: skip
            shell.stdin.flush()
            while not pid_file.is_file() or not pid_file.read_text().strip():
                time.sleep(0.001)
            pid = int(pid_file.read_text())
            started.append((cmd, pid))
            if cmd != "true":
                assert _alive(pid), f"block {i} ({cmd}) taken for dead right after its start"
        for cmd, pid in started:
            if cmd == "true":
                deadline = time.monotonic() + 10
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert not _alive(pid), f"{cmd} (pid {pid}) exited but is taken for alive"
    finally:
        for _, pid in started:
            _signal(pid, signal.SIGKILL)
        shell.stdin.close()
        shell.wait(timeout=10)


@pytest.mark.slow  # minutes: the tutorial end to end, scaled down; `make test-slow` (and CI)
@pytest.mark.e2e
def test_every_shell_block_in_the_docs_runs(scratch, request):
    base = scratch("docs")
    proj = _scratch_clone(base / "proj")
    home = base / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[user]\n\tname = t\n\temail = t@t\n")
    env = _env(home)
    # a user's fresh terminal: the venv is not on PATH until a block activates it
    env["PATH"] = os.pathsep.join(
        p for p in env["PATH"].split(os.pathsep) if Path(p) != VENV / "bin"
    )
    port = free_port()
    env.update(
        PREFECT_HOME=str(home / ".prefect"), PREFECT_SERVER_API_PORT=str(port),
        PREFECT_RUNNER_POLL_FREQUENCY="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )  # fmt: skip
    env.pop("PREFECT_API_URL", None)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "docs"]):
        subprocess.run(cmd, cwd=proj, env=env, check=True, capture_output=True)
    up_to_date = subprocess.run(["make", "-q", "install"], cwd=proj, env=env)
    assert up_to_date.returncode == 0, "make would reinstall .venv: the runner must not"
    ran, skipped, t0 = [], [], time.monotonic()
    for page in pages():
        runnable = [b for b in blocks(page) if b.lang in RUN]
        if not runnable:
            continue
        shell = PageShell(page, proj, env, base, port)
        try:
            for block in runnable:
                kind = KINDS.match(block.note) if block.note else None
                if kind and kind.group(1):
                    skipped.append(f"{block.where}: {kind.group(1)}: {kind.group(2)}")
                    continue
                started = time.monotonic()
                if kind and kind.group(3):
                    shell.start(block, kind.group(3), kind.group(4))
                else:
                    shell.run(block)
                ran.append(f"{block.where}: {time.monotonic() - started:.1f} s")
                print(f"ran {ran[-1]}", flush=True)
        finally:
            shell.close()
    took = time.monotonic() - t0
    report = [f"docs: {len(ran)} blocks ran in {took:.0f} s, {len(skipped)} skipped"]
    report += [f"  ran {r}" for r in ran] + [f"  skipped {s}" for s in skipped]
    request.config.docs_report = report  # conftest prints it after the run's summary
    # the demo ran end to end
    assert (proj / "outputs/eval/metrics.json").is_file()
    assert not socket_in_use(port), "a background block outlived its page"


def socket_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0

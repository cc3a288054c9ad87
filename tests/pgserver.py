"""A real PostgreSQL server on 127.0.0.1 for tests (a sweep's Optuna study that several hosts
share): Debian's `postgresql` package, started as the `postgres` user (initdb refuses root),
in a folder of its own, on a free port; a database `optuna` that the tests reach over TCP.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import free_port

BIN = Path("/usr/lib/postgresql/15/bin")


def _as_postgres(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
    run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    done = subprocess.run([*run_as, *cmd], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)}: {done.stdout}{done.stderr}"
    return done


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """`postgresql+psycopg://postgres@127.0.0.1:PORT/optuna`, for the session."""
    if not (BIN / "initdb").exists():
        pytest.skip(f"needs PostgreSQL 15 ({BIN}: Debian's postgresql package)")
    # a folder the postgres user owns (pytest's base temp is root's alone)
    home = Path(tempfile.mkdtemp(prefix="seg-pg-"))
    shutil.chown(home, "postgres", "postgres")
    data, port = home / "data", free_port()
    _as_postgres(str(BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E",
                 "UTF8")  # fmt: skip
    _as_postgres(
        str(BIN / "pg_ctl"), "-D", str(data), "-l", str(home / "log"), "-w", "-o",
        f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off", "start",
    )  # fmt: skip
    try:
        _as_postgres(str(BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                     "optuna")  # fmt: skip
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", str(BIN / "pg_ctl"), "-D", str(data),
                        "-m", "immediate", "stop"], capture_output=True, timeout=60)  # fmt: skip
        time.sleep(0.2)
        shutil.rmtree(home, ignore_errors=True)

"""One real `prefect server` per pytest run (the session fixture `prefect_server`, registered
in conftest.py), and the class that starts one, for a test that must stop and restart its own.

The server listens on a free loopback port, with its own home and SQLite database; a queued
run asks again for its deployment's slot every 2 s (Prefect's default: 30 s), to keep the
tests short. Tests on the shared server use names of their own (deployments, work pools).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import free_port, start, stop


class PrefectServer:
    """`prefect server start` on a fixed port and database, which a test may stop and start."""

    def __init__(self, home: Path, **settings: str) -> None:
        """`settings`: more of the server's environment (PREFECT_SERVER_API_AUTH_STRING)."""
        self.home, self.port, self.proc = home, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.settings = settings

    def start(self, timeout: float = 120) -> float:
        """Start it and wait until it is healthy; returns the seconds that took."""
        t0 = time.monotonic()
        env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.home / 'prefect.db'}",
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
            **self.settings,
        }  # fmt: skip
        env.pop("PREFECT_API_URL", None)
        log = self.home / "server.log"
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
               "--port", str(self.port), "--no-ui", "--analytics-off"]  # fmt: skip
        self.proc = start(cmd, self.home, env, log)
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"prefect server exited {self.proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > timeout:
                pytest.fail(f"prefect server not healthy after {timeout} s:\n{log.read_text()}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, signal.SIGTERM)


@pytest.fixture(scope="session")
def prefect_server(request, tmp_path_factory) -> Iterator[PrefectServer]:
    """The session's Prefect server, started by the first test that asks for it; its home is
    removed at the end unless a test failed (as conftest's `scratch` does)."""
    server = PrefectServer(tmp_path_factory.mktemp("prefect-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
        if request.session.testsfailed == 0:
            import shutil

            shutil.rmtree(server.home, ignore_errors=True)

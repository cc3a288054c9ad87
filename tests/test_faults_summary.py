"""benchmarks/faults.sh's verdict (benchmarks/faults_summary.py) on small real pytest runs:
a failed, skipped or never-run case is not survived, and the exit status says so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = """
import os, json, pytest

def _report(case, detail):
    test = os.environ["PYTEST_CURRENT_TEST"].split("::")[-1].split(" (")[0]
    with open(os.environ["SEG_FAULTS_REPORT"], "a") as f:
        f.write(json.dumps({"test": test, "case": case, "detail": detail}) + "\\n")

def test_measures_two_cases():
    _report("worker killed", "Crashed in 3 s")
    _report("machine lost", "Crashed in 71 s")

def test_plain_pass():
    pass

def test_fails():
    assert 1 == 2, "the run did not resume"

def test_needs_root():
    pytest.skip("needs root, for a tmpfs")

def test_not_run():
    pass

def test_crashes():
    if os.environ.get("CRASH"):
        os._exit(3)
"""


def _faults(tmp_path: Path, *pytest_args: str, crash: bool = False) -> tuple[str, int]:
    """faults.sh's two pytest calls and its summary, on the module CASES."""
    (tmp_path / "test_cases.py").write_text(CASES)
    report = tmp_path / "report.jsonl"
    report.write_text("")
    env = {"PATH": "/usr/bin:/bin", "SEG_FAULTS_REPORT": str(report)}
    if crash:
        env["CRASH"] = "1"
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_cases.py"]
    collected = subprocess.run(
        [*pytest, "--collect-only"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    (tmp_path / "collected.txt").write_text(collected.stdout)
    subprocess.run(
        [*pytest, "--junitxml=junit.xml", *pytest_args], cwd=tmp_path, env=env,
        capture_output=True, text=True,
    )  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/faults_summary.py"), "collected.txt",
         "junit.xml", str(report), "7"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    return done.stdout, done.returncode


def test_a_failed_skipped_or_deselected_case_is_not_survived(tmp_path):
    out, status = _faults(tmp_path, "--deselect", "test_cases.py::test_not_run")
    lines = out.splitlines()
    assert status == 1
    assert lines[:2] == [
        "survived: worker killed: Crashed in 3 s",
        "survived: machine lost: Crashed in 71 s",
    ]
    assert "survived: plain pass" in lines
    assert any(
        line.startswith("NOT survived: fails: AssertionError: the run did not") for line in lines
    )
    assert "NOT survived: needs root: did not run (needs root, for a tmpfs)" in lines
    assert "NOT survived: not run: did not run (see pytest.log)" in lines
    assert "survived: crashes" in lines
    assert lines[-1] == "4/7 faults survived"


def test_every_case_survived_exits_0(tmp_path):
    out, status = _faults(tmp_path, "-k", "not fails and not needs_root and not not_run")
    # the cases left out by -k were collected, so they count: only a run of all of them passes
    assert status == 1 and out.splitlines()[-1] == "4/7 faults survived"
    (tmp_path / "collected.txt").write_text(
        "\n".join(f"test_cases.py::{t}" for t in ("test_measures_two_cases", "test_plain_pass"))
    )
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/faults_summary.py"), "collected.txt",
         "junit.xml", "report.jsonl", "7"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "3/3 faults survived"


def test_a_crashed_pytest_leaves_every_case_not_survived(tmp_path):
    out, status = _faults(tmp_path, crash=True)
    assert status == 1
    assert not (tmp_path / "junit.xml").exists()
    assert out.splitlines()[-1] == "0/6 faults survived"  # six cases collected, none whole
    assert "NOT survived: plain pass: did not run (see pytest.log)" in out.splitlines()

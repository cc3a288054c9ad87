"""The last part of benchmarks/faults.sh: one line per fault case, "N/M faults survived" last,
and the exit status (0 only when every case collected ran and survived).

    python benchmarks/faults_summary.py COLLECTED JUNIT REPORT SECONDS

COLLECTED: the test ids `pytest --collect-only -q` listed (one per line; other lines are
ignored). JUNIT: pytest's --junitxml file (absent if pytest died before writing it). REPORT:
the SEG_FAULTS_REPORT lines the tests wrote (one JSON object a case: test, case, detail).
A case that was collected but did not run (skipped, deselected, or lost with a crashed
pytest) is not survived: a fault nobody tried is no fault survived.
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _words(name: str) -> str:
    return re.sub(r"^test_", "", name).replace("_", " ")


def summarize(
    collected: list[str], junit: Path, report: Path, seconds: int
) -> tuple[list[str], int]:
    """(the lines to print, the exit status)."""
    ids = [line.strip() for line in collected if "::" in line and not line.startswith(" ")]
    cases: dict[tuple[str, str], ET.Element] = {}
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            cases[(case.get("classname") or "", case.get("name") or "")] = case
    details: dict[str, list[str]] = {}
    if report.is_file():
        for line in report.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                details.setdefault(r["test"], []).append(f"{r['case']}: {r['detail']}")
    lines, survived, total = [], 0, 0
    for node in ids:
        path, _, name = node.partition("::")
        classname = path.removesuffix(".py").replace("/", ".")
        case = cases.get((classname, name))
        words = _words(name)
        if case is None:
            total += 1
            lines.append(f"NOT survived: {words}: did not run (see pytest.log)")
            continue
        skipped = case.find("skipped")
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        if skipped is not None:
            total += 1
            lines.append(f"NOT survived: {words}: did not run ({skipped.get('message')})")
        elif failure is not None:
            total += 1
            first = (failure.get("message") or "").strip().splitlines()
            lines.append(f"NOT survived: {words}: {first[0][:300] if first else 'see pytest.log'}")
        else:  # a test that measured several cases: a line for each
            said = details.get(name) or [words]
            lines += [f"survived: {line}" for line in said]
            survived += len(said)
            total += len(said)
    if not ids:
        lines.append("NOT survived: no case was collected (see pytest.log)")
    lines.append(f"({seconds} s in all)")
    lines.append(f"{survived}/{total} faults survived")
    return lines, 0 if ids and survived == total else 1


def main(argv: list[str]) -> int:
    collected, junit, report, seconds = argv
    lines, status = summarize(
        Path(collected).read_text().splitlines(), Path(junit), Path(report), int(seconds)
    )
    print("\n".join(lines))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env bash
# Every fault of the README's faults table, in a fresh clone on CPU (issue 17): one line per
# case, "N/N faults survived" last. About 15 minutes on 2 CPU cores, plus the install.
#
#   bash benchmarks/faults.sh                  # clone HEAD to a temporary folder, `make install` there
#   bash benchmarks/faults.sh --venv .venv     # reuse an installed environment instead
#
# The cases are the tests in tests/test_faults.py (resume lines, damaged checkpoints, file
# modes, a full disk on a tmpfs: needs root) and tests/test_flows_faults.py (a real Prefect
# server, process workers and dvc: a worker killed, a machine lost, a server restarted, and
# 20 queued runs in a row, which the test suite skips: SEG_FAULTS_LONG=1 here). Small params,
# amp off. Only committed changes are in the clone. Logs stay in $WORK (printed at the end).
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && git rev-parse --show-toplevel)
VENV=""
if [ "${1:-}" = "--venv" ]; then VENV=$(cd "$2" && pwd); fi
WORK=${WORK:-$(mktemp -d /tmp/faults.XXXXXX)}
CLONE=$WORK/clone
t0=$(date +%s)

git clone -q "$SRC" "$CLONE"
cd "$CLONE"
if [ -z "$VENV" ]; then
  make -s install PY="${PY:-python3}" > "$WORK/install.log" 2>&1 || { tail -20 "$WORK/install.log"; exit 1; }
  VENV=$CLONE/.venv
fi
echo "clone of $(git rev-parse --short HEAD) in $CLONE, environment $VENV ($(( $(date +%s) - t0 )) s)"

# the clone's own code first (a reused environment may have another checkout installed)
export PYTHONPATH=$CLONE PATH=$VENV/bin:$PATH
export SEG_FAULTS_LONG=1 SEG_FAULTS_REPORT=$WORK/report.jsonl
: > "$SEG_FAULTS_REPORT"
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -rA --junitxml="$WORK/junit.xml" \
  tests/test_faults.py tests/test_flows_faults.py > "$WORK/pytest.log" 2>&1
set -e

"$VENV/bin/python" - "$WORK/junit.xml" "$SEG_FAULTS_REPORT" "$(( $(date +%s) - t0 ))" <<'EOF'
import json
import re
import sys
import xml.etree.ElementTree as ET

junit, report, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
details: dict[str, list[str]] = {}
for line in open(report):
    r = json.loads(line)
    details.setdefault(r["test"], []).append(f"{r['case']}: {r['detail']}")
survived = total = skipped = 0
for case in ET.parse(junit).getroot().iter("testcase"):
    name = case.get("name")
    words = re.sub(r"^test_", "", name).replace("_", " ")
    said = details.get(name)
    if case.find("skipped") is not None:
        skipped += 1
        print(f"skipped: {words}: {case.find('skipped').get('message')}")
        continue
    total += 1
    failure = case.find("failure")
    if failure is None:
        failure = case.find("error")
    if failure is None:  # a test that measured several cases: a line for each
        for line in said or [words]:
            survived += 1
            print(f"survived: {line}")
        total += len(said or [words]) - 1
    else:
        first = (failure.get("message") or "").strip().splitlines()
        print(f"NOT survived: {words}: {first[0][:300] if first else 'see pytest.log'}")
print(f"({seconds} s in all" + (f"; {skipped} skipped" if skipped else "") + ")")
print(f"{survived}/{total} faults survived")
EOF
echo "logs: $WORK/pytest.log"

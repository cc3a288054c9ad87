#!/usr/bin/env bash
# Every fault of the faults table (docs/how-to/faults.md), in a fresh clone on CPU (issue 17):
# one line per case, "N/M faults survived" last. About 15 minutes on 2 CPU cores, plus the install.
#
#   bash benchmarks/faults.sh                  # clone HEAD to a temporary folder, `make install` there
#   bash benchmarks/faults.sh --venv .venv     # reuse an installed environment instead
#
# The cases are the tests in tests/test_faults.py (resume lines, damaged checkpoints, file
# modes, a full disk on a tmpfs: needs root) and tests/test_flows_faults.py (a real Prefect
# server, process workers and dvc: a worker killed, a machine lost, a server restarted, and
# 20 queued runs in a row, which the test suite skips: SEG_FAULTS_LONG=1 here). Small params,
# amp off. Only committed changes are in the clone. Logs stay in $WORK (printed at the end).
# Exits 1 unless every case collected ran and survived: a case that did not run (skipped, as
# the full disk is without root, or lost with a crashed pytest) counts as not survived.
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
"$VENV/bin/python" -m pytest -q -p no:cacheprovider --collect-only \
  tests/test_faults.py tests/test_flows_faults.py > "$WORK/collected.txt" 2>&1 || true
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -rA --junitxml="$WORK/junit.xml" \
  tests/test_faults.py tests/test_flows_faults.py > "$WORK/pytest.log" 2>&1
# every case collected must have run and survived: a skipped or lost one is not survived
"$VENV/bin/python" benchmarks/faults_summary.py "$WORK/collected.txt" "$WORK/junit.xml" \
  "$SEG_FAULTS_REPORT" "$(( $(date +%s) - t0 ))"
status=$?
set -e
echo "logs: $WORK/pytest.log"
exit $status

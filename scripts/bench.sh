#!/usr/bin/env bash
# The benchmark harness: every scenario against the real local servers, release build,
# fixed workloads (pgbench's TPC-B-like transactions, fixed counts and rates), baselines
# measured in the same run. Prints `BENCH <scenario> <metric> <value> <unit>` lines and
# writes the results table into BENCHMARKS.md (between the bench markers) with the date,
# machine and commit. Benchmarks are never part of the tests.
#
# Usage: scripts/bench.sh [--quick | --full]     (default --quick, about 3 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:---quick}
case $MODE in
  --quick)
    PUB_TXNS=20000 SUB_TXNS=10000 SECONDS_LOAD=20 CEILING_MSGS=10000
    RUNS="sqlite:causal:1 sqlite:key:1 pg:causal:1 pg:key:1 pg:causal:2 redis:causal:1 search:causal:1"
    SCALE_RUNS="pg:causal:1 pg:causal:2" ;;
  --full)
    PUB_TXNS=60000 SUB_TXNS=40000 SECONDS_LOAD=60 CEILING_MSGS=50000
    RUNS="sqlite:serial:1 sqlite:key:1 sqlite:causal:1 pg:serial:1 pg:key:1 pg:causal:1 pg:causal:1r pg:key:2 pg:causal:2 pg:causal:3 redis:causal:1 search:causal:1 mongo:causal:1"
    SCALE_RUNS="pg:causal:1 pg:causal:1r pg:causal:2 pg:causal:3" ;;
  *) echo "usage: $0 [--quick | --full]" >&2; exit 2 ;;
esac
./scripts/setup.sh >/dev/null
# Queues an interrupted earlier run left behind would still receive a copy of every
# benchmark message and slow the broker down.
for q in $(rabbitmqctl -q list_queues name 2>/dev/null | grep -E '^kausal\.bench-|^kausal\.ceiling' || true); do
  rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
done
cargo build --release --quiet --features search,mongo --bin kausal --example latency_probe --example broker_ceiling
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
started=$(date +%s)

# 1. Publisher catch-up vs Postgres's own decoding of the same backlog.
./scripts/bench-publish.sh "$PUB_TXNS" | tee -a "$OUT"
# 1b. The same for a MariaDB binlog backlog vs mariadb-binlog decoding it.
./scripts/bench-publish-mysql.sh "$PUB_TXNS" | tee -a "$OUT"
# The broker's ceiling for messages of the size the publisher sends under this load.
target/release/examples/broker_ceiling "$CEILING_MSGS" 2048 | tee -a "$OUT"
# 2-4. Subscriber apply catch-up per store/mode/workers, end-to-end latency, memory.
RUNS="$RUNS" SECONDS_LOAD="$SECONDS_LOAD" ./scripts/bench-subscribe.sh "$SUB_TXNS" | tee -a "$OUT"
# 2b. Scale-out on a low-contention workload (one random account per transaction).
RUNS="$SCALE_RUNS" WORKLOAD=independent ./scripts/bench-subscribe.sh "$SUB_TXNS" | tee -a "$OUT"
# 4. Memory during a 1M-row transaction, and 5. bootstrap of 1M rows (full mode only:
# they take minutes).
if [ "$MODE" = --full ]; then
  ./scripts/bench-memory.sh 1000000 | tee -a "$OUT"
  ./scripts/bench-bootstrap.sh 10 | tee -a "$OUT"
fi
elapsed=$(( $(date +%s) - started ))
echo "BENCH harness duration $elapsed s" | tee -a "$OUT"

# The results table, into BENCHMARKS.md.
python3 - "$OUT" "$MODE" <<'PY'
import re, subprocess, sys, datetime, os
lines = [l.split(None, 4) for l in open(sys.argv[1]) if l.startswith("BENCH ")]
mode = sys.argv[2].lstrip("-")
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
mem = next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))
table = [
    "<!-- bench:begin (written by scripts/bench.sh; edits here are overwritten) -->",
    f"Last run: `scripts/bench.sh --{mode}` on {datetime.date.today()}, commit {commit}"
    + (" (with uncommitted changes)" if dirty else "")
    + f", {os.cpu_count()} cores, {int(mem) // 1024 // 1024} GiB.",
    "",
    "| scenario | metric | value | unit |",
    "|---|---|---|---|",
]
for _, scenario, metric, value, *unit in lines:
    table.append(f"| {scenario} | {metric} | {value} | {(unit[0].strip() if unit else '')} |")
table.append("<!-- bench:end -->")
path = "BENCHMARKS.md"
text = open(path).read()
block = "\n".join(table)
if "<!-- bench:begin" in text:
    text = re.sub(r"<!-- bench:begin.*?<!-- bench:end -->", lambda _: block, text, flags=re.S)
else:
    text = text.replace("\n## ", "\n## Latest harness run\n\n" + block + "\n\n## ", 1)
open(path, "w").write(text)
print(f"results written to {path}")
PY

#!/usr/bin/env bash
# Bootstrap throughput: pgbench_accounts (1M rows at scale 10) into a fresh subscriber,
# SQLite and Postgres stores, while pgbench keeps updating the same table at a steady
# rate. Not a test; part of scripts/bench.sh --full.
# Usage: scripts/bench-bootstrap.sh [scale, default 10 (1M rows)]
# Environment: STORES (default "sqlite pg"), RATE (pgbench txn/s during it, default 200;
# 0: a quiet source, nothing writes),
# CHUNK_ROWS (default 2000), BOOT_LOG (RUST_LOG of `kausal bootstrap`, default warn; e.g.
# `warn,sqlx::query=debug` logs every store statement with its time into
# $BOOT_LOG_FILE, default /tmp/bench-bootstrap-<store>.log).
#
# bootstrap-catchup: `kausal bootstrap` timed from process start until it exits (every
# chunk applied and committed in the store). Baseline `raw_copy_rows_per_s`: `COPY
# pgbench_accounts TO STDOUT` through psql into /dev/null (the source's own read rate);
# `<store>_ratio` = ours / raw.
# Prints `BENCH <scenario> <metric> <value> <unit>` lines.
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${1:-10}
STORES=${STORES:-"sqlite pg"}
RATE=${RATE:-200}
CHUNK_ROWS=${CHUNK_ROWS:-2000}
DB=kausal_bench_boot
PSQL="psql -h 127.0.0.1 -U postgres -qAt"
cargo build --release --quiet --features search,mongo --bin kausal
BIN=target/release/kausal
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

$PSQL -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '$DB'" >/dev/null
$PSQL -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
pgbench -h 127.0.0.1 -U postgres -i -s "$SCALE" -q $DB 2>/dev/null
ROWS=$($PSQL -d $DB -c "SELECT count(*) FROM pgbench_accounts")
$PSQL -d $DB -c "ANALYZE pgbench_accounts"

t0=$(date +%s.%N)
$PSQL -d $DB -c "COPY pgbench_accounts TO STDOUT" > /dev/null
t1=$(date +%s.%N)
RAW=$(echo "$ROWS / ($t1 - $t0)" | bc -l)
printf 'BENCH bootstrap-catchup rows %d rows\n' "$ROWS"
printf 'BENCH bootstrap-catchup raw_copy_rows_per_s %.0f rows/s\n' "$RAW"

cat > "$WORK/pub.toml" <<TOML
namespace = "benchboot"
[source]
kind = "postgres"
url = "postgres://postgres@127.0.0.1:5432/$DB"
[broker]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
[checkpoint]
path = "$WORK/pub.checkpoint"
[[table]]
name = "pgbench_accounts"
columns = ["*"]
TOML
slot_active() { $PSQL -d $DB -c "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'kausal_benchboot' AND active"; }
RUST_LOG=warn $BIN publish --config "$WORK/pub.toml" & PUB=$!
until [ "$(slot_active)" = 1 ]; do sleep 0.2; done
# A steady writer on the same rows throughout.
WRITER=
if [ "$RATE" -gt 0 ]; then
  pgbench -h 127.0.0.1 -U postgres -n -c 2 -j 1 -R "$RATE" -T 3600 -b simple-update $DB >/dev/null 2>&1 & WRITER=$!
fi

for store in $STORES; do
  app="bench-boot-$store"
  rabbitmqctl -q delete_queue "kausal.$app" >/dev/null 2>&1 || true
  case $store in
    sqlite) url="sqlite://$WORK/$app.db" ;;
    pg)
      $PSQL -d postgres -c "DROP DATABASE IF EXISTS kausal_bench_boot_store WITH (FORCE)" -c "CREATE DATABASE kausal_bench_boot_store"
      url="postgres://postgres@127.0.0.1:5432/kausal_bench_boot_store" ;;
  esac
  cat > "$WORK/$app.toml" <<TOML
app = "$app"
[broker]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
[store]
url = "$url"
[[table]]
namespace = "benchboot"
name = "pgbench_accounts"
TOML
  t0=$(date +%s.%N)
  RUST_LOG=${BOOT_LOG:-warn} $BIN bootstrap --config "$WORK/$app.toml" --chunk-rows "$CHUNK_ROWS" \
    2> "${BOOT_LOG_FILE:-/tmp/bench-bootstrap-$store.log}" & P=$!
  RSS=0
  while kill -0 $P 2>/dev/null; do
    r=$(awk '/VmHWM/ {print int($2/1024)}' /proc/$P/status 2>/dev/null || echo 0)
    [ "${r:-0}" -gt "$RSS" ] && RSS=$r
    sleep 0.2
  done
  wait $P
  t1=$(date +%s.%N)
  if [ "$store" = sqlite ]; then
    # Keeps following, so the store can be compared with the source at the end.
    RUST_LOG=warn $BIN subscribe --config "$WORK/$app.toml" & FOLLOW=$!
    FOLLOWED="$WORK/$app.db"
    FOLLOWED_APP=$app
  fi
  RATE_OF=$(echo "$ROWS / ($t1 - $t0)" | bc -l)
  printf 'BENCH bootstrap-catchup %s_rows_per_s %.0f rows/s\n' "$store" "$RATE_OF"
  printf 'BENCH bootstrap-catchup %s_ratio %.2f x\n' "$store" "$(echo "$RATE_OF / $RAW" | bc -l)"
  printf 'BENCH memory subscriber_bootstrap_%s_peak_rss %d MiB\n' "$store" "$RSS"
  [ "$store" = sqlite ] || rabbitmqctl -q delete_queue "kausal.$app" >/dev/null 2>&1 || true
done
kill $WRITER 2>/dev/null || true
if [ -n "${FOLLOW:-}" ]; then
  # The acceptance check: once the writer stopped and the follower caught up, the SQLite
  # store holds exactly the source's rows, row by row.
  same() {
    python3 - "$DB" "$FOLLOWED" <<'PY'
import sqlite3, subprocess, sys
db, path = sys.argv[1], sys.argv[2]
query = "SELECT aid, bid, abalance, filler FROM pgbench_accounts ORDER BY aid"
source = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-qAt", "-F", "\t",
                         "-d", db, "-c", query], capture_output=True, text=True, check=True)
try:
    rows = sqlite3.connect(path).execute(query).fetchall()
except sqlite3.Error:
    sys.exit(1)
store = "".join("\t".join(str(v) for v in r) + "\n" for r in rows)
sys.exit(0 if store == source.stdout else 1)
PY
  }
  deadline=$((SECONDS + 600))
  until same; do
    [ $SECONDS -lt $deadline ] || { echo "bench-bootstrap: the SQLite store differs from the source" >&2; exit 1; }
    sleep 2
  done
  printf 'BENCH bootstrap-catchup sqlite_store_equals_source_rows %d rows\n' "$ROWS"
  kill -TERM $FOLLOW; wait $FOLLOW || true
  rabbitmqctl -q delete_queue "kausal.$FOLLOWED_APP" >/dev/null 2>&1 || true
fi
kill -TERM $PUB; wait $PUB || true
$PSQL -d postgres -c "SELECT pg_drop_replication_slot('kausal_benchboot')" >/dev/null 2>&1 || true
rabbitmqctl -q delete_queue kausal.control.benchboot >/dev/null 2>&1 || true
rabbitmqctl -q delete_queue kausal.control.benchboot.dlq >/dev/null 2>&1 || true

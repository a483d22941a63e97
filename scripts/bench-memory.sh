#!/usr/bin/env bash
# Memory during a 1M-row transaction: one INSERT of 1,000,000 rows, published (as 1,000
# parts) and applied by one subscriber into SQLite. Prints peak RSS of both processes
# and the time from commit to applied. Not a test; part of `scripts/bench.sh --full`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${1:-1000000}
DB=kausal_bench_mem
PSQL="psql -h 127.0.0.1 -U postgres -qAt"
cargo build --release --quiet --features search,mongo --bin kausal
BIN=target/release/kausal
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
$PSQL -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '$DB'" >/dev/null
$PSQL -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
$PSQL -d $DB -c "CREATE TABLE big (id bigint PRIMARY KEY, v text NOT NULL)"
cat > "$WORK/pub.toml" <<TOML
namespace = "benchmem"
[source]
kind = "postgres"
url = "postgres://postgres@127.0.0.1:5432/$DB"
[broker]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
[checkpoint]
path = "$WORK/pub.checkpoint"
[[table]]
name = "big"
columns = ["*"]
TOML
cat > "$WORK/sub.toml" <<TOML
app = "bench-mem"
[broker]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
[store]
url = "sqlite://$WORK/store.db"
[[table]]
namespace = "benchmem"
name = "big"
TOML
rabbitmqctl -q delete_queue kausal.bench-mem >/dev/null 2>&1 || true
RUST_LOG=warn $BIN subscribe --config "$WORK/sub.toml" & SUB=$!
until rabbitmqctl -q list_queues name | grep -qx kausal.bench-mem; do sleep 0.2; done
RUST_LOG=warn $BIN publish --config "$WORK/pub.toml" & PUB=$!
until [ "$($PSQL -d $DB -c "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'kausal_benchmem' AND active")" = 1 ]; do sleep 0.2; done
t0=$(date +%s.%N)
$PSQL -d $DB -c "INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, $ROWS) g"
until [ "$(python3 -c "import sqlite3,sys
try:
    print(sqlite3.connect('file:$WORK/store.db?mode=ro', uri=True).execute('SELECT COUNT(*) FROM kausal_applied').fetchone()[0] + sqlite3.connect('file:$WORK/store.db?mode=ro', uri=True).execute('SELECT COALESCE(MAX(through), 0) FROM kausal_progress').fetchone()[0])
except Exception:
    print(0)")" -ge 1 ]; do sleep 1; done
t1=$(date +%s.%N)
PUB_RSS=$(awk '/VmHWM/ {print int($2/1024)}' /proc/$PUB/status)
SUB_RSS=$(awk '/VmHWM/ {print int($2/1024)}' /proc/$SUB/status)
kill -TERM $PUB $SUB; wait $PUB $SUB || true
printf 'BENCH memory big_txn_rows %d rows\n' "$ROWS"
printf 'BENCH memory big_txn_publisher_peak_rss %d MiB\n' "$PUB_RSS"
printf 'BENCH memory big_txn_subscriber_peak_rss %d MiB\n' "$SUB_RSS"
printf 'BENCH memory big_txn_commit_to_applied %.1f s\n' "$(echo "$t1 - $t0" | bc -l)"
$PSQL -d postgres -c "SELECT pg_drop_replication_slot('kausal_benchmem')" >/dev/null 2>&1 || true
rabbitmqctl -q delete_queue kausal.bench-mem >/dev/null 2>&1 || true

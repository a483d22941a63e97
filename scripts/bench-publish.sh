#!/usr/bin/env bash
# Publisher catch-up on a pgbench backlog, with the raw decoding rate of the same backlog
# by Postgres itself (pg_recvlogical, pgoutput, to /dev/null) measured in the same run.
# Not a test. Usage: scripts/bench-publish.sh [transactions, default 20000]
# Prints `BENCH pg-publish-catchup <metric> <value> <unit>` lines.
set -euo pipefail
cd "$(dirname "$0")/.."
TXNS=${1:-20000}
CLIENTS=4
DB=kausal_bench
PSQL="psql -h 127.0.0.1 -U postgres -qAt"
cargo build --release --quiet --features search,mongo
BIN=target/release/kausal
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

$PSQL -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '$DB'" >/dev/null
$PSQL -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
pgbench -h 127.0.0.1 -U postgres -i -s 10 -q $DB 2>/dev/null
# pgbench_history has no key; Kausal publishes keyed rows only.
$PSQL -d $DB -c "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY"

cat > "$WORK/bench.toml" <<TOML
namespace = "bench"
[source]
kind = "postgres"
url = "postgres://postgres@127.0.0.1:5432/$DB"
[broker]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
[checkpoint]
path = "$WORK/bench.checkpoint"
# The end of the run is seen when the slot is confirmed, which happens at a checkpoint:
# a short interval keeps that from quantizing a one-second run.
interval_ms = 50
[[table]]
name = "pgbench_accounts"
columns = ["*"]
[[table]]
name = "pgbench_branches"
columns = ["*"]
[[table]]
name = "pgbench_tellers"
columns = ["*"]
[[table]]
name = "pgbench_history"
columns = ["*"]
TOML

slot_active() { $PSQL -d $DB -c "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'kausal_bench' AND active"; }
# First start creates slot and publication; then stop it and build the backlog.
RUST_LOG=warn $BIN publish --config "$WORK/bench.toml" & PUB=$!
until [ "$(slot_active)" = 1 ]; do sleep 0.2; done
kill -TERM $PUB; wait $PUB || true
$PSQL -d $DB -c "SELECT pg_create_logical_replication_slot('kausal_bench_raw', 'pgoutput')" >/dev/null
pgbench -h 127.0.0.1 -U postgres -n -c $CLIENTS -j 2 -t $((TXNS / CLIENTS)) $DB >/dev/null
END_LSN=$($PSQL -d $DB -c "SELECT pg_current_wal_lsn()")
ROWS=$((TXNS * 4))  # TPC-B-like: 3 updates + 1 insert per transaction

# Baseline: Postgres decoding the same backlog to /dev/null.
t0=$(date +%s.%N)
pg_recvlogical -h 127.0.0.1 -U postgres -d $DB --slot kausal_bench_raw --start \
  -o proto_version=1 -o publication_names=kausal_bench --endpos="$END_LSN" -f /dev/null
t1=$(date +%s.%N)
RAW=$(echo "$t1 - $t0" | bc -l)

# Kausal: start on the backlog, time until the slot is confirmed past its end (the
# publisher confirms only after RabbitMQ confirmed and the checkpoint is written).
confirmed() { $PSQL -d $DB -c "SELECT confirmed_flush_lsn >= '$END_LSN'::pg_lsn FROM pg_replication_slots WHERE slot_name = 'kausal_bench'"; }
$BIN tail --namespace bench --json > /dev/null 2>&1 & TAIL=$!
sleep 1
t0=$(date +%s.%N)
RUST_LOG=warn $BIN publish --config "$WORK/bench.toml" & PUB=$!
until [ "$(confirmed)" = t ]; do sleep 0.05; done
t1=$(date +%s.%N)
RSS=$(awk '/VmHWM/ {print int($2/1024)}' /proc/$PUB/status)
kill -TERM $PUB; wait $PUB || true
kill $TAIL 2>/dev/null || true
OURS=$(echo "$t1 - $t0" | bc -l)

printf 'BENCH pg-publish-catchup transactions %d txn\n' "$TXNS"
printf 'BENCH pg-publish-catchup raw_decode_rows_per_s %.0f rows/s\n' "$(echo "$ROWS / $RAW" | bc -l)"
printf 'BENCH pg-publish-catchup rows_per_s %.0f rows/s\n' "$(echo "$ROWS / $OURS" | bc -l)"
printf 'BENCH pg-publish-catchup txn_per_s %.0f txn/s\n' "$(echo "$TXNS / $OURS" | bc -l)"
printf 'BENCH pg-publish-catchup rows_per_s_ratio %.2f x\n' "$(echo "$RAW / $OURS" | bc -l)"
printf 'BENCH pg-publish-catchup publisher_peak_rss %d MiB\n' "$RSS"
$PSQL -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '$DB'" >/dev/null

#!/usr/bin/env bash
# Subscriber apply throughput on a backlog and end-to-end latency at a steady load.
# Not a test. Usage: scripts/bench-subscribe.sh [backlog transactions, default 40000]
#
# 1. subscriber-apply-catchup: a pgbench backlog (4 row changes per transaction) is
#    published into the queues of two subscriber apps while they are stopped; then each
#    starts alone (one worker process, causal mode) and we time until its queue is
#    empty (every message acked, i.e. applied). Stores: SQLite file, Postgres database.
#    The queue is polled with rabbitmqctl (about 0.5 s per poll: the error bound).
# 2. end-to-end-latency: publisher + subscriber (SQLite) running, pgbench at a fixed
#    rate for 30 s; the latency probe's callback records now - source commit time.
# Prints `BENCH <scenario> <metric> <value> <unit>` lines.
set -euo pipefail
cd "$(dirname "$0")/.."
TXNS=${1:-40000}
RATE=${RATE:-1000}
SECONDS_LOAD=${SECONDS_LOAD:-30}
DB=kausal_bench_sub
STORE_DB=kausal_bench_store
PSQL="psql -h 127.0.0.1 -U postgres -qAt"
cargo build --release --quiet --bin kausal --example latency_probe
BIN=target/release/kausal
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

$PSQL -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '$DB'" >/dev/null
$PSQL -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB" \
  -c "DROP DATABASE IF EXISTS $STORE_DB WITH (FORCE)" -c "CREATE DATABASE $STORE_DB"
pgbench -h 127.0.0.1 -U postgres -i -s 10 -q $DB 2>/dev/null
$PSQL -d $DB -c "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY"
for q in kausal.bench-sqlite kausal.bench-pg kausal.bench-latency; do
  rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
done

TABLES=""
for t in pgbench_accounts pgbench_branches pgbench_tellers pgbench_history; do
  TABLES+=$'[[table]]\n'"name = \"$t\""$'\ncolumns = ["*"]\n'
done
cat > "$WORK/pub.toml" <<TOML
namespace = "benchsub"
[source]
kind = "postgres"
url = "postgres://postgres@127.0.0.1:5432/$DB"
[broker]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
[checkpoint]
path = "$WORK/pub.checkpoint"
$TABLES
TOML
sub_config() { # app store-url
  local subs=""
  for t in pgbench_accounts pgbench_branches pgbench_tellers pgbench_history; do
    subs+=$'[[table]]\nnamespace = "benchsub"\n'"name = \"$t\""$'\n'
  done
  printf 'app = "%s"\n[broker]\nurl = "amqp://guest:guest@127.0.0.1:5672/%%2f"\n[store]\nurl = "%s"\n%s' "$1" "$2" "$subs"
}
sub_config bench-sqlite "sqlite://$WORK/store.db" > "$WORK/sqlite.toml"
sub_config bench-pg "postgres://postgres@127.0.0.1:5432/$STORE_DB" > "$WORK/pg.toml"
# The latency run has its own namespace (slot, checkpoint), started after the probe's
# queue exists, so the probe follows the stream from its first transaction.
sed -e 's/namespace = "benchsub"/namespace = "benchlat"/' -e "s#$WORK/pub.checkpoint#$WORK/lat.checkpoint#" \
  "$WORK/pub.toml" > "$WORK/lat-pub.toml"
sub_config bench-latency "sqlite://$WORK/latency.db" | sed 's/namespace = "benchsub"/namespace = "benchlat"/' > "$WORK/latency.toml"

depth() { rabbitmqctl -q list_queues name messages 2>/dev/null | awk -v q="$1" '$1 == q {print $2}'; }
# Declare both queues (a subscriber declares its queue at start), then stop them.
for app in sqlite pg; do
  RUST_LOG=warn $BIN subscribe --config "$WORK/$app.toml" & P=$!
  until [ -n "$(depth kausal.bench-$app)" ]; do sleep 0.2; done
  kill -TERM $P; wait $P || true
done

slot_active() { $PSQL -d $DB -c "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'kausal_benchsub' AND active"; }
RUST_LOG=warn $BIN publish --config "$WORK/pub.toml" & PUB=$!
until [ "$(slot_active)" = 1 ]; do sleep 0.2; done
pgbench -h 127.0.0.1 -U postgres -n -c 4 -j 2 -t $((TXNS / 4)) $DB >/dev/null
END_LSN=$($PSQL -d $DB -c "SELECT pg_current_wal_lsn()")
confirmed() { $PSQL -d $DB -c "SELECT confirmed_flush_lsn >= '$END_LSN'::pg_lsn FROM pg_replication_slots WHERE slot_name = 'kausal_benchsub'"; }
until [ "$(confirmed)" = t ]; do sleep 0.2; done
kill -TERM $PUB; wait $PUB || true
ROWS=$((TXNS * 4))
printf 'BENCH subscriber-apply-catchup backlog %d txn\n' "$TXNS"
printf 'BENCH subscriber-apply-catchup backlog_messages %s msg\n' "$(depth kausal.bench-sqlite)"

for app in sqlite pg; do
  t0=$(date +%s.%N)
  RUST_LOG=${SUB_LOG:-warn} $BIN subscribe --config "$WORK/$app.toml" 2> "${SUB_LOG_DIR:-$WORK}/$app.log" & P=$!
  until [ "$(depth kausal.bench-$app)" = 0 ]; do sleep 0.1; done
  t1=$(date +%s.%N)
  RSS=$(awk '/VmHWM/ {print int($2/1024)}' /proc/$P/status)
  kill -TERM $P; wait $P || true
  SECS=$(echo "$t1 - $t0" | bc -l)
  printf 'BENCH subscriber-apply-catchup %s_causal_rows_per_s %.0f rows/s\n' "$app" "$(echo "$ROWS / $SECS" | bc -l)"
  printf 'BENCH subscriber-apply-catchup %s_causal_txn_per_s %.0f txn/s\n' "$app" "$(echo "$TXNS / $SECS" | bc -l)"
  printf 'BENCH subscriber-apply-catchup %s_peak_rss %d MiB\n' "$app" "$RSS"
done

# Steady load: publisher and the latency probe running, pgbench at a fixed rate.
RUST_LOG=warn target/release/examples/latency_probe "$WORK/latency.toml" pgbench_history > "$WORK/latency.out" & PROBE=$!
until [ -n "$(depth kausal.bench-latency)" ]; do sleep 0.2; done
RUST_LOG=warn $BIN publish --config "$WORK/lat-pub.toml" & PUB=$!
until [ "$($PSQL -d $DB -c "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'kausal_benchlat' AND active")" = 1 ]; do sleep 0.2; done
sleep 2
pgbench -h 127.0.0.1 -U postgres -n -c 4 -j 2 -R "$RATE" -T "$SECONDS_LOAD" $DB >/dev/null
sleep 2
kill -TERM $PROBE; wait $PROBE || true
kill -TERM $PUB; wait $PUB || true
read -r _ COUNT _ P50 _ P95 _ P99 _ MAX < "$WORK/latency.out"
printf 'BENCH end-to-end-latency rate %d txn/s\n' "$RATE"
printf 'BENCH end-to-end-latency changes %d\n' "$COUNT"
printf 'BENCH end-to-end-latency p50 %s ms\nBENCH end-to-end-latency p95 %s ms\n' "$P50" "$P95"
printf 'BENCH end-to-end-latency p99 %s ms\nBENCH end-to-end-latency max %s ms\n' "$P99" "$MAX"
for slot in kausal_benchsub kausal_benchlat; do
  $PSQL -d postgres -c "SELECT pg_drop_replication_slot('$slot')" >/dev/null 2>&1 || true
done

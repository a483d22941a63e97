#!/usr/bin/env bash
# Publisher catch-up on a pgbench backlog, with the raw decoding rate of the same backlog
# by Postgres itself (pg_recvlogical, pgoutput, to /dev/null) measured in the same run.
# The publisher catches up twice from the same backlog (a copy of its slot and
# checkpoint): in wire format 2 (the default: the figures without a suffix) and in
# format 1 (`_format1`), each with the bytes per row change it put on the wire.
# Not a test. Usage: scripts/bench-publish.sh [transactions, default 20000]
# PROFILE=<file> records the format-2 catch-up with `perf record -g` into <file>.
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
[metrics]
listen = "127.0.0.1:19391"
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

# The same publisher writing format 1, on a copy of the slot and checkpoint.
sed -e 's/^listen = .*/listen = "127.0.0.1:19392"/' \
    -e "s|^path = .*|path = \"$WORK/f1.checkpoint\"|" \
    -e 's/^url = "postgres:.*/&\nslot = "kausal_bench_f1"/' "$WORK/bench.toml" > "$WORK/f1.toml"
# Top-level keys must stay before the first section.
{ grep -m1 '^namespace' "$WORK/f1.toml"; grep -v '^namespace' "$WORK/f1.toml"; printf '[tuning]\nwire_format = 1\n'; } > "$WORK/f1.tmp"
mv "$WORK/f1.tmp" "$WORK/f1.toml"

slot_active() { $PSQL -d $DB -c "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'kausal_bench' AND active"; }
# First start creates slot and publication; then stop it and build the backlog.
RUST_LOG=warn $BIN publish --config "$WORK/bench.toml" & PUB=$!
until [ "$(slot_active)" = 1 ]; do sleep 0.2; done
kill -TERM $PUB; wait $PUB || true
$PSQL -d $DB -c "SELECT pg_create_logical_replication_slot('kausal_bench_raw', 'pgoutput')" >/dev/null
$PSQL -d $DB -c "SELECT pg_copy_logical_replication_slot('kausal_bench', 'kausal_bench_f1')" >/dev/null
cp "$WORK/bench.checkpoint" "$WORK/f1.checkpoint"
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
# Waits in one session (a psql per poll would fork a backend each time and take a
# good part of this 2-core machine from the run it measures); the slot's row is read
# from shared memory on each call, not from a snapshot.
wait_confirmed() {
  $PSQL -d $DB -c "DO \$\$ BEGIN
    WHILE NOT COALESCE((SELECT confirmed_flush_lsn >= '$END_LSN'::pg_lsn
                        FROM pg_replication_slots WHERE slot_name = '$1'), false) LOOP
      PERFORM pg_sleep(0.01);
    END LOOP; END \$\$"
}
metric() { curl -s "http://$1/metrics" | awk -v m="$2" '$1 == m {print $2}'; }
# A consumer, as subscribers are: RabbitMQ stores and delivers every message. It only
# counts (decoding is the subscribers' work, on their own hosts).
# One worker thread: the probe takes less of the cores the publisher needs.
TOKIO_WORKER_THREADS=1 $BIN tail --namespace bench --count > /dev/null 2>&1 & TAIL=$!
sleep 1
# catch_up <config> <slot> <metrics address>: sets SECS, RSS, BYTES, CHANGES.
catch_up() {
  local t0 t1
  t0=$(date +%s.%N)
  RUST_LOG=warn $BIN publish --config "$1" & PUB=$!
  local perf=
  if [ -n "${PROFILE:-}" ] && [ "$2" = kausal_bench ]; then
    # The publisher only (the whole machine: -a instead of -p).
    perf record -F 999 -g -p $PUB -o "$PROFILE" >/dev/null 2>&1 & perf=$!
  fi
  wait_confirmed "$2"
  t1=$(date +%s.%N)
  if [ -n "$perf" ]; then kill -INT $perf; wait $perf || true; fi
  RSS=$(awk '/VmHWM/ {print int($2/1024)}' /proc/$PUB/status)
  sleep 1.2  # the metrics are copied from the publish loop once a second
  BYTES=$(metric "$3" kausal_publisher_bytes_published_total)
  CHANGES=$(metric "$3" kausal_publisher_changes_published_total)
  kill -TERM $PUB; wait $PUB || true
  SECS=$(echo "$t1 - $t0" | bc -l)
}
catch_up "$WORK/bench.toml" kausal_bench 127.0.0.1:19391
OURS=$SECS; BYTES2=$BYTES; CHANGES2=$CHANGES; RSS2=$RSS
catch_up "$WORK/f1.toml" kausal_bench_f1 127.0.0.1:19392
OURS1=$SECS; BYTES1=$BYTES; CHANGES1=$CHANGES
kill $TAIL 2>/dev/null || true

printf 'BENCH pg-publish-catchup transactions %d txn\n' "$TXNS"
printf 'BENCH pg-publish-catchup raw_decode_rows_per_s %.0f rows/s\n' "$(echo "$ROWS / $RAW" | bc -l)"
printf 'BENCH pg-publish-catchup rows_per_s %.0f rows/s\n' "$(echo "$ROWS / $OURS" | bc -l)"
printf 'BENCH pg-publish-catchup txn_per_s %.0f txn/s\n' "$(echo "$TXNS / $OURS" | bc -l)"
printf 'BENCH pg-publish-catchup rows_per_s_ratio %.2f x\n' "$(echo "$RAW / $OURS" | bc -l)"
printf 'BENCH pg-publish-catchup publisher_peak_rss %d MiB\n' "$RSS2"
printf 'BENCH pg-publish-catchup bytes_per_change %.0f bytes\n' "$(echo "$BYTES2 / $CHANGES2" | bc -l)"
printf 'BENCH pg-publish-catchup rows_per_s_format1 %.0f rows/s\n' "$(echo "$ROWS / $OURS1" | bc -l)"
printf 'BENCH pg-publish-catchup rows_per_s_ratio_format1 %.2f x\n' "$(echo "$RAW / $OURS1" | bc -l)"
printf 'BENCH pg-publish-catchup bytes_per_change_format1 %.0f bytes\n' "$(echo "$BYTES1 / $CHANGES1" | bc -l)"
$PSQL -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '$DB'" >/dev/null

#!/usr/bin/env bash
# The cost of signed messages (docs/security.md): the same pgbench backlog published by
# a publisher without and with signing (two slots created before the backlog, so both
# see it), and applied by a subscriber without and with verification (SQLite, one
# worker), all in one run. Not a test; part of scripts/bench.sh --full.
# Usage: [ORDER=plain|signed] scripts/bench-signing.sh [transactions, default 20000]
# Prints `BENCH signing <metric> <value> <unit>` lines.
set -euo pipefail
cd "$(dirname "$0")/.."
TXNS=${1:-20000}
DB=kausal_bench_sign
PSQL="psql -h 127.0.0.1 -U postgres -qAt"
cargo build --release --quiet --features search,mongo --bin kausal
BIN=target/release/kausal
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

$PSQL -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '$DB'" >/dev/null
$PSQL -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
pgbench -h 127.0.0.1 -U postgres -i -s 10 -q $DB 2>/dev/null
$PSQL -d $DB -c "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY"

KEYS=$($BIN keygen --key-id bench)
export KAUSAL_SIGN_KEY=$(sed -n 's/^KAUSAL_SIGN_KEY=//p' <<< "$KEYS")
PUBLIC=$(sed -n 's/.*"bench" = "\(.*\)" }$/\1/p' <<< "$KEYS")
TABLES=""
SUBS_PLAIN=""
SUBS_SIGNED=""
for t in pgbench_accounts pgbench_branches pgbench_tellers pgbench_history; do
  TABLES+=$'[[table]]\n'"name = \"$t\""$'\ncolumns = ["*"]\n'
  SUBS_PLAIN+=$'[[table]]\nnamespace = "signplain"\n'"name = \"$t\""$'\n'
  SUBS_SIGNED+=$'[[table]]\nnamespace = "signsigned"\n'"name = \"$t\""$'\n'
done
pub_config() { # namespace signing-section
  printf 'namespace = "%s"\n[source]\nkind = "postgres"\nurl = "postgres://postgres@127.0.0.1:5432/%s"\n[broker]\nurl = "amqp://guest:guest@127.0.0.1:5672/%%2f"\n[checkpoint]\npath = "%s/%s.checkpoint"\ninterval_ms = 50\n%s\n%s' \
    "$1" "$DB" "$WORK" "$1" "$2" "$TABLES"
}
pub_config signplain "" > "$WORK/plain.toml"
pub_config signsigned $'[signing]\nkey_id = "bench"' > "$WORK/signed.toml"
sub_config() { # app signing-section tables
  printf 'app = "%s"\n[broker]\nurl = "amqp://guest:guest@127.0.0.1:5672/%%2f"\n[store]\nurl = "sqlite://%s/%s.db"\n%s\n%s' \
    "$1" "$WORK" "$1" "$2" "$3"
}
sub_config bench-sign-plain "" "$SUBS_PLAIN" > "$WORK/sub-plain.toml"
sub_config bench-sign-verify $'[signing]\nkeys = { "bench" = "'"$PUBLIC"$'" }' "$SUBS_SIGNED" > "$WORK/sub-verify.toml"

slot_active() { $PSQL -d $DB -c "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '$1' AND active"; }
depth() { rabbitmqctl -q list_queues name messages 2>/dev/null | awk -v q="$1" '$1 == q {print $2}'; }
# Slots first (each publisher started once), queues next (each subscriber started once).
for ns in plain signed; do
  RUST_LOG=warn $BIN publish --config "$WORK/$ns.toml" & P=$!
  until [ "$(slot_active "kausal_sign$ns")" = 1 ]; do sleep 0.2; done
  kill -TERM $P; wait $P || true
done
for app in plain verify; do
  rabbitmqctl -q delete_queue "kausal.bench-sign-$app" >/dev/null 2>&1 || true
  RUST_LOG=warn $BIN subscribe --config "$WORK/sub-$app.toml" & P=$!
  until [ -n "$(depth "kausal.bench-sign-$app")" ]; do sleep 0.2; done
  kill -TERM $P; wait $P || true
done
pgbench -h 127.0.0.1 -U postgres -n -c 4 -j 2 -t $((TXNS / 4)) $DB >/dev/null
END_LSN=$($PSQL -d $DB -c "SELECT pg_current_wal_lsn()")
printf 'BENCH signing backlog %d txn\n' "$TXNS"

# Each pair (publish, then apply what it published) runs alone: the other pair's backlog
# is not sitting in the broker meanwhile. ORDER=signed runs the signed pair first, so
# that two runs in both orders show what the order itself does.
declare -A PUB_RATE SUB_RATE
ORDER=${ORDER:-plain}
PAIRS=$([ "$ORDER" = signed ] && echo "signed plain" || echo "plain signed")
for ns in $PAIRS; do
  app=$([ $ns = plain ] && echo plain || echo verify)
  confirmed() { $PSQL -d $DB -c "SELECT confirmed_flush_lsn >= '$END_LSN'::pg_lsn FROM pg_replication_slots WHERE slot_name = 'kausal_sign$ns'"; }
  t0=$(date +%s.%N)
  RUST_LOG=warn $BIN publish --config "$WORK/$ns.toml" & P=$!
  until [ "$(confirmed)" = t ]; do sleep 0.05; done
  t1=$(date +%s.%N)
  kill -TERM $P; wait $P || true
  PUB_RATE[$ns]=$(python3 -c "print(round($TXNS / ($t1 - $t0)))")
  printf 'BENCH signing publish_%s_txn_per_s %s txn/s\n' "$ns" "${PUB_RATE[$ns]}"

  db="$WORK/bench-sign-$app.db"
  t0=$(date +%s.%N)
  RUST_LOG=warn $BIN subscribe --config "$WORK/sub-$app.toml" & P=$!
  # Applied = compacted watermark + applied rows above it.
  until python3 - "$db" "sign$ns" "$TXNS" <<'PY'
import sqlite3, sys
try:
    c = sqlite3.connect('file:' + sys.argv[1] + '?mode=ro', uri=True, timeout=1)
    w = c.execute("SELECT COALESCE(MAX(through), 0) FROM kausal_progress WHERE namespace = ?", (sys.argv[2],)).fetchone()[0]
    n = c.execute("SELECT COUNT(*) FROM kausal_applied WHERE namespace = ? AND seq > ?", (sys.argv[2], w)).fetchone()[0]
    sys.exit(0 if w + n >= int(sys.argv[3]) else 1)
except Exception:
    sys.exit(1)
PY
  do sleep 0.2; done
  t1=$(date +%s.%N)
  kill -TERM $P; wait $P || true
  SUB_RATE[$app]=$(python3 -c "print(round($TXNS / ($t1 - $t0)))")
  printf 'BENCH signing apply_%s_txn_per_s %s txn/s\n' "$app" "${SUB_RATE[$app]}"
  dead=$(depth "kausal.bench-sign-$app.dlq")
  [ "${dead:-0}" = 0 ] || { echo "dead letters in kausal.bench-sign-$app.dlq: $dead" >&2; exit 1; }
done
printf 'BENCH signing publish_signed_vs_plain_ratio %s x\n' \
  "$(python3 -c "print(round(${PUB_RATE[signed]} / ${PUB_RATE[plain]}, 3))")"
printf 'BENCH signing apply_verified_vs_plain_ratio %s x\n' \
  "$(python3 -c "print(round(${SUB_RATE[verify]} / ${SUB_RATE[plain]}, 3))")"
for app in plain verify; do
  rabbitmqctl -q delete_queue "kausal.bench-sign-$app" >/dev/null 2>&1 || true
  rabbitmqctl -q delete_queue "kausal.bench-sign-$app.dlq" >/dev/null 2>&1 || true
done
$PSQL -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '$DB'" >/dev/null

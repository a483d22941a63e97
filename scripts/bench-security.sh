#!/usr/bin/env bash
# The cost of a security feature (docs/security.md), measured as a pair in one run: the
# same pgbench backlog published by a publisher without and with the feature (two slots
# created before the backlog, so both see it), and applied by a subscriber without and
# with it. Not a test.
#
#   signing  Ed25519-signed messages vs unsigned; subscribers verify vs not (SQLite store)
#   tls      every connection over TLS (source verify-full, amqps, Postgres store
#            verify-full) vs plaintext; needs scripts/setup.sh's test CA
#
# Usage: [ORDER=plain|on] scripts/bench-security.sh signing|tls [transactions, default 20000]
# Prints `BENCH <variant> <metric> <value> <unit>` lines.
set -euo pipefail
cd "$(dirname "$0")/.."
VARIANT=${1:?usage: scripts/bench-security.sh signing|tls [transactions]}
TXNS=${2:-20000}
DB=kausal_bench_$VARIANT
PSQL="psql -h 127.0.0.1 -U postgres -qAt"
cargo build --release --quiet --features search,mongo --bin kausal
BIN=target/release/kausal
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
CA=${KAUSAL_TLS_CA:-/etc/kausal/tls/ca.pem}
PLAIN_SOURCE="postgres://postgres@127.0.0.1:5432/$DB"
PLAIN_BROKER="amqp://guest:guest@127.0.0.1:5672/%2f"

# What the variant changes: publisher and subscriber config of the "on" side, where the
# subscribers store, and the names its figures are printed under (the signing names are
# those of the first recorded run).
case $VARIANT in
  signing)
    KEYS=$($BIN keygen --key-id bench)
    KAUSAL_SIGN_KEY=$(sed -n 's/^KAUSAL_SIGN_KEY=//p' <<< "$KEYS")
    export KAUSAL_SIGN_KEY
    PUBLIC=$(sed -n 's/.*"bench" = "\(.*\)" }$/\1/p' <<< "$KEYS")
    ON_SOURCE=$PLAIN_SOURCE ON_BROKER=$PLAIN_BROKER
    ON_PUB_EXTRA=$'[signing]\nkey_id = "bench"'
    ON_SUB_EXTRA=$'[signing]\nkeys = { "bench" = "'"$PUBLIC"$'" }'
    STORE=sqlite PUB_ON=signed SUB_ON=verify RATIO_PUB=signed RATIO_SUB=verified ;;
  tls)
    [ -r "$CA" ] || { echo "no test CA at $CA: run scripts/setup.sh" >&2; exit 1; }
    ON_SOURCE="postgres://postgres@localhost:5432/$DB?sslmode=verify-full&sslrootcert=$CA"
    ON_BROKER="amqps://guest:guest@localhost:5671/%2f?cacertfile=$CA"
    ON_PUB_EXTRA="" ON_SUB_EXTRA=""
    STORE=postgres PUB_ON=tls SUB_ON=tls RATIO_PUB=tls RATIO_SUB=tls ;;
  *) echo "unknown variant $VARIANT: signing or tls" >&2; exit 2 ;;
esac

$PSQL -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '$DB'" >/dev/null
$PSQL -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
pgbench -h 127.0.0.1 -U postgres -i -s 10 -q "$DB" 2>/dev/null
$PSQL -d "$DB" -c "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY"

TABLES=""
for t in pgbench_accounts pgbench_branches pgbench_tellers pgbench_history; do
  TABLES+=$'[[table]]\n'"name = \"$t\""$'\ncolumns = ["*"]\n'
done
subs() { for t in pgbench_accounts pgbench_branches pgbench_tellers pgbench_history; do
  printf '[[table]]\nnamespace = "%s"\nname = "%s"\n' "$1" "$t"; done; }
pub_config() { # namespace source broker extra
  printf 'namespace = "%s"\n[source]\nkind = "postgres"\nurl = "%s"\n[broker]\nurl = "%s"\n[checkpoint]\npath = "%s/%s.checkpoint"\ninterval_ms = 50\n%s\n%s' \
    "$1" "$2" "$3" "$WORK" "$1" "$4" "$TABLES"
}
store_url() { # app side
  if [ $STORE = sqlite ]; then echo "sqlite://$WORK/$1.db"
  elif [ "$2" = plain ]; then echo "postgres://postgres@127.0.0.1:5432/${1//-/_}"
  else echo "postgres://postgres@localhost:5432/${1//-/_}?sslmode=verify-full&sslrootcert=$CA"; fi
}
sub_config() { # app side broker namespace extra
  printf 'app = "%s"\n[broker]\nurl = "%s"\n[store]\nurl = "%s"\n%s\n%s' \
    "$1" "$3" "$(store_url "$1" "$2")" "$5" "$(subs "$4")"
}
P_NS=${VARIANT}plain O_NS=${VARIANT}on
P_APP=bench-$VARIANT-plain O_APP=bench-$VARIANT-on
pub_config "$P_NS" "$PLAIN_SOURCE" "$PLAIN_BROKER" "" > "$WORK/pub-plain.toml"
pub_config "$O_NS" "$ON_SOURCE" "$ON_BROKER" "$ON_PUB_EXTRA" > "$WORK/pub-on.toml"
sub_config "$P_APP" plain "$PLAIN_BROKER" "$P_NS" "" > "$WORK/sub-plain.toml"
sub_config "$O_APP" on "$ON_BROKER" "$O_NS" "$ON_SUB_EXTRA" > "$WORK/sub-on.toml"
if [ $STORE = postgres ]; then
  for app in $P_APP $O_APP; do
    $PSQL -d postgres -c "DROP DATABASE IF EXISTS ${app//-/_} WITH (FORCE)" -c "CREATE DATABASE ${app//-/_}"
  done
fi

slot_active() { $PSQL -d "$DB" -c "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '$1' AND active"; }
depth() { rabbitmqctl -q list_queues name messages 2>/dev/null | awk -v q="$1" '$1 == q {print $2}'; }
# Applied = compacted watermark + applied rows above it.
APPLIED_SQL="SELECT (SELECT COALESCE(MAX(through), 0) FROM kausal_progress WHERE namespace = '%s')
  + (SELECT COUNT(*) FROM kausal_applied WHERE namespace = '%s' AND seq > (SELECT COALESCE(MAX(through), 0) FROM kausal_progress WHERE namespace = '%s'))"
applied() { # app namespace
  local sql
  # shellcheck disable=SC2059
  sql=$(printf "$APPLIED_SQL" "$2" "$2" "$2")
  if [ $STORE = sqlite ]; then
    python3 -c 'import sqlite3,sys
try: print(sqlite3.connect("file:"+sys.argv[1]+"?mode=ro", uri=True, timeout=1).execute(sys.argv[2]).fetchone()[0])
except Exception: print(0)' "$WORK/$1.db" "$sql"
  else
    $PSQL -d "${1//-/_}" -c "$sql" 2>/dev/null || echo 0
  fi
}
# Slots first (each publisher started once), queues next (each subscriber started once).
for side in plain on; do
  ns=$([ "$side" = plain ] && echo "$P_NS" || echo "$O_NS")
  RUST_LOG=warn $BIN publish --config "$WORK/pub-$side.toml" & P=$!
  until [ "$(slot_active "kausal_$ns")" = 1 ]; do sleep 0.2; done
  kill -TERM $P; wait $P || true
done
for app in $P_APP $O_APP; do
  side=$([ "$app" = "$P_APP" ] && echo plain || echo on)
  rabbitmqctl -q delete_queue "kausal.$app" >/dev/null 2>&1 || true
  RUST_LOG=warn $BIN subscribe --config "$WORK/sub-$side.toml" & P=$!
  until [ -n "$(depth "kausal.$app")" ]; do sleep 0.2; done
  kill -TERM $P; wait $P || true
done
pgbench -h 127.0.0.1 -U postgres -n -c 4 -j 2 -t $((TXNS / 4)) "$DB" >/dev/null
END_LSN=$($PSQL -d "$DB" -c "SELECT pg_current_wal_lsn()")
printf 'BENCH %s backlog %d txn\n' "$VARIANT" "$TXNS"

# Each pair (publish, then apply what it published) runs alone: the other pair's backlog
# is not sitting in the broker meanwhile. ORDER=on runs the feature's pair first, so
# that two runs in both orders show what the order itself does.
declare -A PUB_RATE SUB_RATE
SIDES=$([ "${ORDER:-plain}" = plain ] && echo "plain on" || echo "on plain")
for side in $SIDES; do
  ns=$([ "$side" = plain ] && echo "$P_NS" || echo "$O_NS")
  app=$([ "$side" = plain ] && echo "$P_APP" || echo "$O_APP")
  confirmed() { $PSQL -d "$DB" -c "SELECT confirmed_flush_lsn >= '$END_LSN'::pg_lsn FROM pg_replication_slots WHERE slot_name = 'kausal_$ns'"; }
  t0=$(date +%s.%N)
  RUST_LOG=warn $BIN publish --config "$WORK/pub-$side.toml" & P=$!
  until [ "$(confirmed)" = t ]; do sleep 0.05; done
  t1=$(date +%s.%N)
  kill -TERM $P; wait $P || true
  PUB_RATE[$side]=$(python3 -c "print(round($TXNS / ($t1 - $t0)))")
  printf 'BENCH %s publish_%s_txn_per_s %s txn/s\n' "$VARIANT" \
    "$([ "$side" = plain ] && echo plain || echo $PUB_ON)" "${PUB_RATE[$side]}"

  t0=$(date +%s.%N)
  RUST_LOG=warn $BIN subscribe --config "$WORK/sub-$side.toml" & P=$!
  until [ "$(applied "$app" "$ns")" -ge "$TXNS" ]; do sleep 0.2; done
  t1=$(date +%s.%N)
  kill -TERM $P; wait $P || true
  SUB_RATE[$side]=$(python3 -c "print(round($TXNS / ($t1 - $t0)))")
  printf 'BENCH %s apply_%s_txn_per_s %s txn/s\n' "$VARIANT" \
    "$([ "$side" = plain ] && echo plain || echo $SUB_ON)" "${SUB_RATE[$side]}"
  dead=$(depth "kausal.$app.dlq")
  [ "${dead:-0}" = 0 ] || { echo "dead letters in kausal.$app.dlq: $dead" >&2; exit 1; }
done
printf 'BENCH %s publish_%s_vs_plain_ratio %s x\n' "$VARIANT" "$RATIO_PUB" \
  "$(python3 -c "print(round(${PUB_RATE[on]} / ${PUB_RATE[plain]}, 3))")"
printf 'BENCH %s apply_%s_vs_plain_ratio %s x\n' "$VARIANT" "$RATIO_SUB" \
  "$(python3 -c "print(round(${SUB_RATE[on]} / ${SUB_RATE[plain]}, 3))")"
for app in $P_APP $O_APP; do
  rabbitmqctl -q delete_queue "kausal.$app" >/dev/null 2>&1 || true
  rabbitmqctl -q delete_queue "kausal.$app.dlq" >/dev/null 2>&1 || true
  [ $STORE = sqlite ] || $PSQL -d postgres -c "DROP DATABASE IF EXISTS ${app//-/_} WITH (FORCE)"
done
$PSQL -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '$DB'" >/dev/null

#!/usr/bin/env bash
# Subscriber apply throughput on a backlog, per store / ordering mode / worker count, and
# end-to-end latency at a steady load. Not a test; part of scripts/bench.sh.
# Usage: scripts/bench-subscribe.sh [backlog transactions, default 40000]
# Environment: RUNS (default "sqlite:causal:1 sqlite:key:1 pg:causal:1 pg:key:1
# pg:causal:2"; each <store>:<mode>:<worker processes>, 2+ workers share Redis; store
# `redis` is the Redis cache sink, `search` the tantivy index of pgbench_history, `mongo`
# the MongoDB sink (MONGO_URL, default nx-27017 on 127.0.0.1:27017), each with a SQLite
# file for the bookkeeping only),
# RATE (1000 txn/s), SECONDS_LOAD (60); WORKLOAD (`tpcb`, pgbench's own transactions,
# or `independent`: each transaction updates one random account, so almost no two
# depend on each other); SKIP_LATENCY=1 leaves out part 2. A worker count with an `r`
# (`1r`) runs that many processes with Redis coordination too; 2+ always use Redis, with
# the default 8 partition queues. Multi-process runs into Postgres also print CPU
# seconds per process and, from the workers' status rows, messages, store commits and
# Redis round trips per transaction.
#
# 1. subscriber-apply-catchup: a pgbench backlog (4 row changes per transaction) is
#    published into the queues of stopped subscriber apps, one app per run; then each
#    starts alone and is timed until its store has recorded every transaction as
#    applied (committed), polled every 0.2 s (a psql or python process per poll: polling faster measurably slows the run).
# 2. end-to-end-latency: publisher + subscriber (SQLite) running, pgbench at a fixed
#    rate; the latency probe's callback records now - source commit time. Then again
#    with `callbacks.chain = true` (end-to-end-latency-chained).
# Prints `BENCH <scenario> <metric> <value> <unit>` lines.
set -euo pipefail
cd "$(dirname "$0")/.."
TXNS=${1:-40000}
RATE=${RATE:-1000}
SECONDS_LOAD=${SECONDS_LOAD:-60}
RUNS=${RUNS:-"sqlite:causal:1 sqlite:key:1 pg:causal:1 pg:key:1 pg:causal:2"}
WORKLOAD=${WORKLOAD:-tpcb}
case $WORKLOAD in
  tpcb) NS=benchsub; ROWS_PER_TXN=4; TAG="" ;;
  independent) NS=benchind; ROWS_PER_TXN=1; TAG="independent_" ;;
  *) echo "WORKLOAD is tpcb or independent" >&2; exit 2 ;;
esac
DB=kausal_bench_sub
PSQL="psql -h 127.0.0.1 -U postgres -qAt"
cargo build --release --quiet --features search,mongo --bin kausal --example latency_probe
BIN=${BIN:-target/release/kausal}  # BIN=<wrapper> e.g. to run it under perf
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

$PSQL -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '$DB'" >/dev/null
$PSQL -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
pgbench -h 127.0.0.1 -U postgres -i -s 10 -q $DB 2>/dev/null
$PSQL -d $DB -c "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY"

TABLES=""
for t in pgbench_accounts pgbench_branches pgbench_tellers pgbench_history; do
  TABLES+=$'[[table]]\n'"name = \"$t\""$'\ncolumns = ["*"]\n'
done
cat > "$WORK/pub.toml" <<TOML
namespace = "$NS"
[source]
kind = "postgres"
url = "postgres://postgres@127.0.0.1:5432/$DB"
[broker]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
[checkpoint]
path = "$WORK/pub.checkpoint"
$TABLES
TOML
sub_config() { # app store-url mode workers namespace [redis]
  local subs="" coord=""
  for t in pgbench_accounts pgbench_branches pgbench_tellers pgbench_history; do
    subs+=$'[[table]]\n'"namespace = \"$5\""$'\n'"name = \"$t\""$'\n'
    # A Redis cache or search index run: the SQLite store keeps only the bookkeeping.
    case ${6:-} in redis | search | mongo) subs+=$'mode = "none"\n' ;; esac
  done
  if [ "${6:-}" = redis ]; then
    subs+=$'[[sink]]\nkind = "redis"\nurl = "redis://127.0.0.1:6379"\n'"prefix = \"benchcache$$\""$'\n'
  fi
  if [ "${6:-}" = mongo ]; then
    subs+=$'[[sink]]\nkind = "mongo"\n'"url = \"${MONGO_URL:-mongodb://127.0.0.1:27017}\""$'\n'"database = \"bench_$1\""$'\n'
  fi
  if [ "${6:-}" = search ]; then
    subs+=$'[[sink]]\nkind = "search"\n'"path = \"$WORK/$1.index\""$'\ntable = "pgbench_history"\ntext = ["filler"]\nkeyword = ["aid", "tid", "bid"]\nnumber = ["delta"]\n'
  fi
  if [ "${4%r}" -gt 1 ] || [ "${4%r}" != "$4" ]; then
    coord=$'[coordination]\nkind = "redis"\nurl = "redis://127.0.0.1:6379"\n'"prefix = \"bench$$\""$'\n'
  fi
  # PARTITIONS=<n>: the app's partition queues (default: 8 with Redis, 1 without).
  local parts=""
  [ -n "${PARTITIONS:-}" ] && parts="partitions = $PARTITIONS"$'\n'
  # PREFETCH=<n>: broker.prefetch (default 256, split over the partitions, 32 at least).
  [ -n "${PREFETCH:-}" ] && parts+="prefetch = $PREFETCH"$'\n'
  printf 'app = "%s"\n[broker]\nurl = "amqp://guest:guest@127.0.0.1:5672/%%2f"\n%s[store]\nurl = "%s"\n[ordering]\nmode = "%s"\n%s%s' \
    "$1" "$parts" "$2" "$3" "$coord" "$subs"
}
depth() { rabbitmqctl -q list_queues name messages 2>/dev/null | awk -v q="$1" '$1 == q {print $2}'; }
# Transactions of namespace benchsub a store has applied (compacted watermark plus the
# applied rows above it): a cheap poll, read from the store the subscriber commits to.
APPLIED_SQL="SELECT COALESCE((SELECT MAX(through) FROM kausal_progress WHERE namespace = '$NS'), 0) + (SELECT COUNT(*) FROM kausal_applied WHERE namespace = '$NS' AND seq > COALESCE((SELECT MAX(through) FROM kausal_progress WHERE namespace = '$NS'), 0))"
# One long-lived poller per run (a psql or python process per poll costs ~20 ms of CPU
# and measurably slows the run it measures).
start_poller() { # store-url
  case $1 in
    sqlite://*) coproc POLL { python3 -u -c "import sqlite3,sys
for line in sys.stdin:
    if line.startswith(chr(92)):
        continue
    try:
        c = sqlite3.connect('file:' + sys.argv[1] + '?mode=ro', uri=True, timeout=1)
        print(c.execute(line.strip().rstrip(';')).fetchone()[0]); c.close()
    except Exception:
        print(0)
    print('END')" "${1#sqlite://}"; } ;;
    postgres://*) coproc POLL { psql "$1" -qAt 2>/dev/null; } ;;
  esac
}
applied() {
  printf '%s;\n\\echo END\n' "$APPLIED_SQL" >&"${POLL[1]}"
  local n=0 line
  while read -r line <&"${POLL[0]}"; do
    [ "$line" = END ] && break
    [[ $line =~ ^[0-9]+$ ]] && n=$line
  done
  echo "$n"
}

# One app (queue, store) per run; declare every queue (a worker declares it at start).
i=0
FIRST_APP=""
for run in $RUNS; do
  IFS=: read -r store mode workers <<< "$run"
  i=$((i + 1))
  app="bench-$TAG$i-$store-$mode-$workers"
  FIRST_APP=${FIRST_APP:-$app}
  for q in $(rabbitmqctl -q list_queues name 2>/dev/null | grep -E "^kausal\.$app(\.|$)" || true); do
    rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
  done
  case $store in
    sqlite | redis | search | mongo) url="sqlite://$WORK/$app.db" ;;
    pg)
      $PSQL -d postgres -c "DROP DATABASE IF EXISTS kausal_bench_store_$i WITH (FORCE)" -c "CREATE DATABASE kausal_bench_store_$i"
      url="postgres://postgres@127.0.0.1:5432/kausal_bench_store_$i" ;;
  esac
  sub_config "$app" "$url" "$mode" "$workers" "$NS" "$store" > "$WORK/$app.toml"
  echo "$url" > "$WORK/$app.url"
  RUST_LOG=warn $BIN subscribe --config "$WORK/$app.toml" & P=$!
  until [ -n "$(depth "kausal.$app")" ]; do sleep 0.2; done
  kill -TERM $P; wait $P || true
done
redis-cli --scan --pattern "bench$$:*" | xargs -r redis-cli del >/dev/null

slot_active() { $PSQL -d $DB -c "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '$1' AND active"; }
RUST_LOG=warn $BIN publish --config "$WORK/pub.toml" & PUB=$!
until [ "$(slot_active kausal_$NS)" = 1 ]; do sleep 0.2; done
if [ "$WORKLOAD" = independent ]; then
  printf '\\set aid random(1, 100000 * :scale)\nUPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n' > "$WORK/independent.sql"
  pgbench -h 127.0.0.1 -U postgres -n -c 4 -j 2 -t $((TXNS / 4)) -f "$WORK/independent.sql" $DB >/dev/null
else
  pgbench -h 127.0.0.1 -U postgres -n -c 4 -j 2 -t $((TXNS / 4)) $DB >/dev/null
fi
END_LSN=$($PSQL -d $DB -c "SELECT pg_current_wal_lsn()")
confirmed() { $PSQL -d $DB -c "SELECT confirmed_flush_lsn >= '$END_LSN'::pg_lsn FROM pg_replication_slots WHERE slot_name = 'kausal_$NS'"; }
until [ "$(confirmed)" = t ]; do sleep 0.2; done
kill -TERM $PUB; wait $PUB || true
ROWS=$((TXNS * ROWS_PER_TXN))
printf 'BENCH subscriber-apply-catchup %sbacklog %d txn\n' "$TAG" "$TXNS"
BACKLOG_MSGS=0
for q in $(rabbitmqctl -q list_queues name 2>/dev/null | grep -E "^kausal\.$FIRST_APP(\.p[0-9]+)?$" || true); do
  BACKLOG_MSGS=$((BACKLOG_MSGS + $(depth "$q")))
done
printf 'BENCH subscriber-apply-catchup %sbacklog_messages %s msg\n' "$TAG" "$BACKLOG_MSGS"

declare -A RATE_OF
i=0
for run in $RUNS; do
  IFS=: read -r store mode workers <<< "$run"
  i=$((i + 1))
  app="bench-$TAG$i-$store-$mode-$workers"
  t0=$(date +%s.%N)
  PIDS=()
  for _ in $(seq "${workers%r}"); do
    RUST_LOG=${SUB_LOG:-warn} $BIN subscribe --config "$WORK/$app.toml" 2>> "${SUB_LOG_DIR:-$WORK}/$app.log" & PIDS+=($!)
  done
  start_poller "$(cat "$WORK/$app.url")"
  until [ "$(applied)" -ge "$TXNS" ]; do sleep 0.1; done
  t1=$(date +%s.%N)
  exec {POLL[1]}>&-
  wait "$POLL_PID" 2>/dev/null || true
  RSS=0
  CPU=""
  for p in "${PIDS[@]}"; do
    r=$(awk '/VmHWM/ {print int($2/1024)}' /proc/$p/status)
    [ "$r" -gt "$RSS" ] && RSS=$r
    # utime + stime, in clock ticks (fields 14 and 15 of /proc/<pid>/stat).
    CPU+="$(awk -v hz="$(getconf CLK_TCK)" '{printf "%.1f", ($14 + $15) / hz}' /proc/$p/stat) "
  done
  name="${TAG}${store}_${mode}_${workers}w"
  if [ "$store" = pg ] && [ "${workers%r}" != "$workers" -o "${workers%r}" -gt 1 ]; then
    # The workers' counters, from their status rows (written every 2 s).
    sleep 2.5
    $PSQL "$(cat "$WORK/$app.url")" -c "SELECT body FROM kausal_workers" | python3 -c "
import sys, json
rows = [json.loads(l) for l in sys.stdin if l.strip()]
t = $TXNS
for k, label in (('messages', 'messages'), ('store_commits', 'store_commits'), ('coord_round_trips', 'redis_round_trips')):
    print('BENCH subscriber-apply-catchup $name' + '_' + label + '_per_txn %.4f x' % (sum(r.get(k, 0) for r in rows) / t))
print('BENCH subscriber-apply-catchup $name' + '_partitions_per_worker %s' % '/'.join(str(len(r.get('partitions', []))) for r in rows))
"
  fi
  kill -TERM "${PIDS[@]}"; wait "${PIDS[@]}" || true
  SECS=$(echo "$t1 - $t0" | bc -l)
  printf 'BENCH subscriber-apply-catchup %s_cpu_s_per_process %s s\n' "$name" "$(echo $CPU | tr ' ' '/')"
  RATE_OF[$name]=$(echo "$ROWS / $SECS" | bc -l)
  printf 'BENCH subscriber-apply-catchup %s_rows_per_s %.0f rows/s\n' "$name" "${RATE_OF[$name]}"
  printf 'BENCH subscriber-apply-catchup %s_txn_per_s %.0f txn/s\n' "$name" "$(echo "$TXNS / $SECS" | bc -l)"
  printf 'BENCH memory subscriber_%s_peak_rss %d MiB\n' "$name" "$RSS"
done
# Scale-out: 2 processes against 1, same store, mode and workload.
for store in sqlite pg; do
  for mode in causal key; do
    one=${RATE_OF[${TAG}${store}_${mode}_1w]:-}
    for w in 1r 2 3; do
      r=${RATE_OF[${TAG}${store}_${mode}_${w}w]:-}
      if [ -n "$one" ] && [ -n "$r" ]; then
        printf 'BENCH subscriber-apply-catchup %s%s_%s_%sw_vs_1w_ratio %.2f x\n' "$TAG" "$store" "$mode" "$w" "$(echo "$r / $one" | bc -l)"
      fi
    done
  done
done
if [ "$WORKLOAD" != tpcb ]; then
  for slot in kausal_$NS; do
    $PSQL -d postgres -c "SELECT pg_drop_replication_slot('$slot')" >/dev/null 2>&1 || true
  done
  i=0
  for run in $RUNS; do
    i=$((i + 1))
    for q in $(rabbitmqctl -q list_queues name 2>/dev/null | grep -E "^kausal\.bench-$TAG$i-" || true); do
      rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
    done
    $PSQL -d postgres -c "DROP DATABASE IF EXISTS kausal_bench_store_$i WITH (FORCE)" >/dev/null 2>&1 || true
  done
  exit 0
fi
# The stores' own limits for rows of this shape, measured now (same run, same servers).
LIMITS=$(./scripts/bench-store-limit.sh "$ROWS")
echo "$LIMITS"
for store in sqlite pg; do
  limit=$(echo "$LIMITS" | awk -v m="${store}_upsert_rows_per_s" '$3 == m {print $4}')
  for mode in causal key serial; do
    r=${RATE_OF[${store}_${mode}_1w]:-}
    if [ -n "$r" ] && [ -n "$limit" ]; then
      printf 'BENCH subscriber-apply-catchup %s_%s_1w_vs_store_upsert_ratio %.2f x\n' "$store" "$mode" "$(echo "$r / $limit" | bc -l)"
    fi
  done
done
for store in sqlite pg; do
  for w in 1 2; do
    c=${RATE_OF[${store}_causal_${w}w]:-}
    k=${RATE_OF[${store}_key_${w}w]:-}
    if [ -n "$c" ] && [ -n "$k" ]; then
      printf 'BENCH subscriber-apply-catchup %s_%sw_causal_vs_key_ratio %.2f x\n' "$store" "$w" "$(echo "$c / $k" | bc -l)"
    fi
  done
done

# Steady load: a fresh namespace (slot, checkpoint) started after the probe's queue
# exists, so the probe follows the stream from its first transaction. Twice: callbacks
# as configured by default (each link of a dependency chain its own commit), and with
# `callbacks.chain = true` (the probe reads nothing from the store, so it may).
latency_run() { # scenario extra-config
  local ns=benchlat$2
  sed -e "s/namespace = \"benchsub\"/namespace = \"$ns\"/" -e "s#$WORK/pub.checkpoint#$WORK/$ns.checkpoint#" \
    "$WORK/pub.toml" > "$WORK/lat-pub.toml"
  { sub_config bench-latency "sqlite://$WORK/$ns.db" causal 1 "$ns"; [ -n "$2" ] && printf '[callbacks]\nchain = true\n'; } > "$WORK/latency.toml"
  rabbitmqctl -q delete_queue kausal.bench-latency >/dev/null 2>&1 || true
  RUST_LOG=warn target/release/examples/latency_probe "$WORK/latency.toml" pgbench_history > "$WORK/latency.out" & PROBE=$!
  until [ -n "$(depth kausal.bench-latency)" ]; do sleep 0.2; done
  RUST_LOG=warn $BIN publish --config "$WORK/lat-pub.toml" & PUB=$!
  until [ "$(slot_active "kausal_$ns")" = 1 ]; do sleep 0.2; done
  sleep 2
  pgbench -h 127.0.0.1 -U postgres -n -c 4 -j 2 -R "$RATE" -T "$SECONDS_LOAD" $DB >/dev/null
  sleep 2
  PROBE_RSS=$(awk '/VmHWM/ {print int($2/1024)}' /proc/$PROBE/status)
  PUB_RSS=$(awk '/VmHWM/ {print int($2/1024)}' /proc/$PUB/status)
  kill -TERM $PROBE; wait $PROBE || true
  kill -TERM $PUB; wait $PUB || true
  read -r _ COUNT _ P50 _ P95 _ P99 _ MAX < "$WORK/latency.out"
  printf 'BENCH %s rate %d txn/s\n' "$1" "$RATE"
  printf 'BENCH %s callbacks %d\n' "$1" "$COUNT"
  printf 'BENCH %s p50 %s ms\nBENCH %s p95 %s ms\n' "$1" "$P50" "$1" "$P95"
  printf 'BENCH %s p99 %s ms\nBENCH %s max %s ms\n' "$1" "$P99" "$1" "$MAX"
  $PSQL -d postgres -c "SELECT pg_drop_replication_slot('kausal_$ns')" >/dev/null 2>&1 || true
}
redis-cli --scan --pattern "benchcache$$:*" | xargs -r redis-cli unlink >/dev/null
if [ -z "${SKIP_LATENCY:-}" ]; then
  latency_run end-to-end-latency ""
  printf 'BENCH memory latency_subscriber_peak_rss %d MiB\nBENCH memory latency_publisher_peak_rss %d MiB\n' "$PROBE_RSS" "$PUB_RSS"
  latency_run end-to-end-latency-chained chained
fi
for slot in kausal_benchsub; do
  $PSQL -d postgres -c "SELECT pg_drop_replication_slot('$slot')" >/dev/null 2>&1 || true
done
i=0
for run in $RUNS; do
  i=$((i + 1))
  for q in $(rabbitmqctl -q list_queues name 2>/dev/null | grep -E "^kausal\.bench-$i-" || true); do
    rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
  done
  $PSQL -d postgres -c "DROP DATABASE IF EXISTS kausal_bench_store_$i WITH (FORCE)" >/dev/null 2>&1 || true
done
rabbitmqctl -q delete_queue kausal.bench-latency >/dev/null 2>&1 || true

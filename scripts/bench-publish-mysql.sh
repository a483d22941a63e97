#!/usr/bin/env bash
# Publisher catch-up on a MariaDB binlog backlog of TPC-B-like transactions (the same
# shape as pgbench's: 3 updates + 1 insert), with the raw decoding rate of the same
# backlog by MariaDB's own tool (mariadb-binlog reading from the server, rows decoded,
# to /dev/null) measured in the same run. Not a test.
# Usage: scripts/bench-publish-mysql.sh [transactions, default 20000]
# Prints `BENCH mysql-publish-catchup <metric> <value> <unit>` lines.
set -euo pipefail
cd "$(dirname "$0")/.."
TXNS=${1:-20000}
CLIENTS=4
DB=kausal_bench
MY="mariadb -h 127.0.0.1 -P 3306 -u kausal -pkausal --batch --skip-column-names"
cargo build --release --quiet --features search,mongo --bin kausal
BIN=target/release/kausal
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

$MY -e "DROP DATABASE IF EXISTS $DB; CREATE DATABASE $DB"
$MY $DB -e "
  CREATE TABLE accounts (aid INT PRIMARY KEY, bid INT NOT NULL, abalance INT NOT NULL, filler CHAR(84));
  CREATE TABLE branches (bid INT PRIMARY KEY, bbalance INT NOT NULL, filler CHAR(88));
  CREATE TABLE tellers (tid INT PRIMARY KEY, bid INT NOT NULL, tbalance INT NOT NULL, filler CHAR(84));
  CREATE TABLE history (id BIGINT AUTO_INCREMENT PRIMARY KEY, tid INT, bid INT, aid INT,
    delta INT, mtime DATETIME, filler CHAR(22));
  INSERT INTO branches SELECT seq, 0, '' FROM seq_1_to_10;
  INSERT INTO tellers SELECT seq, (seq - 1) DIV 10 + 1, 0, '' FROM seq_1_to_100;
  INSERT INTO accounts SELECT seq, (seq - 1) DIV 100000 + 1, 0, '' FROM seq_1_to_1000000;"

cat > "$WORK/bench.toml" <<TOML
namespace = "bench-my"
[source]
kind = "mysql"
url = "mysql://kausal:kausal@127.0.0.1:3306/$DB"
[broker]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
[checkpoint]
path = "$WORK/bench.checkpoint"
interval_ms = 50
[[table]]
name = "accounts"
columns = ["*"]
[[table]]
name = "branches"
columns = ["*"]
[[table]]
name = "tellers"
columns = ["*"]
[[table]]
name = "history"
columns = ["*"]
TOML

# First start writes a checkpoint at the current position; then stop it and build the
# backlog.
RUST_LOG=warn $BIN publish --config "$WORK/bench.toml" & PUB=$!
until [ -s "$WORK/bench.checkpoint" ]; do sleep 0.2; done
kill -TERM $PUB; wait $PUB || true
read -r START_FILE START_POS < <($MY -e "SHOW MASTER STATUS" | awk '{print $1, $2}')

# The workload: TPC-B-like transactions from $CLIENTS connections (SQL generated with a
# fixed seed, so every run writes the same changes).
for c in $(seq 1 $CLIENTS); do
  awk -v n=$((TXNS / CLIENTS)) -v seed="$c" 'BEGIN {
    srand(seed);
    for (i = 0; i < n; i++) {
      aid = int(rand() * 1000000) + 1; tid = int(rand() * 100) + 1; bid = int(rand() * 10) + 1;
      d = int(rand() * 10001) - 5000;
      printf "BEGIN; UPDATE accounts SET abalance = abalance + %d WHERE aid = %d; ", d, aid;
      printf "UPDATE tellers SET tbalance = tbalance + %d WHERE tid = %d; ", d, tid;
      printf "UPDATE branches SET bbalance = bbalance + %d WHERE bid = %d; ", d, bid;
      printf "INSERT INTO history (tid, bid, aid, delta, mtime) VALUES (%d, %d, %d, %d, NOW()); COMMIT;\n", tid, bid, aid, d;
    }
  }' > "$WORK/load$c.sql"
done
for c in $(seq 1 $CLIENTS); do $MY $DB < "$WORK/load$c.sql" & done
wait
END_GTID=$($MY -e "SELECT @@gtid_binlog_pos")
read -r END_FILE END_POS < <($MY -e "SHOW MASTER STATUS" | awk '{print $1, $2}')
ROWS=$((TXNS * 4))

# Baseline: MariaDB's own binlog reader decoding the same events to /dev/null.
t0=$(date +%s.%N)
RAW_ARGS=(--start-position="$START_POS" --stop-position="$END_POS")
# A backlog that crossed a binlog rotation: read to the end of the last file.
[ "$START_FILE" = "$END_FILE" ] || RAW_ARGS=(--start-position="$START_POS" --to-last-log)
mariadb-binlog -R -h 127.0.0.1 -P 3306 -u kausal -pkausal --verbose --base64-output=DECODE-ROWS \
  "${RAW_ARGS[@]}" "$START_FILE" > /dev/null
t1=$(date +%s.%N)
RAW=$(echo "$t1 - $t0" | bc -l)

# Kausal: start on the backlog, time until its checkpoint (written only after RabbitMQ
# confirmed everything before it) reaches the backlog's last transaction.
# A counting consumer on one worker thread, as in bench-publish.sh.
TOKIO_WORKER_THREADS=1 $BIN tail --namespace bench-my --count > /dev/null 2>&1 & TAIL=$!
sleep 1
t0=$(date +%s.%N)
RUST_LOG=warn $BIN publish --config "$WORK/bench.toml" & PUB=$!
until grep -qa "gtid:$END_GTID" "$WORK/bench.checkpoint" 2>/dev/null; do sleep 0.05; done
t1=$(date +%s.%N)
RSS=$(awk '/VmHWM/ {print int($2/1024)}' /proc/$PUB/status)
kill -TERM $PUB; wait $PUB || true
kill $TAIL 2>/dev/null || true
OURS=$(echo "$t1 - $t0" | bc -l)

printf 'BENCH mysql-publish-catchup transactions %d txn\n' "$TXNS"
printf 'BENCH mysql-publish-catchup raw_decode_rows_per_s %.0f rows/s\n' "$(echo "$ROWS / $RAW" | bc -l)"
printf 'BENCH mysql-publish-catchup rows_per_s %.0f rows/s\n' "$(echo "$ROWS / $OURS" | bc -l)"
printf 'BENCH mysql-publish-catchup txn_per_s %.0f txn/s\n' "$(echo "$TXNS / $OURS" | bc -l)"
printf 'BENCH mysql-publish-catchup rows_per_s_ratio %.2f x\n' "$(echo "$RAW / $OURS" | bc -l)"
printf 'BENCH mysql-publish-catchup publisher_peak_rss %d MiB\n' "$RSS"
$MY -e "DROP DATABASE IF EXISTS $DB"

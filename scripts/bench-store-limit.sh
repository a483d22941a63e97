#!/usr/bin/env bash
# The stores' own limits, the baselines of subscriber-apply-catchup: how fast Postgres
# and SQLite take rows of pgbench's shape when a client does nothing else. Not a test;
# part of scripts/bench-subscribe.sh.
# Usage: scripts/bench-store-limit.sh [rows, default 160000]
#
# - pg_copy_rows_per_s: `COPY … FROM STDIN` (text format) through psql into a fresh table.
# - pg_upsert_rows_per_s: multi-row `INSERT … VALUES (1,000 rows) ON CONFLICT DO UPDATE`,
#   one statement per transaction, through psql, into a table that already holds the
#   keys (so most rows are updates, like pgbench's).
# - sqlite_upsert_rows_per_s: Python's sqlite3, one prepared upsert executed for 1,000
#   rows per transaction (WAL, synchronous=NORMAL, as the subscriber's store).
# Prints `BENCH store-limit <metric> <value> rows/s` lines.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${1:-160000}
DB=kausal_bench_limit
PSQL="psql -h 127.0.0.1 -U postgres -qAt"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
KEYS=100000
python3 - "$ROWS" "$KEYS" "$WORK" <<'PY'
import random, sys
rows, keys, work = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
random.seed(7)
filler = " " * 84
data = [(random.randint(1, keys), random.randint(1, 10), random.randint(-5000, 5000)) for _ in range(rows)]
with open(f"{work}/copy.txt", "w") as f:
    for i, (_, b, a) in enumerate(data):
        f.write(f"{i + 1}\t{b}\t{a}\t{filler}\n")
with open(f"{work}/upsert.sql", "w") as f:
    for start in range(0, rows, 1000):
        chunk = {}
        for k, b, a in data[start:start + 1000]:
            chunk[k] = (b, a)  # one row per key per statement, as the subscriber coalesces
        values = ", ".join(f"({k}, {b}, {a}, '{filler}')" for k, (b, a) in chunk.items())
        f.write("BEGIN;\nINSERT INTO acc (aid, bid, abalance, filler) VALUES " + values +
                " ON CONFLICT (aid) DO UPDATE SET bid = excluded.bid, abalance = excluded.abalance, filler = excluded.filler;\nCOMMIT;\n")
PY
$PSQL -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
TABLE="CREATE TABLE acc (aid int PRIMARY KEY, bid int, abalance int, filler char(84))"
$PSQL -d $DB -c "$TABLE"
t0=$(date +%s.%N)
$PSQL -d $DB -c "\\copy acc FROM '$WORK/copy.txt'"
t1=$(date +%s.%N)
printf 'BENCH store-limit pg_copy_rows_per_s %.0f rows/s\n' "$(echo "$ROWS / ($t1 - $t0)" | bc -l)"
$PSQL -d $DB -c "TRUNCATE acc" -c "INSERT INTO acc SELECT g, 1, 0, '' FROM generate_series(1, $KEYS) g" -c "VACUUM ANALYZE acc"
t0=$(date +%s.%N)
$PSQL -d $DB -f "$WORK/upsert.sql" >/dev/null
t1=$(date +%s.%N)
printf 'BENCH store-limit pg_upsert_rows_per_s %.0f rows/s\n' "$(echo "$ROWS / ($t1 - $t0)" | bc -l)"
$PSQL -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
python3 - "$ROWS" "$KEYS" "$WORK/limit.db" <<'PY'
import random, sqlite3, sys, time
rows, keys, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
random.seed(7)
c = sqlite3.connect(path, isolation_level=None)
c.execute("PRAGMA journal_mode = WAL")
c.execute("PRAGMA synchronous = NORMAL")
c.execute("CREATE TABLE acc (aid INTEGER PRIMARY KEY, bid INTEGER, abalance INTEGER, filler TEXT)")
c.execute("BEGIN")
c.executemany("INSERT INTO acc VALUES (?, 1, 0, '')", ((k,) for k in range(1, keys + 1)))
c.execute("COMMIT")
data = [(random.randint(1, keys), random.randint(1, 10), random.randint(-5000, 5000), " " * 84) for _ in range(rows)]
sql = ("INSERT INTO acc (aid, bid, abalance, filler) VALUES (?, ?, ?, ?) ON CONFLICT (aid) "
       "DO UPDATE SET bid = excluded.bid, abalance = excluded.abalance, filler = excluded.filler")
t0 = time.time()
for start in range(0, rows, 1000):
    c.execute("BEGIN")
    c.executemany(sql, data[start:start + 1000])
    c.execute("COMMIT")
print(f"BENCH store-limit sqlite_upsert_rows_per_s {rows / (time.time() - t0):.0f} rows/s")
PY

#!/usr/bin/env bash
# Runs the whole test suite against the real local servers (the README's second command).
# Prepares the servers first (idempotent), and removes what crashed earlier test runs
# left behind (inactive test replication slots hold WAL; their databases).
set -euo pipefail
cd "$(dirname "$0")/.."
# A run killed during a broker outage (tests/faults_broker.rs, tests/broker_restart.rs)
# leaves the RabbitMQ node up with its app stopped, which setup.sh cannot start.
timeout 20 rabbitmqctl -q start_app >/dev/null 2>&1 || true
./scripts/setup.sh
psql -h 127.0.0.1 -U postgres -d postgres -qAt <<'SQL' >/dev/null
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
 WHERE slot_name LIKE 'kausal\_t\_%' AND NOT active;
SQL
# A killed run of tests/bootstrap_visibility.rs may have left its absent standby.
if [ "$(psql -h 127.0.0.1 -U postgres -d postgres -qAt -c 'SHOW synchronous_standby_names')" \
     = kausal_test_absent_standby ]; then
  psql -h 127.0.0.1 -U postgres -d postgres -qAt \
    -c "ALTER SYSTEM RESET synchronous_standby_names" -c "SELECT pg_reload_conf()" >/dev/null
fi
for db in $(psql -h 127.0.0.1 -U postgres -d postgres -qAt -c \
    "SELECT datname FROM pg_database WHERE datname LIKE 't\_%'"); do
  psql -h 127.0.0.1 -U postgres -d postgres -qAt -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null || true
done
# Style first: formatting and lints fail the run before the (long) tests start.
cargo fmt --all --check
cargo clippy --workspace --all-targets --all-features -- -D warnings
# End-to-end tests run the example programs as worker processes; `cargo test` builds
# examples only as test harnesses, so build the programs themselves first.
cargo build --workspace --examples --all-features
cargo test --workspace --all-targets --all-features --no-fail-fast "$@"

#!/usr/bin/env bash
# The live demo (the README's first command): prepares the local servers, then runs a
# demo workload, the publisher, and a subscriber that keeps a SQLite read model and
# "emails" each message's user from a callback, in causal order. Ctrl-C stops it.
# Extra arguments go to `kausal demo` (e.g. --seconds 30, --tail).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo run --quiet --release -- demo "$@"

#!/usr/bin/env bash
# The live demo (the README's first command): prepares the local servers, then runs the
# publisher against a demo workload and shows each committed transaction as it arrives
# on RabbitMQ. Ctrl-C stops it. Extra arguments go to `kausal demo` (e.g. --seconds 30).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo run --quiet --release -- demo "$@"

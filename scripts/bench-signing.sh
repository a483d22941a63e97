#!/usr/bin/env bash
# The cost of signed messages: `scripts/bench-security.sh signing` (this name is the
# command BENCHMARKS.md records for the first measurement).
# Usage: [ORDER=plain|signed] scripts/bench-signing.sh [transactions, default 20000]
set -euo pipefail
ORDER=$([ "${ORDER:-plain}" = signed ] && echo on || echo plain) \
  exec "$(dirname "$0")/bench-security.sh" signing "$@"

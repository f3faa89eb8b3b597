#!/usr/bin/env bash
# Runs every test: unit, scenario, property tests and the fuzz-corpus replay.
# Root-only tests (the namespace lab, XDP) run as part of this; without root
# they say so and return, and under CI=true they fail instead of skipping.
set -euo pipefail
cd "$(dirname "$0")"
# clang and libbpf headers (the XDP program), iproute2/ethtool (the lab).
./deploy/setup.sh
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --release --no-fail-fast
else
  cargo test --workspace --release --no-fail-fast
fi

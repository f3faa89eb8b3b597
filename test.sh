#!/usr/bin/env bash
# Runs every test: unit, scenario, property tests and the fuzz-corpus replay.
# Root-only tests (namespaces, AF_XDP) run as part of this too once they exist;
# under CI=true nothing may skip itself.
set -euo pipefail
cd "$(dirname "$0")"
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --release --no-fail-fast
else
  cargo test --workspace --release --no-fail-fast
fi

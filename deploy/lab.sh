#!/usr/bin/env bash
# kxp's main job, end to end on this machine (as root): installs what the
# build needs, builds kxp, brings up a two-node namespace cluster, pushes
# iperf3 TCP and UDP through a ClusterIP and a NodePort via kxp and via the
# kernel, prints throughput, ratios and per-core latency, and tears down.
# Extra arguments go to `bench lab` (e.g. --seconds 10).
set -euo pipefail
cd "$(dirname "$0")/.."
./deploy/setup.sh
cargo build --release --workspace
exec ./target/release/bench lab "$@"

#!/usr/bin/env bash
# Installs the Debian packages kxp needs to build, test and run its lab.
# Safe to run again; skips apt when everything is present.
set -euo pipefail

# Engine and control tests need only the Rust toolchain; the namespace lab
# needs iproute2 (ip, bridge), ethtool and ping.
# The XDP program is compiled by clang at build time against libbpf headers.
# xsk-rs builds its vendored libxdp/libbpf (llvm, libelf, zlib, m4); the lab
# demo drives traffic with iperf3 and builds its kube-proxy baseline with
# iptables and nftables (kube-proxy's two modes, as it programs them).
PACKAGES=(pkg-config iproute2 ethtool iputils-ping iperf3 clang llvm libelf-dev zlib1g-dev m4 libbpf-dev linux-libc-dev iptables nftables)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "kxp setup: missing Debian packages (${missing[*]}); run this script as root to install them." >&2
    exit 1
  fi
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

for tool in cargo rustfmt cargo-clippy; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "kxp setup: '$tool' is not on PATH; install the Rust toolchain (rustup, stable, with rustfmt and clippy)." >&2
    exit 1
  fi
done

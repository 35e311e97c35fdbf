#!/usr/bin/env bash
# Installs every system package tern's build, tests, benchmarks and demo need. Idempotent:
# packages already present are not touched, and apt-get update runs only when something is
# missing.
set -euo pipefail

# clang-14 is the one pinned BPF compiler (Makefile: CLANG). Everything else is for the
# tests (iproute2, bpftool), the benchmarks (iperf3) and the lab.
pkgs=(clang-14 llvm-14 libbpf-dev bpftool iproute2 linux-libc-dev make socat curl iperf3
      iptables nftables conntrack ca-certificates)

missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
	echo "setup: installing ${missing[*]}"
	if [ "$(id -u)" -ne 0 ]; then
		echo "setup: need root to install packages (run as root or install them yourself)" >&2
		exit 1
	fi
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bpffs is where the loader pins maps; mount it if this machine has not.
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
	mount -t bpf bpf /sys/fs/bpf 2>/dev/null || true
fi

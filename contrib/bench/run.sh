#!/bin/bash
# The benchmark of issue 5, one command (root):
#   bash contrib/bench/run.sh
# Environment: RTT_MS (default 5), RATE_MBIT (bandwidth cap, default 0 = none), MKFS_OPTS (default -zlz4),
# BIG_MIB (size of the image for the memory figure, default 1024, 0 to skip), REPEAT (warm runs, default 5),
# PROFILES (network profiles run side by side first, e.g. lan,cloud,edge: lan = 5 ms RTT no cap, cloud = 20 ms
# 1 Gbit/s, edge = 50 ms 100 Mbit/s, each through its own delaying proxy), PROFILES_ONLY=1 (only those),
# BENCH_ROOTFS (use this tree instead of today's debootstrap), WRITER=0 (with PROFILES: skip the image built by our
# writer, `erofs-fanotify build --compress lz4 --order <files the program opens>`, measured beside mkfs.erofs's).
# TAR=0 skips the ordinary-image row (2 tar+gzip layers through the index artifact); TAR_SPAN=1M sets its zinfo span.
# Builds release binaries, makes (or reuses, cached by date under /var/tmp) a Debian bookworm minbase tree with
# debootstrap, turns it into EROFS, starts Debian's docker-registry on 127.0.0.1 behind added latency, and
# measures lazy mounts against full pull + plain mount side by side. Prints a table, writes
# contrib/bench/results/<date>.json. Everything it starts is cleaned up, also on failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "run.sh: run as root" >&2; exit 1; }
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
missing=
for t in docker-registry:docker-registry mkfs.erofs:erofs-utils curl:curl python3:python3 debootstrap:debootstrap strace:strace; do
    command -v "${t%%:*}" >/dev/null || missing="$missing ${t#*:}"
done
if [ -n "$missing" ]; then
    echo "run.sh: installing$missing" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null
fi
# Latency: netem in a network namespace would be the natural tool, but only if the kernel has sch_netem.
# Probe it on a throwaway dummy veth; without it the delaying TCP proxy (delay-proxy.py) adds the RTT.
LATENCY="delay proxy (no sch_netem in this kernel)"
probe=efbnp$$
if ip link add "$probe" type veth peer name "${probe}p" 2>/dev/null; then
    if tc qdisc add dev "$probe" root netem delay 1ms 2>/dev/null; then
        LATENCY="delay proxy (netem available but not used)"
    fi
    ip link del "$probe" 2>/dev/null || true
fi
cargo build --release --quiet
exec python3 contrib/bench/bench.py --latency "$LATENCY" "$@"

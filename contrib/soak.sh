#!/bin/bash
# Soak of erofs-fanotify (issue 12; not CI): CYCLES mount/read/umount cycles (half of them cold), then
# KILL_ROUNDS rounds of kill -9 of the worker under READERS concurrent readers, all against a blob
# server that injects faults (FAULT_RATE of requests get a 503, half as many a 2 s stall, a quarter
# a body cut short). Prints a JSON report: wrong files, read errors, longest read, and leaks
# (agent processes, mounts, mount records, state-dir files and bytes, supervisor fds per kill).
# Exits non-zero on a wrong file or a leak. Run as root:
#   CYCLES=1000 KILL_ROUNDS=10 READERS=64 bash contrib/soak.sh
# Needs mkfs.erofs (erofs-utils) and python3; the cache goes on /var/tmp (ext4/xfs/btrfs, not tmpfs).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "soak.sh: run as root" >&2; exit 1; }
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
command -v mkfs.erofs >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q erofs-utils; }

TARGET=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release --quiet --bin erofs-mount --bin erofs-umount --bin erofs-fanotify
BIN=$TARGET/release

WORK=$(mktemp -d /var/tmp/erofs-fanotify-soak.XXXXXX)
cleanup() {
    set +e
    mountpoint -q "$WORK/mnt" && EROFS_FANOTIFY_STATE_DIR=$WORK/state "$BIN/erofs-umount" "$WORK/mnt"
    mountpoint -q "$WORK/mnt" && umount -l "$WORK/mnt"
    rm -rf "$WORK"
}
trap cleanup EXIT

# 400 small files, 24 of 1 MiB, one of 8 MiB; lz4, as images usually are.
mkdir -p "$WORK/tree/small" "$WORK/tree/big"
for i in $(seq 1 400); do head -c $((RANDOM % 6000 + 1)) /dev/urandom > "$WORK/tree/small/f$i"; done
for i in $(seq 1 24); do head -c $((1 << 20)) /dev/urandom > "$WORK/tree/big/b$i"; done
head -c $((8 << 20)) /dev/urandom > "$WORK/tree/big/large"
mkfs.erofs -zlz4 "$WORK/image.erofs" "$WORK/tree" >/dev/null

python3 contrib/soak.py --bin "$BIN" --work "$WORK" --image "$WORK/image.erofs" --tree "$WORK/tree" \
    --cycles "${CYCLES:-1000}" --kill-rounds "${KILL_ROUNDS:-10}" --readers "${READERS:-64}" \
    --fault-rate "${FAULT_RATE:-0.05}"

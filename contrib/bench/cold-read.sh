#!/bin/bash
# Cold-read figures for the core lazy mount, side by side in one run:
#  - mount latency, and a partial read (three small files): time and bytes fetched;
#  - reading every file cold through the lazy mount vs a plain file-backed
#    mount of a local copy of the same image (page cache dropped first).
# Usage (root): bash contrib/bench/cold-read.sh [SIZE_MIB] [-zlz4]
# Prints a table and writes contrib/bench/results/cold-read-<date>.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "cold-read.sh: run as root" >&2; exit 1; }
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
SIZE_MIB=${1:-128}
MKFS_OPTS=${2:-}
for t in docker-registry mkfs.erofs curl python3; do
    command -v "$t" >/dev/null || { echo "cold-read.sh: $t is missing (apt-get install docker-registry erofs-utils curl)" >&2; exit 1; }
done
cargo build --release --quiet
BIN=$PWD/target/release
WORK=$(mktemp -d /var/tmp/erofs-fanotify-bench.XXXXXX)
REG_PID=
export EROFS_FANOTIFY_STATE_DIR=$WORK/state
cleanup() {
    set +e
    mountpoint -q "$WORK/mnt" && "$BIN/erofs-umount" "$WORK/mnt"
    mountpoint -q "$WORK/local" && umount "$WORK/local"
    [ -n "$REG_PID" ] && kill "$REG_PID" && wait "$REG_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.3f}')"; }

python3 - "$WORK/tree" "$SIZE_MIB" <<'PY'
import os, random, sys
root, size_mib = sys.argv[1], int(sys.argv[2])
rnd = random.Random(42)
total, budget, n = 0, size_mib << 20, 0
while total < budget:
    d = os.path.join(root, f"d{n % 97}", f"e{n % 13}")
    os.makedirs(d, exist_ok=True)
    size = rnd.choice([rnd.randint(100, 16 << 10)] * 8 + [rnd.randint(64 << 10, 4 << 20)])
    half = rnd.randbytes(size // 2)
    with open(os.path.join(d, f"f{n}.bin"), "wb") as f:
        f.write(half + bytes(size - len(half)))  # half random, half compressible
    total += size; n += 1
print(f"{n} files, {total >> 20} MiB")
PY
mkfs.erofs $MKFS_OPTS "$WORK/image.erofs" "$WORK/tree" >/dev/null
IMAGE_SIZE=$(stat -c %s "$WORK/image.erofs")

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'version: 0.1\nlog: {level: error}\nstorage: {filesystem: {rootdirectory: %s}}\nhttp: {addr: 127.0.0.1:%s}\n' "$WORK/registry" "$PORT" > "$WORK/registry.yml"
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
REG_PID=$!
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$PORT/v2/" >/dev/null && break; sleep 0.1; done
DIGEST=sha256:$(sha256sum "$WORK/image.erofs" | cut -d' ' -f1)
LOC=$(curl -fsi -X POST "http://127.0.0.1:$PORT/v2/bench/blobs/uploads/" | tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
curl -fs -X PUT -H 'Content-Type: application/octet-stream' --data-binary @"$WORK/image.erofs" "$LOC&digest=$DIGEST"
URL="http://127.0.0.1:$PORT/v2/bench/blobs/$DIGEST"
mkdir -p "$WORK/mnt" "$WORK/local"
field() { "$BIN/erofs-fanotify" status "$WORK/mnt" --json | python3 -c "import json,sys; print(json.load(sys.stdin)[0]['$1'])"; }
mapfile -t SMALL < <(cd "$WORK/tree" && find . -type f -size -16k | sort | sed -n '1p;100p;200p')

# 1. Mount latency and partial read.
sync; echo 3 > /proc/sys/vm/drop_caches
t0=$(now); "$BIN/erofs-mount" -t erofs.fanotify -o cache_dir="$WORK/cache" "$URL" "$WORK/mnt"; t1=$(now)
MOUNT_S=$(secs "$t0" "$t1"); META_FETCHED=$(field fetched_bytes); META_REQ=$(field fetch_requests)
t0=$(now); (cd "$WORK/mnt" && cat "${SMALL[@]}" >/dev/null); t1=$(now)
PARTIAL_S=$(secs "$t0" "$t1"); PARTIAL_FETCHED=$(field fetched_bytes)
"$BIN/erofs-umount" "$WORK/mnt"

# 2. Full cold read, lazy.
rm -rf "$WORK/cache"; sync; echo 3 > /proc/sys/vm/drop_caches
"$BIN/erofs-mount" -t erofs.fanotify -o cache_dir="$WORK/cache" "$URL" "$WORK/mnt"
t0=$(now); (cd "$WORK/mnt" && find . -type f -print0 | xargs -0 cat >/dev/null); t1=$(now)
LAZY_S=$(secs "$t0" "$t1"); LAZY_FETCHED=$(field fetched_bytes); LAZY_REQ=$(field fetch_requests)
diff -r "$WORK/tree" "$WORK/mnt" >/dev/null && SAME=yes || SAME=NO
"$BIN/erofs-umount" "$WORK/mnt"

# 3. Full cold read, plain file-backed mount of a local copy.
sync; echo 3 > /proc/sys/vm/drop_caches
"$BIN/erofs-fanotify" mount-file "$WORK/image.erofs" "$WORK/local"
t0=$(now); (cd "$WORK/local" && find . -type f -print0 | xargs -0 cat >/dev/null); t1=$(now)
LOCAL_S=$(secs "$t0" "$t1")
umount "$WORK/local"

RATIO=$(python3 -c "print(f'{$LAZY_S / $LOCAL_S:.2f}')")
PCT=$(python3 -c "print(f'{100 * $PARTIAL_FETCHED / $IMAGE_SIZE:.1f}')")
printf '\n%-44s %s\n' "image" "$IMAGE_SIZE bytes ${MKFS_OPTS:-plain}"
printf '%-44s %s s (%s bytes metadata in %s requests)\n' "mount (command -> mounted)" "$MOUNT_S" "$META_FETCHED" "$META_REQ"
printf '%-44s %s s, %s bytes fetched (%s%% of blob)\n' "read 3 small files cold" "$PARTIAL_S" "$PARTIAL_FETCHED" "$PCT"
printf '%-44s %s s (%s bytes in %s requests, identical: %s)\n' "read all files cold, lazy mount" "$LAZY_S" "$LAZY_FETCHED" "$LAZY_REQ" "$SAME"
printf '%-44s %s s\n' "read all files cold, plain local mount" "$LOCAL_S"
printf '%-44s %s\n' "ratio lazy / local" "$RATIO"
mkdir -p contrib/bench/results
cat > "contrib/bench/results/cold-read-$(date +%Y%m%d-%H%M%S).json" <<JSON
{"date": "$(date -Is)", "kernel": "$(uname -r)", "nproc": $(nproc), "image_bytes": $IMAGE_SIZE,
 "mkfs_opts": "$MKFS_OPTS", "mount_s": $MOUNT_S, "metadata_fetched_bytes": $META_FETCHED,
 "metadata_requests": $META_REQ, "partial_read_s": $PARTIAL_S, "partial_fetched_bytes": $PARTIAL_FETCHED,
 "full_lazy_s": $LAZY_S, "full_lazy_fetched_bytes": $LAZY_FETCHED, "full_lazy_requests": $LAZY_REQ,
 "full_local_s": $LOCAL_S, "ratio_lazy_over_local": $RATIO, "identical": "$SAME"}
JSON

#!/bin/bash
# End-to-end demo: a real registry on loopback, an EROFS image pushed as a
# blob, mounted lazily, read, shown in status, unmounted. Run as root:
#   bash contrib/demo.sh
# It installs Debian's docker-registry and erofs-utils when missing, builds
# the binaries, and removes everything it made on exit.
set -euo pipefail

cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root" >&2; exit 1; }
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

need=()
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v mkfs.erofs >/dev/null || need+=(erofs-utils)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi

cargo build --release --quiet
BIN=$PWD/target/release

WORK=$(mktemp -d /var/tmp/erofs-fanotify-demo.XXXXXX)
REG_PID=
export EROFS_FANOTIFY_STATE_DIR=$WORK/state
cleanup() {
    set +e
    mountpoint -q "$WORK/mnt" && "$BIN/erofs-umount" "$WORK/mnt"
    [ -n "$REG_PID" ] && kill "$REG_PID" && wait "$REG_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "== building a sample image"
mkdir -p "$WORK/tree/docs" "$WORK/tree/data" "$WORK/mnt"
for i in $(seq 1 200); do echo "file $i of the demo image" > "$WORK/tree/docs/note-$i.txt"; done
head -c $((64 << 20)) /dev/urandom > "$WORK/tree/data/big.bin"
mkfs.erofs -zlz4hc "$WORK/image.erofs" "$WORK/tree" >/dev/null
ls -l "$WORK/image.erofs"

echo "== starting docker-registry on 127.0.0.1"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$WORK/registry.yml" <<YML
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $WORK/registry}}
http: {addr: 127.0.0.1:$PORT}
YML
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
REG_PID=$!
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$PORT/v2/" >/dev/null && break; sleep 0.1; done

echo "== pushing the image as a blob"
DIGEST=sha256:$(sha256sum "$WORK/image.erofs" | cut -d' ' -f1)
LOC=$(curl -fsi -X POST "http://127.0.0.1:$PORT/v2/demo/blobs/uploads/" | tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
case "$LOC" in http*) ;; *) LOC="http://127.0.0.1:$PORT$LOC" ;; esac
SEP='?'; case "$LOC" in *\?*) SEP='&' ;; esac
curl -fs -X PUT -H 'Content-Type: application/octet-stream' --data-binary @"$WORK/image.erofs" "$LOC${SEP}digest=$DIGEST"
URL="http://127.0.0.1:$PORT/v2/demo/blobs/$DIGEST"
echo "$URL"

echo "== mounting lazily"
time "$BIN/erofs-mount" -t erofs.fanotify -o cache_dir="$WORK/cache" "$URL" "$WORK/mnt"
"$BIN/erofs-fanotify" status "$WORK/mnt"

echo "== reading three small files"
cat "$WORK/mnt/docs/note-1.txt" "$WORK/mnt/docs/note-100.txt" "$WORK/mnt/docs/note-200.txt"
"$BIN/erofs-fanotify" status "$WORK/mnt"

echo "== reading everything and comparing with the source tree"
diff -r "$WORK/tree" "$WORK/mnt" && echo "identical"
echo "== every block is present: the agent verifies the digest and detaches the mark"
for _ in $(seq 50); do
    "$BIN/erofs-fanotify" status "$WORK/mnt" --json | grep -q '"state": "complete"' && break
    sleep 0.2
done
"$BIN/erofs-fanotify" status "$WORK/mnt"

echo "== unmounting"
"$BIN/erofs-umount" "$WORK/mnt"
"$BIN/erofs-fanotify" status

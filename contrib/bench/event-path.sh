#!/bin/bash
# Event-path cost with a warm cache: every byte is present, but each EROFS page-cache miss still raises
# a pre-access event that the agent answers on its fast path (range present -> allow). Measures events per
# second under parallel readers and the agent's CPU time per event (user+sys of the worker, from /proc).
#
# Usage (root): bash contrib/bench/event-path.sh            (BIN=DIR to use other binaries)
# Knobs: FILES=3000 (64 KiB files), ROUNDS=5, READERS=4, RA_KB=4 (readahead: 4 KiB = one event per page)
# A 32 MiB file that is never read keeps the image incomplete, so the pre-access mark stays on.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "event-path.sh: run as root" >&2; exit 1; }
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
FILES=${FILES:-3000}
ROUNDS=${ROUNDS:-5}
READERS=${READERS:-4}
RA_KB=${RA_KB:-4}
for t in docker-registry mkfs.erofs curl python3; do
    command -v "$t" >/dev/null || { echo "event-path.sh: $t is missing" >&2; exit 1; }
done
if [ -z "${BIN:-}" ]; then
    cargo build --release --quiet
    BIN=$PWD/target/release
fi
WORK=$(mktemp -d /var/tmp/erofs-fanotify-evbench.XXXXXX)
REG_PID=
export EROFS_FANOTIFY_STATE_DIR=$WORK/state
cleanup() {
    set +e
    mountpoint -q "$WORK/mnt" && "$BIN/erofs-umount" "$WORK/mnt"
    [ -n "$REG_PID" ] && kill "$REG_PID" && wait "$REG_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

python3 - "$WORK/tree" "$FILES" <<'PY'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rnd = random.Random(7)
for i in range(n):
    d = os.path.join(root, f"d{i % 31}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i}"), "wb") as f:
        f.write(rnd.randbytes(64 << 10))
with open(os.path.join(root, "never-read"), "wb") as f:
    f.write(rnd.randbytes(32 << 20))
PY
mkfs.erofs "$WORK/image.erofs" "$WORK/tree" >/dev/null

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'version: 0.1\nlog: {level: error}\nstorage: {filesystem: {rootdirectory: %s}}\nhttp: {addr: 127.0.0.1:%s}\n' "$WORK/registry" "$PORT" > "$WORK/registry.yml"
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
REG_PID=$!
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$PORT/v2/" >/dev/null && break; sleep 0.1; done
DIGEST=sha256:$(sha256sum "$WORK/image.erofs" | cut -d' ' -f1)
LOC=$(curl -fsi -X POST "http://127.0.0.1:$PORT/v2/bench/blobs/uploads/" | tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
curl -fs -X PUT -H 'Content-Type: application/octet-stream' --data-binary @"$WORK/image.erofs" "$LOC&digest=$DIGEST"
URL="http://127.0.0.1:$PORT/v2/bench/blobs/$DIGEST"
mkdir -p "$WORK/mnt"
"$BIN/erofs-mount" -t erofs.fanotify -o cache_dir="$WORK/cache",read_ahead_kb="$RA_KB" "$URL" "$WORK/mnt"
field() { "$BIN/erofs-fanotify" status "$WORK/mnt" --json | python3 -c "import json,sys; print(json.load(sys.stdin)[0]['$1'])"; }
AGENT=$(field agent_pid)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$AGENT/stat"; }

# Warm the cache file: every small file fetched once.
(cd "$WORK/mnt" && find . -type f ! -name never-read -print0 | xargs -0 -P "$READERS" -n 64 cat >/dev/null)

python3 - "$WORK/mnt" "$ROUNDS" "$READERS" "$BIN" "$AGENT" <<'PY' | tee "$WORK/result.txt"
import json, os, subprocess, sys, time, threading
mnt, rounds, readers, binary, agent = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(mnt) for f in fs if f != "never-read")
hz = os.sysconf("SC_CLK_TCK")
def status():
    out = subprocess.run([binary + "/erofs-fanotify", "status", mnt, "--json"], capture_output=True, check=True).stdout
    return json.loads(out)[0]
def ticks():
    """(user, system) clock ticks of the worker, all its threads."""
    with open(f"/proc/{agent}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return int(parts[11]), int(parts[12])
def drop():
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
def read_part(part):
    for p in part:
        with open(p, "rb", buffering=0) as f:
            while f.read(4096):
                pass
rates, cpu, user = [], [], []
for r in range(rounds):
    drop()
    s0, t0, c0 = status(), time.monotonic(), ticks()
    threads = [threading.Thread(target=read_part, args=(files[i::readers],)) for i in range(readers)]
    for t in threads: t.start()
    for t in threads: t.join()
    t1, c1, s1 = time.monotonic(), ticks(), status()
    ev = s1["events"] - s0["events"]
    fast = s1["fast_path_events"] - s0["fast_path_events"]
    fetched = s1["fetched_bytes"] - s0["fetched_bytes"]
    rates.append(ev / (t1 - t0))
    cpu.append(((c1[0] - c0[0]) + (c1[1] - c0[1])) / hz * 1e6 / max(ev, 1))
    user.append((c1[0] - c0[0]) / hz * 1e6 / max(ev, 1))
    print(f"round {r}: {ev} events ({fast} fast path, {fetched} bytes fetched) in {t1 - t0:.3f} s = {ev / (t1 - t0):.0f} events/s, worker CPU {cpu[-1]:.1f} us/event ({user[-1]:.1f} user)")
rates.sort(); cpu.sort(); user.sort()
m = len(rates) // 2
print(f"median: {rates[m]:.0f} events/s, {cpu[m]:.1f} us worker CPU per event, {user[m]:.1f} us of it in user space ({readers} readers, {len(files)} files)")
PY

#!/usr/bin/env python3
"""Soak test of erofs-fanotify (issue 12): mount/read/umount cycles and kill -9 rounds under readers,
against a blob server that injects faults, then a leak report. Not part of CI; run it through
contrib/soak.sh (root), e.g. `CYCLES=1000 KILL_ROUNDS=10 bash contrib/soak.sh`.

The blob server answers Range GETs of one EROFS image at /v2/soak/blobs/sha256:<hex> (so the cache
entry is keyed and verified by digest) and, at random, with a 503, a 2 s stall or a body cut short.

Reported: cycles and rounds run, wrong files (bytes that differ from the source tree), read errors,
the longest read, requests and faults served, and what is left afterwards: agent processes, mounts,
mount records, state-dir files and bytes, and the supervisor's fd count before/after each kill.
"""
import argparse
import hashlib
import http.server
import json
import os
import random
import re
import signal
import socketserver
import subprocess
import sys
import threading
import time

ap = argparse.ArgumentParser()
ap.add_argument("--bin", required=True, help="directory of erofs-mount, erofs-umount, erofs-fanotify")
ap.add_argument("--work", required=True, help="scratch directory (made by soak.sh)")
ap.add_argument("--image", required=True)
ap.add_argument("--tree", required=True, help="the tree the image was made from")
ap.add_argument("--cycles", type=int, default=1000)
ap.add_argument("--kill-rounds", type=int, default=10)
ap.add_argument("--readers", type=int, default=64)
ap.add_argument("--fault-rate", type=float, default=0.05)
ap.add_argument("--seed", type=int, default=12)
args = ap.parse_args()
rng = random.Random(args.seed)

BLOB = open(args.image, "rb").read()
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
STATE = os.path.join(args.work, "state")
CACHE = os.path.join(args.work, "cache")
MNT = os.path.join(args.work, "mnt")
os.makedirs(MNT, exist_ok=True)
ENV = dict(os.environ, EROFS_FANOTIFY_STATE_DIR=STATE)
BINARY = os.path.realpath(os.path.join(args.bin, "erofs-fanotify"))

# -- the faulty blob server ------------------------------------------------------------------------
served = {"requests": 0, "faults": 0, "bytes": 0}
served_lock = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        if not self.path.endswith("/blobs/" + DIGEST):
            self.send_error(404)
            return
        with served_lock:
            served["requests"] += 1
            roll = rng.random()
        fault = None
        if roll < args.fault_rate:
            fault = "503"
        elif roll < args.fault_rate * 1.5:
            fault = "stall"
        elif roll < args.fault_rate * 1.75:
            fault = "short"
        if fault:
            with served_lock:
                served["faults"] += 1
        if fault == "503":
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if fault == "stall":
            time.sleep(2)
        size = len(BLOB)
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if m:
            start, end = int(m.group(1)), int(m.group(2) or size - 1)
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            end = min(end, size - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            start, end = 0, size - 1
            self.send_response(200)
        body = BLOB[start:end + 1]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        try:
            if fault == "short":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.wfile.write(body)
            with served_lock:
                served["bytes"] += len(body)
        except OSError:
            pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A killed worker resets its connections: expected here, not worth a traceback.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


server = Server(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
URL = f"http://127.0.0.1:{server.server_address[1]}/v2/soak/blobs/{DIGEST}"

# -- the source tree -------------------------------------------------------------------------------
expected = {}
for base, dirs, files in os.walk(args.tree):
    for f in files:
        p = os.path.join(base, f)
        if os.path.isfile(p) and not os.path.islink(p):
            with open(p, "rb") as fh:
                expected[os.path.relpath(p, args.tree)] = hashlib.sha256(fh.read()).hexdigest()
names = sorted(expected)
big = sorted(n for n in names if os.path.getsize(os.path.join(args.tree, n)) >= 256 << 10)

# -- helpers ---------------------------------------------------------------------------------------
def run(cmd, check=True, timeout=120):
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise SystemExit(f"soak: {' '.join(cmd)} failed: {p.stderr.strip()}")
    return p


def mount(opts=""):
    o = f"cache_dir={CACHE}" + (f",{opts}" if opts else "")
    run([os.path.join(args.bin, "erofs-mount"), "-t", "erofs.fanotify", "-o", o, URL, MNT])


def umount():
    run([os.path.join(args.bin, "erofs-umount"), MNT])


def status():
    p = run([os.path.join(args.bin, "erofs-fanotify"), "status", "--json"], check=False)
    try:
        return json.loads(p.stdout or "[]")
    except ValueError:
        return []


def agents():
    """Agent processes of this soak: our binary, started with our state dir."""
    mark = f"EROFS_FANOTIFY_STATE_DIR={STATE}".encode() + b"\0"
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.readlink(f"/proc/{pid}/exe") == BINARY:
                    with open(f"/proc/{pid}/environ", "rb") as f:
                        if mark in f.read():
                            out.append(int(pid))
            except OSError:
                pass
    return out


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def parent(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def wait_until(what, cond, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise SystemExit(f"soak: timed out waiting for {what}")


def our_mounts():
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if args.work in line]


def state_files():
    out, size = [], 0
    for base, _, files in os.walk(STATE):
        for f in files:
            p = os.path.join(base, f)
            out.append(os.path.relpath(p, STATE))
            try:
                size += os.lstat(p).st_size
            except OSError:
                pass
    return sorted(out), size


tally = {"reads": 0, "wrong": [], "errors": [], "longest": 0.0}
tally_lock = threading.Lock()


def read_check(rel):
    t = time.monotonic()
    try:
        with open(os.path.join(MNT, rel), "rb") as f:
            got = hashlib.sha256(f.read()).hexdigest()
        err = None
    except OSError as e:
        got, err = None, f"{rel}: {e}"
    took = time.monotonic() - t
    with tally_lock:
        tally["reads"] += 1
        tally["longest"] = max(tally["longest"], took)
        if err:
            tally["errors"].append(err)
        elif got != expected[rel]:
            tally["wrong"].append(rel)


def drop_entry():
    """Waits for the agent to leave, then removes the cache entry (the next mount is cold)."""
    wait_until("the agent to leave", lambda: not agents())
    run([os.path.join(args.bin, "erofs-fanotify"), "cache", "prune", "--cache-dir", CACHE, "--max-size", "0"], check=False)


# -- the soak --------------------------------------------------------------------------------------
before_mounts = our_mounts()
started = time.monotonic()
for i in range(args.cycles):
    mount()
    if i == 0 and not agents():
        raise SystemExit("soak: cannot find the agent processes (the leak count would mean nothing)")
    for rel in rng.sample(names, min(20, len(names))):
        read_check(rel)
    umount()
    if i % 2 == 0:
        drop_entry()
    if (i + 1) % 50 == 0:
        print(f"soak: {i + 1} cycles, {len(tally['wrong'])} wrong, {len(tally['errors'])} errors", flush=True)
cycles_s = time.monotonic() - started
wait_until("the agent to leave", lambda: not agents())
after_cycles = (state_files(), len(our_mounts()), len(agents()))

kills = []
for r in range(args.kill_rounds):
    drop_entry()
    mount("fetch_unit=64K")
    s = status()
    worker = s[0]["agent_pid"] if s else 0
    supervisor = parent(worker) if worker else 0
    fds_before = fd_count(supervisor)
    threads = []
    for k in range(args.readers):
        order = big[:] if big else names[:]
        rng.shuffle(order)
        t = threading.Thread(target=lambda o=order: [read_check(x) for x in o])
        threads.append(t)
        t.start()
    time.sleep(0.3)  # readers are blocked on cold data now (a load pattern, not synchronisation)
    if worker > 1:
        os.kill(worker, signal.SIGKILL)
    for t in threads:
        t.join()
    wait_until("a successor worker", lambda: any(x.get("agent_state") == "running" and x.get("agent_pid") != worker for x in status()))
    kills.append({"worker": worker, "supervisor_fds_before": fds_before, "supervisor_fds_after": fd_count(supervisor)})
    umount()
wait_until("the agent to leave", lambda: not agents())
drop_entry()

files, size = state_files()
report = {
    "cycles": args.cycles,
    "cycles_seconds": round(cycles_s, 1),
    "kill_rounds": args.kill_rounds,
    "readers": args.readers,
    "fault_rate": args.fault_rate,
    "reads": tally["reads"],
    "wrong_files": len(tally["wrong"]),
    "read_errors": len(tally["errors"]),
    "first_errors": tally["errors"][:5],
    "longest_read_s": round(tally["longest"], 3),
    "requests_served": served["requests"],
    "faults_injected": served["faults"],
    "leaks": {
        "agent_processes": len(agents()),
        "mounts": len(our_mounts()) - len(before_mounts),
        "mount_records": len([f for f in files if f.startswith("mounts/")]),
        "state_files": files,
        "state_bytes": size,
        "after_cycles": {"state_files": after_cycles[0][0], "state_bytes": after_cycles[0][1], "mounts": after_cycles[1], "agents": after_cycles[2]},
    },
    "kills": kills,
}
print(json.dumps(report, indent=1))
bad = report["wrong_files"] or report["leaks"]["agent_processes"] or report["leaks"]["mounts"] or report["leaks"]["mount_records"]
sys.exit(1 if bad else 0)

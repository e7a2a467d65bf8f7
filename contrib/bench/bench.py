#!/usr/bin/env python3
"""The benchmark of issue 5, driven by run.sh (which builds the binaries first).

Everything is measured side by side in one run on the same image:
a Debian bookworm minbase tree (debootstrap, cached under /var/tmp by date)
made into EROFS with mkfs.erofs, served by Debian's docker-registry on
loopback behind a latency (and optional bandwidth) proxy. Lazy mounts use
erofs-mount on the blob URL; "full pull" downloads the blob with curl through
the same proxy and mounts it with the plain file-backed `mount-file`.
A second, ~1 GiB image measures the agent's peak memory during a full
prefetch. Prints a table, writes results/<date>.json.
"""
import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BIN = os.path.join(os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target"), "release")


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(*cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def timed(fn):
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def vm_hwm_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def parent_pid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def resolve_in_tree(tree, path):
    """PATH as the chrooted program saw it, symlinks followed inside TREE; the tree-relative path of a
    regular file, or None."""
    parts, rel, hops = [p for p in path.split("/") if p], [], 0
    while parts:
        name = parts.pop(0)
        if name == ".":
            continue
        if name == "..":
            if rel:
                rel.pop()
            continue
        full = os.path.join(tree, *rel, name)
        if os.path.islink(full):
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(full)
            if target.startswith("/"):
                rel = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        rel.append(name)
    full = os.path.join(tree, *rel)
    return "/".join(rel) if rel and os.path.isfile(full) and not os.path.islink(full) else None


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = tempfile.mkdtemp(prefix="erofs-fanotify-bench.", dir="/var/tmp")
        os.environ["EROFS_FANOTIFY_STATE_DIR"] = os.path.join(self.work, "state")
        self.procs = []          # processes we started (registry, proxy)
        self.mounts = []         # mountpoints we may have mounted
        self.agent_pids = set()  # agents (worker + supervisor) started by our mounts
        self.cache_n = 0
        self.results = {}

    # ---- setup -------------------------------------------------------------
    def rootfs(self):
        if os.environ.get("BENCH_ROOTFS"):  # a tree made before (e.g. offline)
            return os.environ["BENCH_ROOTFS"]
        day = time.strftime("%Y%m%d", time.gmtime())
        path = f"/var/tmp/erofs-fanotify-bench-rootfs-bookworm-python3-{day}"
        if not os.path.isdir(path):
            log(f"debootstrap bookworm minbase (+python3) into {path}")
            tmp = path + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            run("debootstrap", "--variant=minbase", "--include=python3", "bookworm", tmp,
                self.args.mirror, stdout=subprocess.DEVNULL)
            os.rename(tmp, path)
            for old in os.listdir("/var/tmp"):  # keep one tree: the older ones are stale
                if old.startswith("erofs-fanotify-bench-rootfs-bookworm-python3-") and old != os.path.basename(path):
                    shutil.rmtree(os.path.join("/var/tmp", old), ignore_errors=True)
        return path

    def program_order(self, tree):
        """The regular files the program opens, in first-open order: strace of the program chrooted into the
        source tree (only what follows the chroot call, so chroot's own libraries do not count)."""
        trace = os.path.join(self.work, "program.strace")
        run("strace", "-f", "-qq", "-e", "trace=chroot,open,openat,execve", "-e", "status=successful",
            "-o", trace, "chroot", tree, *self.prog, stdout=subprocess.DEVNULL)
        inside, seen, order = False, set(), []
        call = re.compile(r'(chroot|openat|open|execve)\((?:[A-Z_]+|-?\d+)?(?:, )?"([^"]*)"')
        with open(trace) as f:
            for line in f:
                m = call.search(line)
                if not m:
                    continue
                if m.group(1) == "chroot":
                    inside = True
                    continue
                rel = resolve_in_tree(tree, m.group(2)) if inside else None
                if rel and rel not in seen:
                    seen.add(rel)
                    order.append(rel)
        return order

    def make_big_tree(self, mib):
        root = os.path.join(self.work, "big-tree")
        os.makedirs(root)
        chunk = os.urandom(1 << 20)
        n = 0
        for i in range(mib // 16):
            d = os.path.join(root, f"d{i % 8}")
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"f{i}.bin"), "wb") as f:
                for j in range(16):  # distinct content per MiB so nothing dedups
                    f.write(chunk[j:] + chunk[:j] + i.to_bytes(4, "little"))
            n += 1
        return root

    def start_registry(self):
        self.reg_port = free_port()
        conf = os.path.join(self.work, "registry.yml")
        with open(conf, "w") as f:
            f.write("version: 0.1\nlog: {level: error}\n"
                    f"storage: {{filesystem: {{rootdirectory: {self.work}/registry}}}}\n"
                    f"http: {{addr: 127.0.0.1:{self.reg_port}}}\n")
        p = subprocess.Popen(["docker-registry", "serve", conf], stdout=subprocess.DEVNULL,
                             stderr=open(os.path.join(self.work, "registry.log"), "w"))
        self.procs.append(p)
        for _ in range(100):
            if subprocess.run(["curl", "-fs", f"http://127.0.0.1:{self.reg_port}/v2/"],
                              stdout=subprocess.DEVNULL).returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("docker-registry did not start")
        # Latency: netem is preferred, but this kernel has no sch_netem (checked by run.sh),
        # so a delaying proxy in front of the registry adds the RTT and the bandwidth cap.
        self.proxy_port = self.start_proxy(self.args.rtt_ms, self.args.rate_mbit)

    def start_proxy(self, rtt_ms, rate_mbit):
        port = free_port()
        p = subprocess.Popen([sys.executable, os.path.join(HERE, "delay-proxy.py"), str(port),
                              "127.0.0.1", str(self.reg_port), str(rtt_ms), str(rate_mbit)],
                             stdout=subprocess.PIPE, text=True)
        self.procs.append(p)
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError("delay proxy did not start")
        return port

    def push(self, image):
        digest = "sha256:" + subprocess.run(["sha256sum", image], check=True, capture_output=True,
                                            text=True).stdout.split()[0]
        out = subprocess.run(["curl", "-fsi", "-X", "POST", f"http://127.0.0.1:{self.reg_port}/v2/bench/blobs/uploads/"],
                             check=True, capture_output=True, text=True).stdout
        loc = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.lower().startswith("location:"))
        run("curl", "-fs", "-X", "PUT", "-H", "Content-Type: application/octet-stream",
            "-T", image, f"{loc}&digest={digest}", stdout=subprocess.DEVNULL)  # -T streams the file
        return f"http://127.0.0.1:{self.proxy_port}/v2/bench/blobs/{digest}"

    @staticmethod
    def via(url, port):
        """The same blob URL through another proxy (profile)."""
        head, rest = url.split("://", 1)
        return f"{head}://127.0.0.1:{port}/{rest.split('/', 1)[1]}"

    # ---- mounts ------------------------------------------------------------
    def mountpoint(self, name):
        mp = os.path.join(self.work, name)
        os.makedirs(mp, exist_ok=True)
        self.mounts.append(mp)
        return mp

    def fresh_cache(self):
        self.cache_n += 1
        return os.path.join(self.work, f"cache{self.cache_n}")

    def lazy_mount(self, url, mp, cache, extra=""):
        opts = ",".join(o for o in (f"cache_dir={cache}", self.args.lazy_opts, extra) if o)
        run(os.path.join(BIN, "erofs-mount"), "-t", "erofs.fanotify", "-o", opts, url, mp)
        st = self.status(mp)
        pid = st.get("agent_pid")
        if pid:
            self.agent_pids.add(pid)
            ppid = parent_pid(pid)
            if ppid and ppid > 1:
                self.agent_pids.add(ppid)

    def status(self, mp):
        out = subprocess.run([os.path.join(BIN, "erofs-fanotify"), "status", mp, "--json"],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out)[0]

    def agent_rss(self, mp):
        st = self.status(mp)
        pid = st["agent_pid"]
        sup = parent_pid(pid)
        return {"worker_kib": vm_hwm_kib(pid), "supervisor_kib": vm_hwm_kib(sup) if sup else None}

    def umount_lazy(self, mp):
        run(os.path.join(BIN, "erofs-umount"), mp)

    def plain_mount(self, image, mp):
        run(os.path.join(BIN, "erofs-fanotify"), "mount-file", image, mp)

    def umount_plain(self, mp):
        run("umount", mp)

    def full_pull(self, url, dest):
        if os.path.exists(dest):
            os.unlink(dest)
        run("curl", "-fs", "-o", dest, url)

    # ---- workloads ---------------------------------------------------------
    def read_files(self, mp, files):
        # cat in batches: one process per ~200 files, like a program touching many files.
        for i in range(0, len(files), 200):
            run("cat", *[os.path.join(mp, f) for f in files[i:i + 200]], stdout=subprocess.DEVNULL)

    def program(self, mp):
        run("chroot", mp, *self.prog, stdout=subprocess.DEVNULL)

    def wait_complete(self, mp, timeout, rss_into=None):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            st = self.status(mp)
            if rss_into is not None:  # VmHWM is monotonic: the last sample is the peak so far
                pid = st.get("agent_pid")
                sup = parent_pid(pid) if pid else None
                for k, p in (("worker_kib", pid), ("supervisor_kib", sup)):
                    v = vm_hwm_kib(p) if p else None
                    if v:
                        rss_into[k] = max(rss_into.get(k) or 0, v)
            if st.get("state") == "complete":
                return time.monotonic() - t0, st
            time.sleep(0.1)
        raise RuntimeError(f"{mp}: not complete after {timeout}s (state {st.get('state')})")

    # ---- the run -----------------------------------------------------------
    def main(self):
        a = self.args
        tree = self.rootfs()
        if os.path.exists(os.path.join(tree, "usr/bin/python3")):
            self.prog = ["/usr/bin/python3", "-c", "pass"]
        else:
            self.prog = ["/bin/bash", "-c", "ls /usr/bin >/dev/null"]
        image = os.path.join(self.work, "rootfs.erofs")
        log(f"mkfs.erofs {a.mkfs_opts} from {tree}")
        run("mkfs.erofs", *a.mkfs_opts.split(), image, tree, stdout=subprocess.DEVNULL)
        files, sizes = [], {}
        for d, _, names in os.walk(tree):
            for n in names:
                p = os.path.join(d, n)
                if os.path.isfile(p) and not os.path.islink(p):
                    rel = os.path.relpath(p, tree)
                    files.append(rel)
                    sizes[rel] = os.path.getsize(p)
        files.sort()
        tenth = files[::10]
        R = self.results
        R["image"] = {"source": f"debian bookworm minbase + python3 ({len(files)} files, "
                                f"{sum(sizes.values())} bytes)", "mkfs_opts": a.mkfs_opts,
                      "blob_bytes": os.path.getsize(image), "program": " ".join(self.prog)}
        self.start_registry()
        url = self.push(image)
        lazy, plain = self.mountpoint("lazy"), self.mountpoint("plain")
        pulled = os.path.join(self.work, "pulled.erofs")

        def lazy_cold(workload):
            cache = self.fresh_cache()
            drop_caches()
            t_mount = timed(lambda: self.lazy_mount(url, lazy, cache))
            meta = self.status(lazy)
            t_work = timed(workload)
            st = self.status(lazy)
            return t_mount, t_work, meta, st, cache

        def pull_cold(workload):
            drop_caches()
            t_pull = timed(lambda: self.full_pull(url, pulled))
            t_mount = timed(lambda: self.plain_mount(pulled, plain))
            t_work = timed(workload)
            self.umount_plain(plain)
            return t_pull, t_mount, t_work

        ours_url = None
        if a.profiles and a.writer:
            order = self.program_order(tree)
            order_file = os.path.join(self.work, "program.order")
            with open(order_file, "w") as f:
                f.write("".join(p + "\n" for p in order))
            ours = os.path.join(self.work, "ours.erofs")
            log(f"erofs-fanotify build --compress lz4 --order ({len(order)} files the program opens) from {tree}")
            t_build = timed(lambda: run(os.path.join(BIN, "erofs-fanotify"), "build", tree, ours, "--compress",
                                        "lz4", "--order", order_file, stdout=subprocess.DEVNULL))
            R["writer"] = {"blob_bytes": os.path.getsize(ours), "order_files": len(order), "build_s": t_build,
                           "profiles": {}}
            ours_url = self.push(ours)
        tar_ref = None
        if a.profiles and a.tar:
            tar_ref = self.push_tar_image(tree)
        if a.profiles or a.profiles_only:  # PROFILES_ONLY=1 alone: only the big image
            R["profiles"] = {}
            for name in a.profiles:
                rtt, rate = PROFILES[name]
                port = self.start_proxy(rtt, rate)
                log(f"profile {name}: RTT {rtt} ms, cap {rate or 'none'} Mbit/s")
                R["profiles"][name] = self.profile_run(self.via(url, port), files, tenth, sizes, lazy, plain, pulled)
                R["profiles"][name].update({"rtt_ms": rtt, "rate_mbit": rate})
                if ours_url:
                    log(f"profile {name}: our writer's image")
                    R["writer"]["profiles"][name] = self.writer_run(self.via(ours_url, port), lazy, plain, pulled)
                if tar_ref:
                    log(f"profile {name}: the ordinary (tar+gzip) image through its index artifact")
                    R["tar"]["profiles"][name] = self.tar_run(tar_ref.replace(f":{self.reg_port}/", f":{port}/"), lazy)
            if a.profiles_only:
                if a.big_mib:
                    self.big_run(lazy, pulled)
                return R

        # 1. cold mount + program start, lazy vs full pull + plain mount
        log("cold mount + program start")
        t_mount, t_prog, meta, st, _ = lazy_cold(lambda: self.program(lazy))
        self.umount_lazy(lazy)
        p_pull, p_mount, p_prog = pull_cold(lambda: self.program(plain))
        R["mount"] = {"lazy_mount_s": t_mount, "metadata_fetched_bytes": meta["fetched_bytes"],
                      "metadata_requests": meta["fetch_requests"]}
        R["program_start"] = {"lazy_mount_s": t_mount, "lazy_program_s": t_prog, "lazy_total_s": t_mount + t_prog,
                              "lazy_fetched_bytes": st["fetched_bytes"], "lazy_requests": st["fetch_requests"],
                              "pull_s": p_pull, "pull_mount_s": p_mount, "pull_program_s": p_prog,
                              "pull_total_s": p_pull + p_mount + p_prog}

        # 2. read 10% of files cold
        log("read 10% of files cold")
        t_mount, t_read, meta, st, _ = lazy_cold(lambda: self.read_files(lazy, tenth))
        rss_partial = self.agent_rss(lazy)
        self.umount_lazy(lazy)
        p_pull, p_mount, p_read = pull_cold(lambda: self.read_files(plain, tenth))
        read10 = sum(sizes[f] for f in tenth)
        R["read_10pct"] = {"files": len(tenth), "bytes_read": read10, "lazy_mount_s": t_mount, "lazy_read_s": t_read,
                           "lazy_total_s": t_mount + t_read, "fetched_bytes": st["fetched_bytes"],
                           "data_fetched_bytes": st["fetched_bytes"] - meta["fetched_bytes"],
                           "requests": st["fetch_requests"], "events": st["events"],
                           "pull_total_s": p_pull + p_mount + p_read, "pull_s": p_pull, "pull_read_s": p_read,
                           "agent_rss": rss_partial}

        # 3. read all files cold
        log("read all files cold")
        t_mount, t_read, meta, st, _ = lazy_cold(lambda: self.read_files(lazy, files))
        rss_full = self.agent_rss(lazy)
        self.umount_lazy(lazy)
        read_all = sum(sizes.values())
        p_pull, p_mount, p_read = pull_cold(lambda: self.read_files(plain, files))
        R["read_all"] = {"files": len(files), "bytes_read": read_all, "lazy_mount_s": t_mount, "lazy_read_s": t_read,
                         "lazy_total_s": t_mount + t_read, "fetched_bytes": st["fetched_bytes"],
                         "requests": st["fetch_requests"], "events": st["events"], "state_after": st.get("state"),
                         "pull_s": p_pull, "pull_mount_s": p_mount, "pull_read_s": p_read,
                         "pull_total_s": p_pull + p_mount + p_read, "agent_rss": rss_full}

        # 3b. the same, with background prefetch of the whole blob (how a full read should be mounted)
        log("read all files cold, -o prefetch=all")
        cache = self.fresh_cache()
        drop_caches()
        t_mount = timed(lambda: self.lazy_mount(url, lazy, cache, "prefetch=all"))
        t_read = timed(lambda: self.read_files(lazy, files))
        st = self.status(lazy)
        self.umount_lazy(lazy)
        R["read_all_prefetch"] = {"lazy_mount_s": t_mount, "lazy_read_s": t_read, "lazy_total_s": t_mount + t_read,
                                  "fetched_bytes": st["fetched_bytes"], "requests": st["fetch_requests"],
                                  "events": st["events"]}

        # 4. warm reads against a plain file-backed mount of the pulled copy, runs interleaved
        #    (the machine is noisy), in two phases, because a second mount of the same blob
        #    joins the running agent (and its cache) even with another cache_dir:
        #    - mark active: every file but the three largest read once, so the blob is not
        #      complete and the fanotify mark stays (reading everything can complete it);
        #    - detached: -o prefetch=all on a fresh cache, waited for "state": "complete".
        warm_files = sorted(files, key=lambda f: sizes[f])[:-3]
        self.full_pull(url, pulled)
        self.plain_mount(pulled, plain)

        def warm_runs(mp):
            # Per mount: drop caches, read (data local, page cache cold), read twice more (hot).
            # Pairs alternate between the lazy mount and the local copy.
            dropped, hot = {"lazy": [], "local": []}, {"lazy": [], "local": []}
            for _ in range(a.repeat):
                for k, m in (("lazy", mp), ("local", plain)):
                    drop_caches()
                    dropped[k].append(timed(lambda: self.read_files(m, warm_files)))
                    for _ in range(2):
                        hot[k].append(timed(lambda: self.read_files(m, warm_files)))
            return dropped, hot

        log("warm: mark-active mount")
        drop_caches()
        self.lazy_mount(url, lazy, self.fresh_cache())
        self.read_files(lazy, warm_files)
        st0 = self.status(lazy)
        mark_dropped, mark_hot = warm_runs(lazy)
        st1 = self.status(lazy)
        self.umount_lazy(lazy)
        log("warm: prefetch=all mount until complete (detach)")
        drop_caches()
        rss_detach = {}
        t0 = time.monotonic()
        self.lazy_mount(url, lazy, self.fresh_cache(), "prefetch=all")
        _, st_c = self.wait_complete(lazy, a.timeout, rss_detach)
        t_complete = time.monotonic() - t0
        det_dropped, det_hot = warm_runs(lazy)
        same = self.same_content(warm_files, lazy, plain)
        self.umount_lazy(lazy)
        self.umount_plain(plain)
        med = statistics.median

        def ratio(samples):  # median of per-pair ratios: robust to the machine's drift
            return med([x / y for x, y in zip(samples["lazy"], samples["local"])])

        R["warm"] = {"mark_dropped_ratio": ratio(mark_dropped), "mark_hot_ratio": ratio(mark_hot),
                     "detach_dropped_ratio": ratio(det_dropped), "detach_hot_ratio": ratio(det_hot),"files": len(warm_files), "bytes": sum(sizes[f] for f in warm_files),
                     "mark_state": st1.get("state"), "mark_dropped_s": med(mark_dropped["lazy"]),
                     "mark_hot_s": med(mark_hot["lazy"]),
                     "mark_local_dropped_s": med(mark_dropped["local"]), "mark_local_hot_s": med(mark_hot["local"]),
                     "mark_fast_path_events": st1["fast_path_events"] - st0["fast_path_events"],
                     "mark_events": st1["events"] - st0["events"],
                     "mark_fetch_requests": st1["fetch_requests"] - st0["fetch_requests"],
                     "detach_state": st_c.get("state"), "complete_after_s": t_complete,
                     "detach_fetched_bytes": st_c["fetched_bytes"], "detach_requests": st_c["fetch_requests"],
                     "detach_dropped_s": med(det_dropped["lazy"]), "detach_hot_s": med(det_hot["lazy"]),
                     "detach_local_dropped_s": med(det_dropped["local"]), "detach_local_hot_s": med(det_hot["local"]),
                     "samples": {"mark": [mark_dropped, mark_hot], "detach": [det_dropped, det_hot]},
                     "identical": same, "agent_rss_during_prefetch": rss_detach}

        # 5. agent memory for a big image: prefetch everything and sample VmHWM
        if a.big_mib:
            self.big_run(lazy, pulled)
        return R

    def big_run(self, lazy, pulled):
        """The big image: prefetch=all until complete (and the agent's VmHWM) vs curl of the blob."""
        a, R = self.args, self.results
        log(f"{a.big_mib} MiB image: build, push, prefetch=all")
        big_tree = self.make_big_tree(a.big_mib)
        big = os.path.join(self.work, "big.erofs")
        run("mkfs.erofs", big, big_tree, stdout=subprocess.DEVNULL)
        shutil.rmtree(big_tree)
        big_url = self.push(big)
        drop_caches()
        rss = {}
        t0 = time.monotonic()
        self.lazy_mount(big_url, lazy, self.fresh_cache(), "prefetch=all")
        _, st_b = self.wait_complete(lazy, a.timeout, rss)
        t_big = time.monotonic() - t0
        self.umount_lazy(lazy)
        drop_caches()
        t_big_pull = timed(lambda: self.full_pull(big_url, pulled))
        R["big"] = {"blob_bytes": os.path.getsize(big), "prefetch_complete_s": t_big,
                    "fetched_bytes": st_b["fetched_bytes"], "requests": st_b["fetch_requests"],
                    "pull_s": t_big_pull, "agent_rss": rss}

    def profile_run(self, url, files, tenth, sizes, lazy, plain, pulled):
        """The cold figures of one network profile, lazy and full pull side by side."""
        P = {}

        def pull_cold(workload):
            return self.pull_total(url, plain, pulled, workload)

        # program start, lazy (no index, no trace); record a trace on the way
        trace = os.path.join(self.work, "program.trace")
        P.update(self.lazy_program(url, lazy, "record_trace",
                                   lambda: run(os.path.join(BIN, "erofs-fanotify"), "trace", lazy, "--output", trace)))
        # program start, lazy with the trace replayed from the mount on (no index artifact here)
        drop_caches()
        t_mount2 = timed(lambda: self.lazy_mount(url, lazy, self.fresh_cache(), f"prefetch_trace={trace}"))
        t_prog2 = timed(lambda: self.program(lazy))
        self.umount_lazy(lazy)
        P["lazy_trace_program_total_s"] = t_mount2 + t_prog2
        P["pull_program_total_s"] = pull_cold(lambda: self.program(plain))
        # 10 % of the files: bytes fetched / bytes read
        drop_caches()
        self.lazy_mount(url, lazy, self.fresh_cache())
        self.read_files(lazy, tenth)
        st = self.status(lazy)
        self.umount_lazy(lazy)
        read10 = sum(sizes[f] for f in tenth)
        P["read10_bytes_read"] = read10
        P["read10_fetched_bytes"] = st["fetched_bytes"]
        P["read10_requests"] = st["fetch_requests"]
        # all files, prefetch=all, vs pull + read
        drop_caches()
        t0 = time.monotonic()
        self.lazy_mount(url, lazy, self.fresh_cache(), "prefetch=all")
        self.read_files(lazy, files)
        P["read_all_prefetch_s"] = time.monotonic() - t0
        st = self.status(lazy)
        P["read_all_prefetch_requests"] = st["fetch_requests"]
        self.umount_lazy(lazy)
        P["pull_read_all_s"] = pull_cold(lambda: self.read_files(plain, files))
        return P

    def pull_total(self, url, plain, pulled, workload):
        """Cold full pull + plain mount + WORKLOAD, in seconds."""
        drop_caches()
        t_pull = timed(lambda: self.full_pull(url, pulled))
        t_mount = timed(lambda: self.plain_mount(pulled, plain))
        t_work = timed(workload)
        self.umount_plain(plain)
        return t_pull + t_mount + t_work

    def lazy_program(self, url, lazy, extra="", before_umount=None):
        """Cold lazy mount + program start: mount time, requests and bytes at mount and for the program."""
        drop_caches()
        t_mount = timed(lambda: self.lazy_mount(url, lazy, self.fresh_cache(), extra))
        meta = self.status(lazy)
        t_prog = timed(lambda: self.program(lazy))
        st = self.status(lazy)
        if before_umount:
            before_umount()
        self.umount_lazy(lazy)
        return {"mount_s": t_mount, "mount_requests": meta.get("mount_requests", meta["fetch_requests"]),
                "walk_round_trips": meta.get("walk_round_trips"), "metadata_bytes": meta["fetched_bytes"],
                "lazy_program_total_s": t_mount + t_prog, "lazy_program_requests": st["fetch_requests"],
                "lazy_program_fetched_bytes": st["fetched_bytes"]}

    def writer_run(self, url, lazy, plain, pulled):
        """Program start from our writer's image: cold lazy mount (no index, no trace) and full pull side by side."""
        W = self.lazy_program(url, lazy)
        W["pull_program_total_s"] = self.pull_total(url, plain, pulled, lambda: self.program(plain))
        return W

    # ---- the ordinary image (issue 16) ---------------------------------------
    def push_blob_file(self, path):
        url = self.push(path)  # through the main proxy; only the digest is kept
        return url.rsplit("/", 1)[1]

    def push_tar_image(self, tree):
        """The tree as 2 tar+gzip layers (python's stdlib dir apart, as images split a runtime), pushed as
        an OCI image; then `index push` once (its time is the one-time cost)."""
        layers = []
        split = "usr/lib/python3.11"
        for i, (args, label) in enumerate(((["--exclude=./" + split], "base"), ([f"./{split}"], "python stdlib"))):
            raw = os.path.join(self.work, f"layer{i}.tar")
            run("tar", "--numeric-owner", "--xattrs", "-C", tree, "-cf", raw, *args, *([] if i else ["."]))
            diff_id = "sha256:" + subprocess.run(["sha256sum", raw], check=True, capture_output=True,
                                                 text=True).stdout.split()[0]
            run("gzip", "-6", "-n", raw)
            gz = raw + ".gz"
            layers.append({"digest": self.push_blob_file(gz), "size": os.path.getsize(gz), "diff_id": diff_id,
                           "label": label})
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": [l["diff_id"] for l in layers]}}).encode()
        cfg_path = os.path.join(self.work, "tar-config.json")
        with open(cfg_path, "wb") as f:
            f.write(config)
        cfg = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": self.push_blob_file(cfg_path),
               "size": len(config)}
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": cfg,
                    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": l["digest"],
                                "size": l["size"]} for l in layers]}
        man_path = os.path.join(self.work, "tar-manifest.json")
        with open(man_path, "w") as f:
            json.dump(manifest, f)
        run("curl", "-fs", "-X", "PUT", "-H", "Content-Type: application/vnd.oci.image.manifest.v1+json",
            "--data-binary", f"@{man_path}", f"http://127.0.0.1:{self.reg_port}/v2/bench/manifests/tar",
            stdout=subprocess.DEVNULL)
        ref = f"127.0.0.1:{self.reg_port}/bench:tar"
        span = ["--zinfo-span", self.args.tar_span] if self.args.tar_span else []
        log(f"erofs-fanotify index push {' '.join(span)} {ref} ({len(layers)} tar+gzip layers)")
        t_index = timed(lambda: run(os.path.join(BIN, "erofs-fanotify"), "index", "push", "-o", "oci.insecure", *span,
                                    ref, stdout=subprocess.DEVNULL))
        self.tar_layers = layers
        self.results["tar"] = {"layers": [{"bytes": l["size"], "what": l["label"]} for l in layers],
                               "index_push_s": t_index, "zinfo_span": self.args.tar_span or "4M", "profiles": {}}
        return ref

    def tar_run(self, ref, lazy):
        """Program start from the ordinary image: cold lazy mount through the artifact (fresh cache: the
        artifact's files are fetched too) against pull + gunzip + untar of every layer, then chroot."""
        T = self.lazy_program(ref, lazy, extra="oci.insecure")
        base = ref.split("/", 1)[0]
        root = os.path.join(self.work, "untarred")

        def pull_untar():
            shutil.rmtree(root, ignore_errors=True)
            os.makedirs(root)
            for l in self.tar_layers:  # applied in order; this tree has no whiteouts
                curl = subprocess.Popen(["curl", "-fs", f"http://{base}/v2/bench/blobs/{l['digest']}"],
                                        stdout=subprocess.PIPE)
                subprocess.run(["tar", "--numeric-owner", "-xzf", "-", "-C", root], stdin=curl.stdout, check=True)
                curl.stdout.close()
                if curl.wait() != 0:
                    raise RuntimeError("curl of a layer failed")
            run("chroot", root, *self.prog, stdout=subprocess.DEVNULL)

        drop_caches()
        T["pull_program_total_s"] = timed(pull_untar)
        shutil.rmtree(root, ignore_errors=True)
        return T

    def same_content(self, files, a, b):
        def digest(mp):
            h = subprocess.Popen(["sha256sum"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            for i in range(0, len(files), 200):
                subprocess.run(["cat", *[os.path.join(mp, f) for f in files[i:i + 200]]], stdout=h.stdin, check=True)
            out, _ = h.communicate()
            return out.split()[0]
        return digest(a) == digest(b)

    def cleanup(self):
        keep = os.environ.get("KEEP_LOGS")
        if keep:  # the agents' logs, for reading why a figure is what it is
            try:
                shutil.copytree(os.path.join(self.work, "state", "agents"), keep, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("*.sock"))
            except OSError as e:
                log(f"cannot keep the logs: {e}")
        for mp in reversed(self.mounts):
            if os.path.ismount(mp):
                subprocess.run([os.path.join(BIN, "erofs-umount"), mp], stderr=subprocess.DEVNULL)
            if os.path.ismount(mp):
                subprocess.run(["umount", "-l", mp], stderr=subprocess.DEVNULL)
        for pid in self.agent_pids:  # agents exit on umount; any left over was ours
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(self.work, ignore_errors=True)


PROFILES = {"lan": (5, 0), "cloud": (20, 1000), "edge": (50, 100)}
# program start lazy / (pull + mount), per profile: without and with index + trace
START_LIMIT = {"lan": 1.0, "cloud": 0.5, "edge": 0.2}
TRACE_LIMIT = {"lan": 0.5, "edge": 0.1}
# issue 14: program start from our writer's image (no index) / (pull + mount of it)
WRITER_LIMIT = {"lan": 0.5}


def fmt_profiles(R):
    """The per-profile table and its targets (issue 11)."""
    m = R["machine"]
    out = [f"erofs-fanotify benchmark, network profiles — {m['date']} — {m['nproc']} CPUs ({m['cpu']}), "
           f"Linux {m['kernel']}, {m['latency']}",
           f"image: {R['image']['source']}, mkfs.erofs {R['image']['mkfs_opts']}, "
           f"blob {R['image']['blob_bytes'] / 2**20:.1f} MiB; program: {R['image']['program']}; "
           "lazy + trace replays a trace recorded in the same run (no index artifact)", "",
           "| profile | mount | requests at mount | walk round trips | program: lazy / +trace / pull+mount "
           "| 10 %: fetched / read | read all: prefetch=all / pull+read |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    targets = []

    def target(name, value, limit):
        targets.append((name, value, f"<= {limit}", "met" if value <= limit else "NOT met"))

    for name, P in R["profiles"].items():
        out.append(f"| {name} ({P['rtt_ms']} ms, {P['rate_mbit'] or 'no'} cap) | {P['mount_s']:.3f} s | "
                   f"{P['mount_requests']} | {P['walk_round_trips']} | {P['lazy_program_total_s']:.3f} / "
                   f"{P['lazy_trace_program_total_s']:.3f} / {P['pull_program_total_s']:.3f} s | "
                   f"{P['read10_fetched_bytes'] / 2**20:.1f} / {P['read10_bytes_read'] / 2**20:.1f} MiB | "
                   f"{P['read_all_prefetch_s']:.3f} / {P['pull_read_all_s']:.3f} s |")
        target(f"{name}: program start, lazy without index / pull+mount",
               P["lazy_program_total_s"] / P["pull_program_total_s"], START_LIMIT[name])
        if name in TRACE_LIMIT:
            target(f"{name}: program start, lazy + trace (no index) / pull+mount",
                   P["lazy_trace_program_total_s"] / P["pull_program_total_s"], TRACE_LIMIT[name])
        target(f"{name}: requests at mount without index (1/10 of 417)", P["mount_requests"], 41.7)
        target(f"{name}: read all, prefetch=all / pull+read", P["read_all_prefetch_s"] / P["pull_read_all_s"], 1.25)
        target(f"{name}: 10 %: bytes fetched / bytes read", P["read10_fetched_bytes"] / P["read10_bytes_read"], 2.0)
    if "writer" in R:
        w = R["writer"]
        out += ["", f"Our writer's image (`erofs-fanotify build --compress lz4 --order`, {w['order_files']} files the "
                f"program opens first; built in {w['build_s']:.1f} s): blob {w['blob_bytes'] / 2**20:.1f} MiB "
                f"beside mkfs.erofs {R['image']['blob_bytes'] / 2**20:.1f} MiB; no index, no trace", "",
                "| profile | image | mount | requests at mount | walk round trips | program: lazy / pull+mount "
                "| fetched for the program |", "|---|---|---:|---:|---:|---:|---:|"]
        for name, W in w["profiles"].items():
            P = R["profiles"][name]
            for label, X in (("mkfs.erofs", P), ("ours", W)):
                out.append(f"| {name} | {label} | {X['mount_s']:.3f} s | {X['mount_requests']} | "
                           f"{X['walk_round_trips']} | {X['lazy_program_total_s']:.3f} / "
                           f"{X['pull_program_total_s']:.3f} s | "
                           f"{X['lazy_program_fetched_bytes'] / 2**20:.1f} MiB in {X['lazy_program_requests']} req |")
            if name in WRITER_LIMIT:
                target(f"{name}: program start, ours lazy / pull+mount of ours",
                       W["lazy_program_total_s"] / W["pull_program_total_s"], WRITER_LIMIT[name])
            target(f"{name}: requests at mount, ours", W["mount_requests"], 2)
    if "tar" in R:
        t = R["tar"]
        out += ["", f"The same tree as an ordinary image: {len(t['layers'])} tar+gzip layers ("
                + ", ".join(f"{l['what']} {l['bytes'] / 2**20:.1f} MiB" for l in t["layers"])
                + f"), `index push` once in {t['index_push_s']:.1f} s; lazy = a fresh host's cold mount through the "
                "artifact (its files fetched too); pull = download + gunzip + untar every layer, then chroot", "",
                "| profile | mount | requests at mount | program: lazy / pull+untar | fetched for the program |",
                "|---|---:|---:|---:|---:|"]
        for name, T in t["profiles"].items():
            out.append(f"| {name} | {T['mount_s']:.3f} s | {T['mount_requests']} | {T['lazy_program_total_s']:.3f} / "
                       f"{T['pull_program_total_s']:.3f} s | {T['lazy_program_fetched_bytes'] / 2**20:.1f} MiB in "
                       f"{T['lazy_program_requests']} req |")
            if name in START_LIMIT:
                target(f"{name}: program start, tar image via artifact / pull+untar",
                       T["lazy_program_total_s"] / T["pull_program_total_s"], TRACE_LIMIT.get(name, START_LIMIT[name]))
    if "big" in R:
        b = R["big"]
        out += ["", f"{b['blob_bytes'] / 2**20:.0f} MiB image (RTT {R['machine']['rtt_ms']} ms): prefetch=all until "
                f"complete {b['prefetch_complete_s']:.3f} s in {b['requests']} requests, curl {b['pull_s']:.3f} s"]
        target("big image: prefetch=all until complete / curl", b["prefetch_complete_s"] / b["pull_s"], 1.25)
    out += ["", f"| {'target':62} | {'measured':>9} | {'limit':>7} | result |", f"|{'-' * 64}|{'-' * 10}:|{'-' * 8}:|--------|"]
    out += [f"| {a:62} | {b:9.2f} | {c:>7} | {d} |" for a, b, c, d in targets]
    R["profile_targets"] = [{"name": a, "value": b, "limit": c, "result": d} for a, b, c, d in targets]
    return "\n".join(out)


def fmt_table(R, args):
    rows, targets = [], []
    ps, r10, ra, w = R["program_start"], R["read_10pct"], R["read_all"], R["warm"]

    def row(name, lazy, base, note=""):
        rows.append((name, lazy, base, note))

    def target(name, value, limit, op):
        ok = value <= limit if op == "<=" else value >= limit
        targets.append((name, value, f"{op} {limit}", "met" if ok else "NOT met"))

    mib = lambda b: f"{b / 2**20:.1f} MiB"
    row("mount (command -> mounted), cold", f"{R['mount']['lazy_mount_s']:.3f} s",
        f"pull {ps['pull_s']:.3f} s + mount {ps['pull_mount_s']:.3f} s",
        f"metadata {mib(R['mount']['metadata_fetched_bytes'])} in {R['mount']['metadata_requests']} req")
    row(f"program start ({R['image']['program']}), incl. mount", f"{ps['lazy_total_s']:.3f} s",
        f"{ps['pull_total_s']:.3f} s", f"program alone {ps['lazy_program_s']:.3f} s; fetched "
        f"{mib(ps['lazy_fetched_bytes'])} in {ps['lazy_requests']} req")
    row(f"read 10% of files cold ({r10['files']}), incl. mount", f"{r10['lazy_total_s']:.3f} s",
        f"{r10['pull_total_s']:.3f} s", f"read {mib(r10['bytes_read'])}, fetched {mib(r10['fetched_bytes'])} "
        f"(data {mib(r10['data_fetched_bytes'])}) in {r10['requests']} req")
    row(f"read all files cold ({ra['files']}), incl. mount", f"{ra['lazy_total_s']:.3f} s",
        f"{ra['pull_total_s']:.3f} s", f"read {mib(ra['bytes_read'])}, fetched {mib(ra['fetched_bytes'])} "
        f"in {ra['requests']} req; state after: {ra['state_after']}")
    rp = R["read_all_prefetch"]
    row("read all files cold, -o prefetch=all, incl. mount", f"{rp['lazy_total_s']:.3f} s",
        f"{ra['pull_total_s']:.3f} s", f"fetched {mib(rp['fetched_bytes'])} in {rp['requests']} req")
    wf = f"{w['files']} files, {mib(w['bytes'])}"
    row("warm, data local, page cache dropped: mark active", f"{w['mark_dropped_s']:.3f} s",
        f"{w['mark_local_dropped_s']:.3f} s", f"{wf}; state {w['mark_state']}, {w['mark_events']} events "
        f"({w['mark_fast_path_events']} fast path, {w['mark_fetch_requests']} fetches)")
    row("warm, second read (page cache): mark active", f"{w['mark_hot_s']:.3f} s", f"{w['mark_local_hot_s']:.3f} s")
    row("warm, data local, page cache dropped: detached", f"{w['detach_dropped_s']:.3f} s",
        f"{w['detach_local_dropped_s']:.3f} s", f"state {w['detach_state']} {w['complete_after_s']:.1f} s after "
        f"mount; fetched {mib(w['detach_fetched_bytes'])} in {w['detach_requests']} req")
    row("warm, second read (page cache): detached", f"{w['detach_hot_s']:.3f} s", f"{w['detach_local_hot_s']:.3f} s",
        f"content identical to local: {w['identical']}")
    rss_list = [("rootfs, 10% read", r10["agent_rss"]), ("rootfs, all read", ra["agent_rss"]),
                ("rootfs, prefetch=all", w["agent_rss_during_prefetch"])]
    if "big" in R:
        b = R["big"]
        row(f"{mib(b['blob_bytes'])} image: prefetch=all until complete", f"{b['prefetch_complete_s']:.3f} s",
            f"{b['pull_s']:.3f} s", f"fetched {mib(b['fetched_bytes'])} in {b['requests']} req")
        rss_list.append((f"{mib(b['blob_bytes'])} image, prefetch=all", b["agent_rss"]))
    for name, rss in rss_list:
        row(f"agent peak RSS (VmHWM), {name}", f"worker {(rss.get('worker_kib') or 0) / 1024:.1f} MiB",
            "", f"supervisor {(rss.get('supervisor_kib') or 0) / 1024:.1f} MiB")

    target("warm, mark active, caches dropped / plain local", w["mark_dropped_ratio"], 1.10, "<=")
    target("warm, mark active, second read / plain local", w["mark_hot_ratio"], 1.10, "<=")
    target("after detach, caches dropped / plain local", w["detach_dropped_ratio"], 1.02, "<=")
    target("after detach, second read / plain local", w["detach_hot_ratio"], 1.02, "<=")
    target("program start: (pull+mount+run) / (lazy mount+run)", ps["pull_total_s"] / ps["lazy_total_s"], 5, ">=")
    target("cold full read: lazy / (pull+mount+read)", ra["lazy_total_s"] / ra["pull_total_s"], 1.25, "<=")
    target("cold full read, prefetch=all: lazy / (pull+mount+read)", rp["lazy_total_s"] / ra["pull_total_s"], 1.25, "<=")
    target("10% read: bytes fetched (incl. metadata) / bytes read", r10["fetched_bytes"] / r10["bytes_read"], 2, "<=")
    if "big" in R:
        b = R["big"]["agent_rss"]
        target(f"agent RSS, {mib(R['big']['blob_bytes'])} image (MiB, worker+supervisor)",
               ((b.get("worker_kib") or 0) + (b.get("supervisor_kib") or 0)) / 1024, 32, "<=")

    m = R["machine"]
    out = [f"erofs-fanotify benchmark — {m['date']} — {m['nproc']} CPUs, Linux {m['kernel']}, "
           f"RTT {args.rtt_ms} ms ({m['latency']}), bandwidth cap "
           f"{str(args.rate_mbit) + ' Mbit/s' if args.rate_mbit else 'none'}, "
           f"lazy mount options: {args.lazy_opts or 'defaults'}",
           f"image: {R['image']['source']}, mkfs.erofs {R['image']['mkfs_opts']}, blob {mib(R['image']['blob_bytes'])}",
           "", f"| {'measurement':58} | {'lazy':>20} | {'full pull / plain local':>28} | notes |",
           f"|{'-' * 60}|{'-' * 22}:|{'-' * 30}:|-------|"]
    out += [f"| {a:58} | {b:>20} | {c:>28} | {d} |" for a, b, c, d in rows]
    out += ["", "Warm ratios are medians of per-run ratios (runs alternate lazy/local); times above are medians.",
            "", f"| {'target':62} | {'measured':>9} | {'limit':>7} | result |", f"|{'-' * 64}|{'-' * 10}:|{'-' * 8}:|--------|"]
    out += [f"| {a:62} | {b:9.2f} | {c:>7} | {d} |" for a, b, c, d in targets]
    R["targets"] = [{"name": a, "value": b, "limit": c, "result": d} for a, b, c, d in targets]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rtt-ms", type=float, default=float(os.environ.get("RTT_MS", 5)))
    ap.add_argument("--rate-mbit", type=float, default=float(os.environ.get("RATE_MBIT", 0)))
    ap.add_argument("--mkfs-opts", default=os.environ.get("MKFS_OPTS", "-zlz4"))
    ap.add_argument("--big-mib", type=int, default=int(os.environ.get("BIG_MIB", 1024)))
    ap.add_argument("--lazy-opts", default=os.environ.get("LAZY_OPTS", ""),
                    help="extra -o options for every lazy mount, e.g. fetch_unit=128K")
    ap.add_argument("--repeat", type=int, default=int(os.environ.get("REPEAT", 5)))
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--mirror", default=os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian"))
    ap.add_argument("--latency", default="delay proxy (no sch_netem in this kernel)")
    ap.add_argument("--profiles", default=os.environ.get("PROFILES", ""),
                    help="network profiles run side by side: " + ",".join(PROFILES))
    ap.add_argument("--profiles-only", action="store_true", default=bool(os.environ.get("PROFILES_ONLY")),
                    help="run only the profiles (no single-RTT table, warm runs or big image)")
    ap.add_argument("--writer", type=int, default=int(os.environ.get("WRITER", 1)),
                    help="with profiles: also build the tree with our writer (lz4, program order) and measure it")
    ap.add_argument("--tar", type=int, default=int(os.environ.get("TAR", 1)),
                    help="with profiles: also push the tree as a 2-layer tar+gzip image, index push it, and measure "
                         "program start through the artifact against pull + gunzip + untar")
    ap.add_argument("--tar-span", default=os.environ.get("TAR_SPAN", ""),
                    help="with --tar: `index push --zinfo-span` of the tar+gzip image (default: the tool's, 4M)")
    args = ap.parse_args()
    args.profiles = [p for p in args.profiles.split(",") if p]
    for p in args.profiles:
        if p not in PROFILES:
            ap.error(f"unknown profile {p!r} (known: {', '.join(PROFILES)})")
    b = Bench(args)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(130))
    try:
        R = b.main()
        R["machine"] = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "nproc": os.cpu_count(),
                        "kernel": platform.release(), "cpu": cpu_model(), "latency": args.latency,
                        "rtt_ms": args.rtt_ms, "rate_mbit": args.rate_mbit,
                        "lazy_opts": args.lazy_opts}
        parts = []
        if "profiles" in R:
            parts.append(fmt_profiles(R))
        if "program_start" in R:
            parts.append(fmt_table(R, args))
        table = "\n\n".join(parts)
        print(table)
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        out = os.path.join(HERE, "results", time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + ".json")
        with open(out, "w") as f:
            json.dump(R, f, indent=1)
        print(f"\nwrote {os.path.relpath(out, REPO)}")
    finally:
        b.cleanup()


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


if __name__ == "__main__":
    main()

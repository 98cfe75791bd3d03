"""cxlfork "servers" table, redis-server row: a redis-server holding --mib MiB of data (pipelined
SETs of 1000-byte values, random bytes) checkpointed (left running), then the time from the start of a
restore to the first answered GET (a known key's value checked), each clone in a network
namespace of its own: mow (one-shot API `restore()` and `prepare_restore()`d), lazy moa, eager
moa and mow into a warm ghost (the pool refilled between runs, outside the timing); against a
cold start of redis-server loading the same data from its RDB file (written by SAVE) to its
first answered GET, and against `os.fork()` of the server (redis's own `latest_fork_usec`
after a BGSAVE: what a fork-based snapshot pays, the child answers no GET). All measured in
the same run, alternating, medians of --runs. Then memory: the summed PSS of 4 mow clones
after one GET each, and after each read all its values (DEBUG DIGEST), next to the PSS of the
original instance alone.
Run as root:  .venv/bin/python bench/bench_cxlfork_redis.py [--mib 1024] [--runs 5]
(also printed by bench/bench_cxlfork.py --servers, with --redis-mib).
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from kvclient import Resp, RespError  # noqa: E402

from cxlfork.checkpoint import checkpoint  # noqa: E402
from cxlfork.ghosts import GhostPool  # noqa: E402
from cxlfork.restore import prepare_restore, restore  # noqa: E402
from cxlfork.state import netns  # noqa: E402
from cxlfork.store import cxl_node, mount_options  # noqa: E402

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
VALSIZE = 1000
KEY = 12345


def _conf(d: str, port: int) -> str:
    conf = os.path.join(d, f"redis-{port}.conf")
    with open(conf, "w") as f:
        f.write(f"port {port}\nbind 127.0.0.1\ndaemonize no\nsave \"\"\nappendonly no\n"
                f"dir {d}\ndbfilename dump.rdb\nlogfile \"\"\nenable-debug-command local\n")
    return conf


def _connect(pid: int | None, port: int, deadline_s: float = 120.0) -> socket.socket:
    t_end = time.monotonic() + deadline_s
    while True:
        try:
            if pid is None:
                return socket.create_connection(("127.0.0.1", port), timeout=120)
            return netns.connect(pid, ("127.0.0.1", port), timeout=120)
        except (ConnectionRefusedError, ConnectionResetError):
            if time.monotonic() > t_end:
                raise
            time.sleep(0.0005)


def first_get(pid: int | None, port: int) -> None:
    """GET key:KEY until it answers with its value (a cold start answers -LOADING first)."""
    while True:
        r = Resp(_connect(pid, port))
        try:
            while True:
                try:
                    v = r.call("GET", f"key:{KEY}")
                except RespError as e:
                    if str(e).startswith("LOADING"):
                        time.sleep(0.001)
                        continue
                    raise
                if v is None or not v.startswith(f"value:{KEY}".encode()):
                    raise RuntimeError(f"bad answer {v!r:.60}")
                return
        except ConnectionResetError:
            time.sleep(0.001)
        finally:
            r.close()


def load(r: Resp, n: int, batch: int = 2000) -> None:
    """SET key:I to "value:I:" and random bytes (VALSIZE in all; incompressible, so the RDB
    holds as much as memory does), pipelined."""
    block = os.urandom(4 << 20)
    for lo in range(0, n, batch):
        out = []
        for i in range(lo, min(n, lo + batch)):
            k = b"key:%d" % i
            head = b"value:%d:" % i
            off = (i * 7919) % (len(block) - VALSIZE)
            v = head + block[off:off + VALSIZE - len(head)]
            out.append(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                       % (len(k), k, len(v), v))
        r.sock.sendall(b"".join(out))
        for _ in out:
            if r.reply() != "OK":
                raise RuntimeError("SET failed")


def pss_of(pids) -> int:
    tot = 0
    for pid in pids:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    tot += int(line.split()[1]) * 1024
    return tot


def _kill(pid: int) -> None:
    try:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _bgsave_fork_us(r: Resp) -> int:
    r.call("BGSAVE")
    while b"rdb_bgsave_in_progress:1" in r.call("INFO", "persistence"):
        time.sleep(0.02)
    info = r.call("INFO", "stats").decode()
    return int(next(x for x in info.split() if x.startswith("latest_fork_usec:"))
               .split(":")[1])


def run(mib: int = 1024, runs: int = 5, log=lambda m: print(m, file=sys.stderr, flush=True)):
    """The table, as text."""
    work = tempfile.mkdtemp(prefix="cxlfork-bench-redis-")
    store = tempfile.mkdtemp(prefix="cxlfork-bench-redis-store-")
    node, _ = cxl_node()
    subprocess.run(["mount", "-t", "tmpfs", "-o", mount_options(node), "cxlfork-bench-redis",
                    store], check=True)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    conf = _conf(work, port)
    null = os.open("/dev/null", os.O_RDWR)
    stdio = (null, null, null)
    img = os.path.join(work, "redis.img")
    keys = ("mow", "pmow", "moa", "eager", "warm", "cold")
    t: dict[str, list[float]] = {k: [] for k in keys}
    ck, forks, mem = [], [], {}
    orig = None
    try:
        orig = subprocess.Popen([REDIS, conf], cwd=work, stdin=null, stdout=null, stderr=null,
                                close_fds=True)
        r = Resp(_connect(None, port))
        n = mib * 2**20 // (VALSIZE + 80)
        log(f"... redis-server: {n} pipelined SETs of {VALSIZE} random bytes")
        load(r, n)
        first_get(None, port)
        info = r.call("INFO", "memory").decode()
        used = int(next(x for x in info.split() if x.startswith("used_memory:")).split(":")[1])
        mem["orig"] = pss_of([orig.pid])
        log(f"... SAVE ({used / 2**20:.0f} MiB used)")
        r.call("SAVE")
        rdb = os.path.getsize(os.path.join(work, "dump.rdb"))
        for i in range(runs):                # checkpoints; the last one is kept
            if i:
                subprocess.run([sys.executable, "-m", "cxlfork", "rm", img], check=True,
                               capture_output=True)
            s = checkpoint(orig.pid, img, store)
            ck.append(s["total_s"])
            log(f"... checkpoint {i + 1}/{runs}: {s['total_s'] * 1e3:.0f} ms")
        stored = s["bytes"]
        for _ in range(runs):                # after the checkpoints: a child is refused
            forks.append(_bgsave_fork_us(r) / 1e6)
        r.close()
        orig.kill()                          # its port is the cold start's
        orig.wait()
        orig = None
        with prepare_restore(img) as pmow, prepare_restore(img, policy="moa") as pmoa, \
                prepare_restore(img, policy="moa", eager=True) as peager, \
                GhostPool(1, prepared=pmow, refill="manual") as pool:
            for i in range(runs):
                log(f"... restore run {i + 1}/{runs}")
                pool.refill()                # off the clock: a pool that keeps up
                for key in keys:
                    t0 = time.perf_counter()
                    if key == "cold":
                        p = subprocess.Popen([REDIS, conf], cwd=work, stdin=null, stdout=null,
                                             stderr=null, close_fds=True)
                        pid = p.pid
                        first_get(None, port)
                    else:
                        if key == "mow":
                            pid = restore(img, stdio=stdio)[0]
                        elif key == "warm":
                            pid = pmow.restore(1, stdio=stdio, ghosts=pool)[0]
                        else:
                            pid = {"pmow": pmow, "moa": pmoa, "eager": peager}[key].restore(
                                1, stdio=stdio)[0]
                        first_get(pid, port)
                    t[key].append(time.perf_counter() - t0)
                    _kill(pid)
            log("... 4 mow clones")
            pids = pmow.restore(4, stdio=stdio)
            try:
                for pid in pids:
                    first_get(pid, port)
                mem["get"] = pss_of(pids)
                for pid in pids:
                    c = Resp(_connect(pid, port))
                    c.call("DEBUG", "DIGEST")
                    c.close()
                mem["read"] = pss_of(pids)
            finally:
                for pid in pids:
                    _kill(pid)
    finally:
        os.close(null)
        if orig is not None:
            orig.kill()
            orig.wait()
        subprocess.run([sys.executable, "-m", "cxlfork", "rm", img], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        subprocess.run(["umount", store], check=False)
        os.rmdir(store)
    m = {k: statistics.median(v) for k, v in t.items()}
    ms = lambda x: f"{x * 1e3:.2f} ms"   # noqa: E731
    hdr = ("redis data", "stored", "checkpoint", "mow (API)", "mow (prep)", "moa lazy",
           "moa eager", "warm ghost", "cold (RDB)", "os.fork()", "cold/mow")
    vals = (f"{used / 2**20:.0f} MiB", f"{stored / 2**20:.0f} MiB",
            ms(statistics.median(ck)), *(ms(m[k]) for k in keys),
            ms(statistics.median(forks)), f"{m['cold'] / m['mow']:.0f}x")
    mhdr = ("one instance", "4 clones, GET", "4 clones, read", "ratio, read")
    mvals = (f"{mem['orig'] / 2**20:.0f} MiB", f"{mem['get'] / 2**20:.0f} MiB",
             f"{mem['read'] / 2**20:.0f} MiB", f"{mem['read'] / mem['orig']:.2f}x")
    loadavg = os.getloadavg()[0]
    return (f"\nservers: redis-server ({used / 2**20:.0f} MiB used, RDB {rdb / 2**20:.0f} "
            f"MiB): restore start -> first answered GET, each clone in a new network "
            f"namespace; medians of {runs}, alternating; load average {loadavg:.1f}; kernel "
            f"{os.uname().release}\n" + " | ".join(f"{h:>12s}" for h in hdr) + "\n" +
            " | ".join(f"{v:>12s}" for v in vals) +
            "\nmemory (PSS, smaps_rollup): the original alone; 4 mow clones summed after one "
            "GET each, and after each read every value (DEBUG DIGEST)\n" +
            " | ".join(f"{h:>15s}" for h in mhdr) + "\n" +
            " | ".join(f"{v:>15s}" for v in mvals))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_cxlfork_redis: run as root (ptrace, namespaces)")
    print(run(a.mib, a.runs))


if __name__ == "__main__":
    main()

"""cxlfork "servers" table: `python3 -m http.server` checkpointed, then the time from the start
of a restore to the first answered GET (a file served by the clone), restored into a new
network namespace of its own (the default) and into this one (`--netns host`), as a one-shot
`cxlfork.restore.restore()` and as a `prepare_restore()`d restore, next to a cold start of
`python3 -m http.server` to its first answered GET, and into a warm ghost (new namespace;
the pool refilled between runs, outside the timing), measured in the same run (medians of
--runs, alternating). The GET of a clone in its own namespace is made from a thread of this
process that setns()es into `/proc/PID/ns/net` (cxlfork.state.netns.inside).
Run as root:  .venv/bin/python bench/bench_cxlfork_servers.py [--runs 5] [--redis-mib 1024]
(--redis-mib: also the redis-server row, bench_cxlfork_redis.py)
(also printed by bench/bench_cxlfork.py, or alone with its --servers).
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
sys.path.insert(0, os.path.dirname(HERE))

from cxlfork.checkpoint import checkpoint  # noqa: E402
from cxlfork.ghosts import GhostPool  # noqa: E402
from cxlfork.restore import prepare_restore, restore  # noqa: E402
from cxlfork.state import netns  # noqa: E402

BODY = b"hello from the http.server image\n"


def get(port: int, deadline_s: float = 30.0) -> None:
    """GET /hello.txt from 127.0.0.1:port in the calling thread's namespace, retrying until
    the server answers; checks the body."""
    t_end = time.monotonic() + deadline_s
    while True:
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /hello.txt HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            if data.startswith(b"HTTP/1.0 200") and data.endswith(BODY):
                return
            raise RuntimeError(f"bad answer {data[:80]!r}")
        except (ConnectionRefusedError, ConnectionResetError):
            if time.monotonic() > t_end:
                raise
            time.sleep(0.0005)
        finally:
            s.close()


def get_in(pid: int, port: int) -> None:
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with netns.inside(fd):
            get(port)
    finally:
        os.close(fd)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def run(runs: int = 5) -> str:
    """The table, as text."""
    work = tempfile.mkdtemp(prefix="cxlfork-bench-http-")
    store = tempfile.mkdtemp(prefix="cxlfork-bench-http-store-", dir="/dev/shm")
    www = os.path.join(work, "www")
    os.mkdir(www)
    with open(os.path.join(www, "hello.txt"), "wb") as f:
        f.write(BODY)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))            # a free port (http.server sets SO_REUSEADDR)
    port = probe.getsockname()[1]
    probe.close()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    null = os.open("/dev/null", os.O_RDWR)
    img = os.path.join(work, "http.img")
    keys = ("new", "host", "pnew", "phost", "warm", "cold")
    t: dict[str, list[float]] = {k: [] for k in keys}
    try:
        orig = subprocess.Popen(argv, cwd=www, stdin=null, stdout=null, stderr=null,
                                close_fds=True)
        get(port)
        checkpoint(orig.pid, img, store, kill=True)
        orig.wait()
        with prepare_restore(img) as prep, \
                GhostPool(1, prepared=prep, refill="manual") as pool:
            for _ in range(runs):
                pool.refill()               # outside the timing: a pool that keeps up
                for key in keys:
                    mode = "host" if key.endswith("host") else "new"
                    t0 = time.perf_counter()
                    if key == "cold":
                        p = subprocess.Popen(argv, cwd=www, stdin=null, stdout=null,
                                             stderr=null, close_fds=True)
                        pid = p.pid
                        get(port)
                    else:
                        if key == "warm":
                            pid = prep.restore(1, stdio=(null, null, null), ghosts=pool)[0]
                        elif key.startswith("p"):
                            pid = prep.restore(1, stdio=(null, null, null), netns=mode)[0]
                        else:
                            pid = restore(img, stdio=(null, null, null), netns=mode)[0]
                        (get(port) if mode == "host" else get_in(pid, port))
                    t[key].append(time.perf_counter() - t0)
                    _kill(pid)
    finally:
        os.close(null)
        subprocess.run([sys.executable, "-m", "cxlfork", "rm", img], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)
    m = {k: statistics.median(v) for k, v in t.items()}
    hdr = ("server", "new netns (API)", "host (API)", "new netns (prep)", "host (prep)",
           "warm ghost, netns", "cold start", "cold/new (API)", "netns cost (prep)")
    vals = ("http.server", *(f"{m[k] * 1e3:.2f} ms" for k in keys),
            f"{m['cold'] / m['new']:.1f}x", f"{(m['pnew'] - m['phost']) * 1e3:+.2f} ms")
    return (f"\nservers: restore start -> first answered GET (python3 -m http.server, a "
            f"{len(BODY)} B file), medians of {runs}, alternating; kernel "
            f"{os.uname().release}\n" + " | ".join(f"{h:>17s}" for h in hdr) + "\n" +
            " | ".join(f"{v:>17s}" for v in vals))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--redis-mib", type=int, default=0, help="add the redis-server row "
                    "(bench_cxlfork_redis.py) with this much data")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_cxlfork_servers: run as root (ptrace, namespaces)")
    print(run(a.runs))
    if a.redis_mib:
        sys.path.insert(0, HERE)
        from bench_cxlfork_redis import run as redis_table
        print(redis_table(a.redis_mib, a.runs))


if __name__ == "__main__":
    main()

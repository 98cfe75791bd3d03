"""cxlfork benchmark: checkpoint and restore of Python workers with 64 MiB / 256 MiB (and
1 GiB with --full) of initialised numpy state, next to its baselines measured in the same run:
os.fork() of the warm worker and a cold start of the same worker; then CRIU side by side
(bench_criu.py; alone with --criu): `criu dump` / `criu restore` / the restored process's
full read against `cxlfork checkpoint` / `cxlfork restore` / the clone's, when a working criu
is on PATH or in /var/cache/tiermem/criu (`make criu`; skipped with the reason otherwise). Then the memory of N = 1, 4, 16 clones (sum of
PSS and of private bytes from /proc/PID/smaps_rollup) for mow, moa (lazy), moa --eager and
hybrid; each clone has its own pipes and answers one ping, then one whole-state read.

Latency = from the start of the restore (or fork, or cold start) to the clone answering
"pong" on a pipe. "API" = cxlfork.restore.restore() (checks the image, builds the plan, opens
files, restores); "prepared" = Prepared.restore() of an object made once by prepare_restore()
(what a server that restores the same image again and again pays); "ghost" = the same into
an idle ghost of a cxlfork.ghosts.GhostPool (refilled between runs, outside the timing: the
steady state of a pool that keeps up); "warm ghost" = into a warm ghost (GhostPool(prepared=),
which ran the memory part of the plan when spawned); "CLI" = `python -m cxlfork
restore --detach`, interpreter start included. The checkpoint rate is next to the rate this
machine fills fresh memory (numpy.ones of the same size in this process), the bound for
anything that writes a new copy. Medians of --runs runs.
`--integrity N`: only the cost of the image checks on the restore path (docs/cxlfork.md): N
alternating one-shot API mow restores with the page-file checks (store directory and page file
owned by the caller, O_NOFOLLOW, pin compared after fstat) and with the plain open of before;
the checks alone; the manifest's HMAC-SHA256 next to the unkeyed SHA-256 it replaced; and the
full content hash of the page file (what `verify` runs, and what hashing every chunk at restore
would cost).
Last, the "servers" table (bench_cxlfork_servers.py; alone with --servers): `python3 -m
http.server` from restore start to its first answered GET, into a new network namespace and
into this one, against a cold start, medians of max(--runs, 5); and redis-server holding
--redis-mib MiB (bench_cxlfork_redis.py): checkpoint, first answered GET per policy against a
cold start from its RDB file and os.fork(), PSS of 4 clones; nginx and a Node.js app
(bench_cxlfork_web.py) from restore start to the first answered request against a cold start.
Run as root:  .venv/bin/python bench/bench_cxlfork.py [--full] [--servers]
"""
from __future__ import annotations

import argparse
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
WORKER = os.path.join(os.path.dirname(HERE), "tests", "cxlfork_progs", "worker.py")
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1")

from cxlfork import image as image_mod  # noqa: E402
from cxlfork.checkpoint import checkpoint  # noqa: E402
from cxlfork.ghosts import GhostPool  # noqa: E402
from cxlfork.profile import record  # noqa: E402
from cxlfork.restore import prepare_restore, restore  # noqa: E402
from cxlfork.store import cxl_node, mount_options  # noqa: E402


def readline(fd: int, timeout=120.0) -> str:
    out = b""
    while not out.endswith(b"\n"):
        if not select.select([fd], [], [], timeout)[0]:
            raise TimeoutError(f"no answer (got {out!r})")
        c = os.read(fd, 1)
        if not c:
            raise EOFError(out)
        out += c
    return out.decode().strip()


def start_worker(mib: int):
    """(Popen, seconds from spawn to 'ready')."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, WORKER, str(mib)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, close_fds=True, env=ENV)
    assert readline(p.stdout.fileno()) == "ready"
    return p, time.perf_counter() - t0


def ask(p, cmd: str) -> str:
    p.stdin.write(cmd.encode() + b"\n")
    p.stdin.flush()
    return readline(p.stdout.fileno())


class Pipes:
    """stdin/stdout pipes for clones restored through the library."""

    def __init__(self):
        self.in_r, self.in_w = os.pipe()
        self.out_r, self.out_w = os.pipe()

    def fds(self):
        return (self.in_r, self.out_w, self.out_w)

    def ask(self, cmd: str) -> str:
        os.write(self.in_w, cmd.encode() + b"\n")
        return readline(self.out_r)

    def close(self):
        for fd in (self.in_r, self.in_w, self.out_r, self.out_w):
            os.close(fd)


def kill_all(pids):
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    for pid in pids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def mem_of(pids) -> tuple[int, int]:
    pss = priv = 0
    for pid in pids:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k == "Pss":
                    pss += int(v.split()[0]) * 1024
                elif k in ("Private_Clean", "Private_Dirty"):
                    priv += int(v.split()[0]) * 1024
    return pss, priv


def timed_restore(go, *pools) -> float:
    """Seconds from go(pipes) (a restore returning pids) to the clone answering a ping; the
    clone is then killed and each ghost pool refilled off the clock."""
    pp = Pipes()
    t0 = time.perf_counter()
    pids = go(pp)
    assert pp.ask("ping") == "pong"
    dt = time.perf_counter() - t0
    kill_all(pids)
    pp.close()
    for pool in pools:
        pool.refill()
    return dt


def med(xs):
    return statistics.median(xs)


def bench_size(mib: int, runs: int, counts, work: str, store: str, rows, memrows):
    w, _ = start_worker(mib)
    try:
        cold = [start_worker(mib) for _ in range(runs)]
        for p, _ in cold:
            p.kill()
            p.wait()
        cold_s = med([t for _, t in cold])
        forks = []
        for _ in range(runs):
            t0 = time.perf_counter()
            assert ask(w, "fork") == "pong"
            forks.append(time.perf_counter() - t0)
        assert ask(w, "ping") == "pong"     # the worker has reaped its last fork child
        ck, ck_pages, img = [], [], None
        for k in range(runs):
            path = os.path.join(work, f"w{mib}-{k}.img")
            r = checkpoint(w.pid, path, store)
            ck.append(r["total_s"])
            ck_pages.append(r["bytes"] / (r["pages_ms"] / 1e3) if r["pages_ms"] else 0)
            if img is None:
                img, nbytes = path, r["bytes"]
            else:
                image_mod.remove(path)
        fill = []
        import numpy as np
        for _ in range(runs):
            t0 = time.perf_counter()
            a = np.ones(nbytes // 8)
            fill.append(nbytes / (time.perf_counter() - t0))
            del a
        lat = {}
        for key, policy, eager in (("mow", "mow", False), ("moa", "moa", False),
                                   ("moa-eager", "moa", True)):
            ts = []
            for _ in range(runs):
                ts.append(timed_restore(
                    lambda pp: restore(img, policy, stdio=pp.fds(), eager=eager)))
            lat[key] = med(ts)
        ts, tg, tw = [], [], []
        with prepare_restore(img, "mow") as prep, GhostPool(1, refill="manual") as pool, \
                GhostPool(1, refill="manual", prepared=prep) as warm:
            for _ in range(runs):
                for out, ghosts in ((ts, None), (tg, pool), (tw, warm)):
                    out.append(timed_restore(
                        lambda pp: prep.restore(1, stdio=pp.fds(), ghosts=ghosts), pool, warm))
            assert pool.stats()["fallbacks"] == 0 and warm.stats()["fallbacks"] == 0
        lat["prepared"] = med(ts)
        lat["ghost"] = med(tg)
        lat["warm"] = med(tw)
        cli = []
        for _ in range(runs):
            t0 = time.perf_counter()
            c = subprocess.Popen([sys.executable, "-m", "cxlfork", "restore", img, "--detach",
                                  "--pidfile", img + ".pid"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, close_fds=True)
            try:
                c.stdin.write(b"ping\n")
                c.stdin.flush()
                # two lines, in either order (the PID line of --detach and the clone's pong,
                # written by two processes: they can interleave)
                got = readline(c.stdout.fileno())
                if "pong" not in got:
                    got += readline(c.stdout.fileno())
                assert "pong" in got, got
                cli.append(time.perf_counter() - t0)
                c.wait()
            finally:
                if c.poll() is None:
                    c.kill()
                    c.wait()
                if os.path.exists(img + ".pid"):
                    kill_all([int(open(img + ".pid").read())])
                    os.unlink(img + ".pid")
        fork_s = med(forks)
        rows.append((mib, nbytes, med(ck), med(ck_pages), med(fill), fork_s, lat["mow"],
                     lat["prepared"], lat["ghost"], lat["warm"], lat["moa"], lat["moa-eager"],
                     med(cli), cold_s))
        print(f"    {rows[-1]}", file=sys.stderr, flush=True)
        # hybrid profile: one clone that answered a ping (touched the interpreter, not the array)
        pp = Pipes()
        pids = restore(img, "mow", stdio=pp.fds())
        assert pp.ask("ping") == "pong"
        record(img, pids)
        kill_all(pids)
        pp.close()
        for label in ("mow", "moa", "moa --eager", "hybrid"):
            policy, eager = label.split()[0], label.endswith("--eager")
            for n in counts:
                if policy == "moa" and n * mib > 4096:
                    memrows.append((mib, label, n, None, None, None, None,
                                    "skipped: > 4 GiB of copies"))
                    continue
                # each clone its own stdin/stdout, so that each answers exactly one request
                # of each kind (on a shared pipe, one clone could take several)
                pps = [Pipes() for _ in range(n)]
                with prepare_restore(img, policy, eager=eager) as prep:
                    pids = [prep.restore(1, stdio=pp.fds())[0] for pp in pps]
                for pp in pps:                         # a light request per clone
                    assert pp.ask("ping") == "pong"
                pss0, priv0 = mem_of(pids)
                for pp in pps:                         # every clone reads its whole state
                    assert pp.ask("read") == "done"
                pss, priv = mem_of(pids)
                memrows.append((mib, label, n, pss0, priv0, pss, priv, ""))
                kill_all(pids)
                for pp in pps:
                    pp.close()
        image_mod.remove(img)
    finally:
        w.kill()
        w.wait()


def alternate(mib: int, runs: int, work: str, store: str) -> str:
    """os.fork(), a prepared mow restore (spawned, and into a ghost) and a one-shot API mow
    restore, alternating (so all see the same load); returns the summary line."""
    w, _ = start_worker(mib)
    try:
        img = os.path.join(work, f"alt{mib}.img")
        checkpoint(w.pid, img, store)
        f, p, g, wg, a = [], [], [], [], []
        with prepare_restore(img, "mow") as prep, GhostPool(1, refill="manual") as pool, \
                GhostPool(1, refill="manual", prepared=prep) as warm:
            for _ in range(runs):
                t0 = time.perf_counter()
                assert ask(w, "fork") == "pong"
                f.append(time.perf_counter() - t0)
                assert ask(w, "ping") == "pong"
                for out, go in ((p, lambda pp: prep.restore(1, stdio=pp.fds())),
                                (g, lambda pp: prep.restore(1, stdio=pp.fds(), ghosts=pool)),
                                (wg, lambda pp: prep.restore(1, stdio=pp.fds(), ghosts=warm)),
                                (a, lambda pp: restore(img, "mow", stdio=pp.fds()))):
                    out.append(timed_restore(go, pool, warm))
            assert pool.stats()["fallbacks"] == 0 and warm.stats()["fallbacks"] == 0
        image_mod.remove(img)
    finally:
        w.kill()
        w.wait()
    return (f"{mib} MiB, {runs} alternating runs (medians, min): os.fork() {med(f) * 1e3:.2f} "
            f"ms ({min(f) * 1e3:.2f}); prepared mow {med(p) * 1e3:.2f} ms ({min(p) * 1e3:.2f}); "
            f"into a ghost {med(g) * 1e3:.2f} ms ({min(g) * 1e3:.2f}); into a warm ghost "
            f"{med(wg) * 1e3:.2f} ms ({min(wg) * 1e3:.2f}); one-shot API mow "
            f"{med(a) * 1e3:.2f} ms ({min(a) * 1e3:.2f}); prepared/fork {med(p) / med(f):.2f}x; "
            f"ghost/fork {med(g) / med(f):.2f}x; warm/fork {med(wg) / med(f):.2f}x; "
            f"load average {os.getloadavg()[0]:.1f}")


def _plain_open_store_file(m: dict, image: str, pin: bool = True) -> int:
    """The page-file open of before the checks (issue 18.6): open by path, check the size."""
    fd = os.open(image_mod.store_file(m), os.O_RDONLY | os.O_CLOEXEC)
    if os.fstat(fd).st_size != m["store"]["pages"] * 4096:
        os.close(fd)
        raise RuntimeError("size")
    return fd


def integrity(mib: int, runs: int, work: str, store: str) -> tuple:
    """Restore with the page-file checks vs without (alternating), and the checks' parts."""
    import hashlib
    checked_open = image_mod.open_store_file
    w, _ = start_worker(mib)
    try:
        img = os.path.join(work, f"integ{mib}.img")
        checkpoint(w.pid, img, store)
        m = image_mod.load(img)
        with_c, without = [], []
        try:
            pair = [(with_c, checked_open), (without, _plain_open_store_file)]
            for i in range(runs):                      # which goes first alternates too
                for out, opener in (pair if i % 2 == 0 else pair[::-1]):
                    image_mod.open_store_file = opener
                    out.append(timed_restore(lambda pp: restore(img, "mow", stdio=pp.fds())))
        finally:
            image_mod.open_store_file = checked_open

        def each(fn, k=200):
            ts = []
            for _ in range(k):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return med(ts)
        t_check = each(lambda: os.close(checked_open(m, img)))
        t_plain = each(lambda: os.close(_plain_open_store_file(m, img)))
        body = image_mod.canonical({k: v for k, v in m.items() if k != "checksum"})
        t_hmac = each(lambda: image_mod.checksum(m), 20)
        t_sha = each(lambda: hashlib.sha256(image_mod.canonical(
            {k: v for k, v in m.items() if k != "checksum"})).hexdigest(), 20)
        fd = os.open(image_mod.store_file(m), os.O_RDONLY)
        try:
            t_hash = each(lambda: image_mod.page_file_hash(fd, m["store"]["pages"] * 4096,
                                                           m["store"]["hash_alg"]), 3)
        finally:
            os.close(fd)
        image_mod.remove(img)
    finally:
        w.kill()
        w.wait()
    return (mib, m["store"]["pages"] * 4096, med(with_c), med(without), t_check, t_plain,
            len(body), t_hmac, t_sha, t_hash)


def print_integrity(rows, runs: int) -> None:
    print(f"\nimage checks on the restore path: one-shot API mow restore (start -> clone answers "
          f"a ping), {runs} alternating runs each, medians; load average "
          f"{os.getloadavg()[0]:.1f}")
    hdr = ("state", "stored", "restore+checks", "restore plain", "ratio", "checks alone",
           "plain open", "manifest", "HMAC-SHA256", "SHA-256", "content hash")
    print(" | ".join(f"{h:>14s}" for h in hdr))
    for (mib, nb, wc, wo, tc, tp, mlen, th, ts, thash) in rows:
        vals = (f"{mib} MiB", f"{nb / 2**20:.0f} MiB", f"{wc * 1e3:.2f} ms", f"{wo * 1e3:.2f} ms",
                f"{wc / wo:.2f}x", f"{tc * 1e6:.1f} us", f"{tp * 1e6:.1f} us",
                f"{mlen / 1024:.0f} KiB", f"{th * 1e6:.0f} us", f"{ts * 1e6:.0f} us",
                f"{thash * 1e3:.1f} ms")
        print(" | ".join(f"{v:>14s}" for v in vals))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="add the 1 GiB worker")
    ap.add_argument("--sizes", default=None, help="MiB list, e.g. 64,256")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--counts", default="1,4,16")
    ap.add_argument("--alternate", type=int, default=0, metavar="N",
                    help="only: N alternating runs of os.fork(), prepared (spawned, into a "
                         "ghost, into a warm ghost) and one-shot mow restore per size")
    ap.add_argument("--integrity", type=int, default=0, metavar="N",
                    help="only: N alternating restores with and without the image checks "
                         "per size, and the checks' parts")
    ap.add_argument("--criu", action="store_true", help="only: CRIU side by side "
                    "(bench_criu.py: criu dump/restore vs cxlfork checkpoint/restore of the "
                    "same workers, alternating; needs a working criu, see 'make criu')")
    ap.add_argument("--servers", action="store_true", help="only: the servers table "
                    "(bench_cxlfork_servers.py: http.server restored into a new network "
                    "namespace, into this one, cold start; to the first answered GET; then "
                    "redis-server, bench_cxlfork_redis.py)")
    ap.add_argument("--redis-mib", type=int, default=1024, help="data of the redis-server "
                    "row of the servers table (0: no redis row)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_cxlfork: run as root (ptrace, PR_SET_MM_MAP)")
    sizes = [int(x) for x in (a.sizes or ("64,256,1024" if a.full else "64,256")).split(",")]
    counts = [int(x) for x in a.counts.split(",")]
    sys.path.insert(0, HERE)
    from bench_cxlfork_redis import run as redis_table
    from bench_cxlfork_servers import run as servers_table
    from bench_cxlfork_web import run as web_table
    from bench_criu import run as criu_table
    if a.servers:
        print(servers_table(max(a.runs, 5)))
        if a.redis_mib:
            print(redis_table(a.redis_mib, max(a.runs, 5)))
        print(web_table(max(a.runs, 5)))
        return
    work = tempfile.mkdtemp(prefix="cxlfork-bench-")
    # the page store: a tmpfs mounted like cxlfork's default store (huge=within_size, bound
    # to the CXL node), private to this run
    store = tempfile.mkdtemp(prefix="cxlfork-bench-store-")
    node, _ = cxl_node()
    subprocess.run(["mount", "-t", "tmpfs", "-o", mount_options(node), "cxlfork-bench", store],
                   check=True)
    rows, memrows = [], []
    try:
        if a.integrity:
            print_integrity([integrity(mib, a.integrity, work, store) for mib in sizes],
                            a.integrity)
            return
        if a.alternate:
            for mib in sizes:
                print(alternate(mib, a.alternate, work, store), flush=True)
            return
        if a.criu:
            print(criu_table(sizes, a.runs, store, ENV))
            return
        for mib in sizes:
            print(f"... {mib} MiB worker", file=sys.stderr, flush=True)
            bench_size(mib, a.runs, counts, work, store, rows, memrows)
        criu = criu_table(sizes, a.runs, store, ENV)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        subprocess.run(["umount", store], check=False)
        os.rmdir(store)
    print(f"\ncxlfork restore latency (start -> clone answers on a pipe), medians of {a.runs}; "
          "kernel " + os.uname().release)
    hdr = ("state", "stored", "ckpt total", "ckpt pages", "fresh fill", "os.fork()",
           "mow (API)", "mow prepared", "prepared/fork", "mow ghost", "ghost/fork",
           "warm ghost", "warm/fork", "moa lazy", "moa eager", "mow (CLI)",
           "cold start")
    print(" | ".join(f"{h:>13s}" for h in hdr))
    for (mib, nb, ck, rate, fill, fk, mow, prep, ghost, wghost, moa, moae, cli,
         cold) in rows:
        vals = (f"{mib} MiB", f"{nb / 2**20:.0f} MiB", f"{ck * 1e3:.1f} ms",
                f"{rate / 1e9:.2f} GB/s", f"{fill / 1e9:.2f} GB/s", f"{fk * 1e3:.2f} ms",
                f"{mow * 1e3:.2f} ms", f"{prep * 1e3:.2f} ms", f"{prep / fk:.2f}x",
                f"{ghost * 1e3:.2f} ms", f"{ghost / fk:.2f}x",
                f"{wghost * 1e3:.2f} ms", f"{wghost / fk:.2f}x",
                f"{moa * 1e3:.2f} ms", f"{moae * 1e3:.2f} ms", f"{cli * 1e3:.1f} ms",
                f"{cold * 1e3:.0f} ms")
        print(" | ".join(f"{v:>13s}" for v in vals))
    print("\nmemory of N clones (sums over clones): after one ping each, then after each read "
          "its whole state")

    def mb(x):
        return "-" if x is None else f"{x / 2**20:.0f} MiB"
    print(" | ".join(f"{h:>13s}" for h in ("state", "policy", "N", "PSS (ping)",
                                            "private (ping)", "PSS (read)", "private (read)",
                                            "note")))
    for (mib, pol, n, pss0, priv0, pss, priv, note) in memrows:
        vals = (f"{mib} MiB", pol, str(n), mb(pss0), mb(priv0), mb(pss), mb(priv), note)
        print(" | ".join(f"{v:>13s}" for v in vals))
    print(criu)
    print(servers_table(max(a.runs, 5)))
    if a.redis_mib:
        print(redis_table(a.redis_mib, max(a.runs, 5)))
    print(web_table(max(a.runs, 5)))


if __name__ == "__main__":
    main()

"""What anonymous semantics of store-mapped pages (issue 13.4, docs/cxlfork.md) cost a mow
clone: restore time and the clone's first full read of its state, with the userfaultfd of its
store-mapped anonymous runs (the default) and without it (prepare_restore(anon=False): the
runs are a plain private file mapping of the page file, as before), in the same run,
alternating, medians of --runs. For a spawned prepared restore, a warm ghost, and a warm
ghost that prefaulted its store mappings read-only (GhostPool(prefault=True)); next to the
first reference, the original worker reading its own resident anonymous memory.

"restore" = from the start of Prepared.restore() to the clone answering "pong";
"first read" = the clone's first "read" request (numpy reduces the whole array: every page
touched once) to its answer. "faults" = the handler's round trips per clone (restore, ping
and read); "PSS ping" = the clone's PSS after its first ping (store pages it maps count).
Run as root:  .venv/bin/python bench/bench_anon.py [--mib 256] [--runs 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_cxlfork import Pipes, ask, kill_all, mem_of, start_worker  # noqa: E402
from cxlfork.checkpoint import checkpoint  # noqa: E402
from cxlfork.ghosts import GhostPool  # noqa: E402
from cxlfork.restore import lazy_stats, prepare_restore  # noqa: E402


def one(p, pool, pipes: Pipes) -> tuple[float, float, dict]:
    """(restore s, first full read s, handler counters, PSS after the ping) of one clone."""
    before = lazy_stats()
    t0 = time.perf_counter()
    pid, = p.restore(1, stdio=pipes.fds(), ghosts=pool)
    assert pipes.ask("ping") == "pong"
    t1 = time.perf_counter()
    pss = mem_of([pid])[0]
    assert pipes.ask("read") == "done"
    t2 = time.perf_counter()
    after = lazy_stats()
    kill_all([pid])
    return t1 - t0, t2 - t1, {k: after[k] - before[k] for k in ("faults", "pages_mapped")}, pss


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_anon: needs root (ptrace, PR_SET_MM_MAP, userfaultfd)")
    work = tempfile.mkdtemp(prefix="bench-anon-")
    store = tempfile.mkdtemp(prefix="bench-anon-store-", dir="/dev/shm")
    w, _ = start_worker(a.mib)
    img = os.path.join(work, "w.img")
    res: dict[str, list] = {}
    ref = []
    try:
        for _ in range(a.runs):
            t = time.perf_counter()
            assert ask(w, "read") == "done"
            ref.append(time.perf_counter() - t)
        checkpoint(w.pid, img, store, kill=True)
        w.wait()
        pipes = Pipes()
        with prepare_restore(img, "mow") as on, prepare_restore(img, "mow", anon=False) as off:
            kinds = [("spawned", None), ("warm ghost", False), ("prefaulted ghost", True)]
            pools = {}
            for name, pf in kinds:
                if pf is None:
                    continue
                for tag, p in (("with", on), ("without", off)):
                    pools[name, tag] = GhostPool(1, refill="manual", prepared=p, prefault=pf)
            try:
                for _ in range(a.runs):
                    for name, pf in kinds:
                        for tag, p in (("with", on), ("without", off)):
                            pool = pools.get((name, tag))
                            res.setdefault((name, tag), []).append(one(p, pool, pipes))
                            if pool is not None:
                                pool.refill()
            finally:
                for pool in pools.values():
                    pool.close()
        pipes.close()
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
        import shutil
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)

    def med(xs):
        return statistics.median(xs) * 1e3
    print(f"mow clone of the {a.mib} MiB worker, medians of {a.runs} alternating runs "
          f"(load average {os.getloadavg()[0]:.1f}); the original reading its own resident "
          f"anonymous memory: {med(ref):.1f} ms")
    hdr = ("restore into", "restore with", "without", "ratio", "1st read with", "without",
           "ratio", "faults with", "PSS ping with", "without")
    print(" | ".join(f"{h:>16}" for h in hdr))
    for name, _ in (("spawned", 0), ("warm ghost", 0), ("prefaulted ghost", 0)):
        on, off = res[name, "with"], res[name, "without"]
        r_on, r_off = med([x[0] for x in on]), med([x[0] for x in off])
        f_on, f_off = med([x[1] for x in on]), med([x[1] for x in off])
        n_on = statistics.median([x[2]["faults"] for x in on])
        row = (name, f"{r_on:.2f} ms", f"{r_off:.2f} ms", f"{r_on / r_off:.2f}x",
               f"{f_on:.1f} ms", f"{f_off:.1f} ms", f"{f_on / f_off:.2f}x", f"{n_on:.0f}",
               f"{statistics.median([x[3] for x in on]) / 2**20:.1f} MiB",
               f"{statistics.median([x[3] for x in off]) / 2**20:.1f} MiB")
        print(" | ".join(f"{x:>16}" for x in row))


if __name__ == "__main__":
    main()

"""tierload: live tiering workloads that report their own work rate (python tierload.py KIND).

Memory (--total-mb of anonymous memory) is filled on the slow node (--node, mbind) and then
left free to move. Every pass gathers one 8-byte word per accessed 64 B line (numpy take +
sum); an access is one such word. Kinds:

  dense     --hot-mb read each pass (--lines 64 B lines of every page, spread over it);
            the rest cold.
  sparse    that dense set, plus --sparse-mb of pages with --words hot 64 B words each,
            of which a random 1/8 are read each pass (so a sparse page is touched in ~1
            pass out of 4 and gets 1/64 of a dense page's accesses at the defaults); the
            rest cold. The fast tier (what the runner leaves free) holds
            the dense set, not the sparse pages as well: the dense set deserves the space.
  shifting  a dense window of --hot-mb moves to the next part of the memory every
            --shift-s seconds.

Work rate. Under QEMU TCG both NUMA nodes are the same host DRAM, so a slow-tier access
costs no more than a fast one and a measured ops/s could not show placement at all. The
workload therefore charges its slow accesses their declared cost: every --refresh-s it asks
the kernel (move_pages query) where each of its hot pages is, and after each pass it sleeps
the pass's measured time x (share of the pass's accesses on slow pages) x (--latency-ratio
- 1), i.e. a slow access takes latency-ratio times a fast one (default 2.8 = the emulated
machine's HMAT 280 ns / 100 ns). ops/s = accesses / wall-clock seconds including that sleep.

Reports one JSON line per second to --stats: {"t": seconds since ready, "ops": accesses so
far, "fast_share": share of the last pass's accesses on fast-node pages}. It prints
{"pid", "start", "end"} on stdout once ready (with --wait-go it then waits for a line on
stdin before its first pass) and runs until SIGTERM; SIGUSR1 makes it check
every word against its pattern and write {"ok", "bad_words"} to --stats + ".verify".
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import signal
import sys
import time

import numpy as np

from tiermem import native

MULT = np.uint64(0x9E3779B97F4A7C15)
LINE_WORDS = 8                  # 8-byte words per 64 B line
PAGE_WORDS = native.PAGE_SIZE // 8


def pattern(lo: int, hi: int) -> np.ndarray:
    return np.arange(lo, hi, dtype=np.uint64) * MULT + np.uint64(77)


def plan(kind: str, a, n_pages: int, rng) -> tuple[list[np.ndarray], np.ndarray]:
    """(phases: per phase the word indices read in full each pass, sparse word indices (a
    random 1/8 read each pass; empty for dense/shifting))."""
    hot_pages = (a.hot_mb << 20) // native.PAGE_SIZE
    lines = np.arange(0, PAGE_WORDS, PAGE_WORDS // a.lines, dtype=np.int64)

    def dense(first_page: int) -> np.ndarray:
        p = np.arange(first_page, first_page + hot_pages, dtype=np.int64)
        return (p[:, None] * PAGE_WORDS + lines[None, :]).ravel()

    if kind == "shifting":
        n = max(1, n_pages // hot_pages)
        return [dense(i * hot_pages) for i in range(n)], np.empty(0, np.int64)
    start = n_pages // 4
    hot = dense(start)
    if kind == "dense":
        return [hot], np.empty(0, np.int64)
    sp_pages = (a.sparse_mb << 20) // native.PAGE_SIZE
    first = start + hot_pages
    if first + sp_pages > n_pages:
        raise SystemExit("tierload: --sparse-mb does not fit after the dense set")
    p = np.arange(first, first + sp_pages, dtype=np.int64)
    w = np.stack([rng.choice(PAGE_WORDS // LINE_WORDS, a.words, replace=False)
                  for _ in range(sp_pages)]) * LINE_WORDS
    return [hot], (p[:, None] * PAGE_WORDS + w).ravel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=("dense", "sparse", "shifting"))
    ap.add_argument("--total-mb", type=int, default=128)
    ap.add_argument("--hot-mb", type=int, default=16)
    ap.add_argument("--sparse-mb", type=int, default=64)
    ap.add_argument("--words", type=int, default=2, help="hot 64 B words per sparse page")
    ap.add_argument("--lines", type=int, default=16, choices=(1, 2, 4, 8, 16, 32, 64),
                    help="64 B lines read per dense page per pass")
    ap.add_argument("--shift-s", type=float, default=8.0)
    ap.add_argument("--node", type=int, default=1)
    ap.add_argument("--latency-ratio", type=float, default=2.8)
    ap.add_argument("--refresh-s", type=float, default=0.5)
    ap.add_argument("--stats", required=True)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--wait-go", action="store_true",
                    help="after printing the ready line, start the passes at a line on stdin")
    a = ap.parse_args()
    if a.hot_mb <= 0 or a.hot_mb > a.total_mb or not 1 <= a.words <= 64:
        raise SystemExit("tierload: need 0 < --hot-mb <= --total-mb and 1 <= --words <= 64")
    size = a.total_mb << 20
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arr = np.frombuffer(buf, dtype=np.uint64)
    addr = arr.ctypes.data
    native.mbind(addr, size, native.MPOL_BIND, [a.node])
    step = 1 << 20
    for i in range(0, arr.size, step):
        arr[i:i + step] = pattern(i, min(i + step, arr.size))
    native.mbind(addr, size, native.MPOL_DEFAULT)
    n_pages = size // native.PAGE_SIZE
    rng = np.random.default_rng(a.seed)
    phases, sparse = plan(a.kind, a, n_pages, rng)
    page_addr = addr + np.arange(n_pages, dtype=np.uint64) * np.uint64(native.PAGE_SIZE)
    flags = {"stop": False, "verify": False}
    signal.signal(signal.SIGTERM, lambda *_: flags.__setitem__("stop", True))
    signal.signal(signal.SIGUSR1, lambda *_: flags.__setitem__("verify", True))
    out = open(a.stats, "w", buffering=1)
    print(json.dumps({"pid": os.getpid(), "start": addr, "end": addr + size}), flush=True)
    if a.wait_go:
        sys.stdin.readline()
    t0 = last_report = time.monotonic()
    refresh_at, ops, debt, share = 0.0, 0, 0.0, 0.0
    slow_page = np.zeros(n_pages, bool)
    while not flags["stop"]:
        now = time.monotonic()
        phase = phases[int((now - t0) / a.shift_s) % len(phases)] if a.kind == "shifting" \
            else phases[0]
        idx = phase
        if sparse.size:
            idx = np.concatenate([phase, sparse[rng.random(sparse.size) < 0.125]])
        if now >= refresh_at:
            pages = np.unique(np.concatenate([phase, sparse]) // PAGE_WORDS)
            st = native.query_nodes(0, page_addr[pages])
            slow_page[:] = False
            slow_page[pages[st == a.node]] = True
            refresh_at = now + a.refresh_s
        t_pass = time.perf_counter()
        int(np.take(arr, idx).sum())
        t_pass = time.perf_counter() - t_pass
        slow = float(np.count_nonzero(slow_page[idx // PAGE_WORDS])) / idx.size
        share = 1.0 - slow
        ops += idx.size
        debt += t_pass * slow * (a.latency_ratio - 1)
        if debt >= 0.002:
            time.sleep(debt)
            debt = 0.0
        now = time.monotonic()
        if now - last_report >= 1.0:
            out.write(json.dumps({"t": round(now - t0, 3), "ops": ops,
                                  "fast_share": round(share, 4)}) + "\n")
            last_report = now
        if flags["verify"]:
            flags["verify"] = False
            bad = sum(int(np.count_nonzero(arr[i:i + step] != pattern(i, min(i + step,
                                                                             arr.size))))
                      for i in range(0, arr.size, step))
            with open(a.stats + ".verify.tmp", "w") as f:
                json.dump({"ok": bad == 0, "bad_words": bad}, f)
            os.replace(a.stats + ".verify.tmp", a.stats + ".verify")


if __name__ == "__main__":
    main()

"""Simulator throughput: trace length vs simulation time and accesses/s, against a baseline.

Baseline (measured in the same run): the obvious per-epoch implementation that sorts the
epoch's byte addresses (np.unique on page numbers) and looks each distinct page up in a
sorted placement (searchsorted), instead of tiermem.sim's bincount over dense page ids.
Both run the first-touch policy (no migrations) so the table measures the simulator core;
a last column gives tiermem.sim with the m5 policy (sampling 1 in 64) for the full cost.
Median of --runs runs; one core (numpy is single-threaded here). Run:

    .venv/bin/python bench/bench_sim.py [--runs 3] [--max-m 16]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from tiermem import synth  # noqa: E402
from tiermem.sim import TierModel, simulate  # noqa: E402
from tiermem.policies import make_policy  # noqa: E402


def baseline(trace, model: TierModel) -> float:
    """Fast-tier ratio with first-touch, sorting addresses every epoch (the naive way)."""
    cap = model.capacity.fast_pages
    placed = np.empty(0, np.uint64)
    tiers = np.empty(0, np.uint8)
    fast = total = 0
    n = len(trace)
    for lo in range(0, n, model.epoch_accesses):
        hi = min(lo + model.epoch_accesses, n)
        pages = trace.addresses(lo, hi) >> np.uint64(12)
        up, first, cnt = np.unique(pages, return_index=True, return_counts=True)
        pos = np.searchsorted(placed, up)
        known = (pos < placed.size) & (placed[np.minimum(pos, max(placed.size - 1, 0))] == up) \
            if placed.size else np.zeros(up.size, bool)
        new = up[~known][np.argsort(first[~known])]
        room = max(cap - int((tiers == 0).sum()), 0)
        nt = np.ones(new.size, np.uint8)
        nt[:room] = 0
        allp = np.concatenate([placed, new])
        order = np.argsort(allp)
        placed, tiers = allp[order], np.concatenate([tiers, nt])[order]
        t = tiers[np.searchsorted(placed, up)]
        fast += int(cnt[t == 0].sum())
        total += int(cnt.sum())
    return fast / total


def timed(fn, runs):
    ts, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-m", type=int, default=16, help="longest trace, millions of accesses")
    a = ap.parse_args()
    sizes = [m for m in (1, 2, 4, 8, 16, 32) if m <= a.max_m]
    print(f"simulator throughput, zipf(0.99) over 65536 pages (256 MB), fast tier 25%, "
          f"epochs of 100k accesses, median of {a.runs} runs, 1 core")
    hdr = (f"{'accesses':>9} | {'baseline':>9} {'M acc/s':>8} | {'sim':>8} {'M acc/s':>8} "
           f"{'speedup':>8} | {'sim+m5':>8} {'M acc/s':>8} | {'s per M (sim)':>13}")
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for m in sizes:
        tr = synth.zipf(pages=65536, accesses=m * 1_000_000, seed=1)
        model = TierModel(fast_mb=64.0)
        tb, rb = timed(lambda: baseline(tr, model), a.runs)
        ts, rs = timed(lambda: simulate(tr, make_policy("first-touch"), model), a.runs)
        tm, _ = timed(lambda: simulate(tr, make_policy("m5"), model), a.runs)
        assert abs(rb - rs.fast_ratio) < 1e-9, (rb, rs.fast_ratio)   # same answer
        n = len(tr) / 1e6
        rows.append((n, ts))
        print(f"{n:8.2f}M | {tb:8.3f}s {n / tb:8.1f} | {ts:7.3f}s {n / ts:8.1f} "
              f"{tb / ts:7.1f}x | {tm:7.3f}s {n / tm:8.1f} | {ts / n:13.4f}")
    if len(rows) >= 2:
        x = np.array([r[0] for r in rows])
        y = np.array([r[1] for r in rows])
        slope, icpt = np.polyfit(x, y, 1)
        print(f"linear fit of sim time: {slope * 1e3:.2f} ms per M accesses + {icpt * 1e3:.1f} ms "
              f"(time per access at {x[0]:.0f}M vs {x[-1]:.0f}M: "
              f"{y[0] / x[0] * 1e3:.2f} vs {y[-1] / x[-1] * 1e3:.2f} ms per M)")


if __name__ == "__main__":
    main()

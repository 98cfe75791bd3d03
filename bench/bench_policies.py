"""Policy comparison in the simulator: fast-tier access ratio and estimated time vs the oracle.

Workloads: traces of real programs captured with valgrind lackey (emulation/realtraces.py:
redis-server under redis-benchmark, sqlite3 running a query mix, gcc's cc1 compiling a C
file, CPython running a small benchmark; cached under $TIERMEM_TRACE_CACHE, default
/var/cache/tiermem/traces, captured when missing: `make traces`), then zipf, a moving hot
set, the sparse-page (Redis-like) workload, GUPS and PageRank over a generated power-law
graph. Fast tier at 25% and 50% of each
footprint; the same model, budget and sampling for every policy (see docs/policies.md).

The simulation is deterministic (seeded), so each cell is one run; the oracle column is the
baseline of every row, measured in the same run. Run:

    .venv/bin/python bench/bench_policies.py [--quick] [--real-only] [--real redis,gcc]
                                             [--json out.json] [--plots DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tiermem import synth  # noqa: E402
from tiermem.sim import TierModel, simulate  # noqa: E402
from emulation.realtraces import PROGRAMS, real_trace  # noqa: E402
from tiermem.policies import make_policy  # noqa: E402
from tiermem.errors import TiermemError  # noqa: E402

POLICIES = ["oracle", "m5", "damon", "tpp", "first-touch", "interleave"]
REAL_PROGRAMS = list(PROGRAMS)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWN = {  # our own C programs (emulation/programs/), rows of earlier rounds: --own
    "hashtable": ("hashtable.c", ["200000", "1500000"], 8),
    "sortmerge": ("sortmerge.c", ["50000", "200000"], 8),
}


def own_trace(name: str):
    import shutil
    import subprocess
    from emulation.realtraces import CACHE
    from tiermem import trace as tracefmt
    from tiermem.trace_capture import capture
    src, args, every = OWN[name]
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, f"{name}-{'-'.join(args)}-s{every}.npz")
    if os.path.exists(path):
        return tracefmt.load(path)
    if not (shutil.which("gcc") and shutil.which("valgrind")):
        raise SystemExit("bench_policies: own traces need gcc and valgrind")
    exe = os.path.join(CACHE, name)
    subprocess.run(["gcc", "-O2", "-o", exe, os.path.join(ROOT, "emulation", "programs", src)],
                   check=True)
    print(f"capturing {name} under valgrind lackey (1 in {every} accesses)...",
          file=sys.stderr, flush=True)
    tr = capture([exe, *args], sample_every=every, stdout=subprocess.DEVNULL)
    tr.save(path)
    return tr


def workloads(quick: bool, synthetic: bool = True, real=REAL_PROGRAMS, own: bool = False):
    from tiermem.cli.sim import DEFAULT_ACCESSES         # the CLI's default too
    n = 2_000_000 if quick else DEFAULT_ACCESSES
    for name in real:
        yield name, lambda name=name: real_trace(name)
    for name in OWN if own else ():
        yield name, lambda name=name: own_trace(name)
    if not synthetic:
        return
    yield "zipf", lambda: synth.zipf(pages=16384, accesses=n)
    yield "hotset", lambda: synth.hotset(pages=16384, accesses=n, period=n // 3)
    yield "sparse", lambda: synth.sparse(pages=16384, accesses=n)
    yield "gups", lambda: synth.gups(pages=16384, accesses=n)
    yield "pagerank", lambda: synth.pagerank(vertices=150_000, iterations=3 if not quick else 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter synthetic traces")
    ap.add_argument("--json", help="also write the results as JSON here")
    ap.add_argument("--real", default=",".join(REAL_PROGRAMS),
                    help="real programs to trace and replay (comma-separated; '' for none)")
    ap.add_argument("--real-only", action="store_true", help="skip the synthetic workloads")
    ap.add_argument("--own", action="store_true",
                    help="also our own C programs (hashtable, sortmerge) of earlier rounds")
    ap.add_argument("--plots", help="write fast-ratio/migration plots per workload here")
    a = ap.parse_args()
    out = []
    print("fast-tier access ratio (and ratio to the oracle) / estimated time relative to the "
          "oracle;\nbudget 2 MB per epoch of 100k accesses, policies see 1 in 64 accesses")
    hdr = f"{'workload':<10} {'fast':>4} {'footprint':>9} | " + " | ".join(
        f"{p:>19}" for p in POLICIES)
    print(hdr)
    print("-" * len(hdr))
    real = [x for x in a.real.split(",") if x]
    for x in real:
        if x not in PROGRAMS:
            raise SystemExit(f"bench_policies: unknown real program {x!r} "
                             f"(known: {', '.join(PROGRAMS)})")
    for name, make in workloads(a.quick, not a.real_only, real, a.own):
        try:
            tr = make()
        except TiermemError as e:
            raise SystemExit(f"bench_policies: {e}") from None
        fp = tr.n_pages * 4096 / 2**20
        for pct in (25, 50):
            model = TierModel(fast_mb=fp * pct / 100)
            res = {p: simulate(tr, make_policy(p), model) for p in POLICIES}
            o = res["oracle"]
            cells = []
            for p in POLICIES:
                r = res[p]
                cells.append(f"{r.fast_ratio:.3f} ({r.fast_ratio / o.fast_ratio:.2f}) "
                             f"{r.time_s / o.time_s:4.2f}t")
                out.append(dict(workload=name, fast_pct=pct, footprint_mb=fp, trace_len=len(tr),
                                **r.summary(),
                                ratio_vs_oracle=r.fast_ratio / o.fast_ratio,
                                time_vs_oracle=r.time_s / o.time_s))
            print(f"{name:<10} {pct:>3}% {fp:7.1f}MB | " + " | ".join(f"{c:>19}" for c in cells),
                  flush=True)
            if a.plots:
                from tiermem.sim_plot import plot_results
                plot_results(list(res.values()), os.path.join(a.plots, f"{name}-{pct}"),
                             f"{name}, fast tier {pct}%")
    print("\ncell: fast ratio (ratio / oracle's) and time / oracle's time ('t'); "
          "higher ratio and lower time are better")
    # goals from the issue
    print("\ngoal checks:")
    by = {(d["workload"], d["fast_pct"], d["policy"]): d for d in out}
    for (w, pct, p), d in sorted(by.items()):
        if p == "m5":
            ok = d["ratio_vs_oracle"] >= 0.9
            print(f"  m5 within 10% of oracle on {w:<10} {pct}%: "
                  f"{'yes' if ok else 'NO '} ({d['ratio_vs_oracle']:.3f})")
    for pct in (25, 50) if ("sparse", 25, "m5") in by else ():
        m5 = by[("sparse", pct, "m5")]["fast_ratio"]
        for other in ("damon", "tpp"):
            o = by[("sparse", pct, other)]["fast_ratio"]
            print(f"  sparse {pct}%: m5 vs {other}: {100 * (m5 / o - 1):+.1f}% fast-tier ratio")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

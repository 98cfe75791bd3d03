"""tiermemd figures, each next to its baseline measured in the same run (medians of --runs).

1. In the emulated CXL machine (QEMU guest, node 1 = CPU-less slow tier), one workload whose
   memory (192 MiB, --total-mb) starts on the slow node and whose hot set (48 MiB, --hot-mb)
   is read in a loop: time until 90 % of the hot set is on the fast tier, and the hot set's
   steady fast-tier share (= the share of the workload's accesses served by the fast tier: it only reads
   its hot set, uniformly), for tiermemd with the m5, damon and tpp policies (DAMON vaddr
   sampler), and for the kernel's NUMA-balancing tiering (numa_balancing=2, demotion on).
2. tiermemd's own CPU cost, % of one core, for a 1 GiB target: on this host (real CPU; one
   node, so the loop is sampling-free upkeep: discovery, placement scans, policy; 60 s
   windows, so each covers at least two full scans) with the
   default rescan_every=30 next to a scan every loop; and in the guest with the DAMON
   sampler (TCG: every figure is inflated by emulation, compare the rows, not the value).

    .venv/bin/python bench/bench_daemon.py [--runs 3] [--limit 150] [--total-mb 192]
        [--hot-mb 48] [--rate 64] [--cpu-mb 1024] [--skip-vm] [--skip-host]
        [--skip-policies] [--live-seconds 60]
        [--live-workloads dense,sparse,shifting,competing]

0. First, the live workloads of emulation/tierdemo.py (dense, sparse: a dense hot set plus
   many pages with 2 hot 64 B words each and a fast tier that holds only the dense set;
   shifting: the hot set moves every 10 s; competing: a dense and a sparse process sharing
   one fast-tier room smaller than their hot pages, figures over both) under tiermemd-m5 and under the kernel's
   tiering, side by side: time to 90 %, hot-access fast share and the workload's own work
   rate, medians of --runs.

Every mode gets the same time budget (--limit) and runs to its end, so the steady state
after 90 % is measured too. The kernel's promotion rate limit is set to tiermemd's migration
budget (64 MB/s) so both move at most as fast; both are wall-clock rates, as are the
kernel's scan periods and tiermemd's 1 s interval, so under TCG both see the same slowed-down
workload. The kernel's scan periods and hot threshold are left at their defaults (printed).

Writes bench/out/bench_daemon.png (hot-set fast-tier share over time, median run).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SCENARIO = os.path.join(ROOT, "tests", "progs", "daemon_scenario.py")
PY = sys.executable


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, unit="", nd=1):
    return "n/a" if x is None else f"{x:.{nd}f}{unit}"


def host_cpu(runs: int):
    rows = []
    for rescan in (30, 1):
        vals = []
        for i in range(runs):
            wd = tempfile.mkdtemp(prefix="bench-daemon-")
            r = subprocess.run([PY, SCENARIO, "cpu", wd, "1024", "64", "none", "5", "60",
                                str(rescan)], capture_output=True, text=True, timeout=300)
            d = json.loads(r.stdout)
            if "exception" in d:
                raise SystemExit(d["exception"])
            vals.append(d["daemon_cpu_pct"])
        rows.append((f"host, 1 GiB target, rescan every {rescan} loop(s)", med(vals), vals))
    return rows


def steady(series, limit):
    """Median hot-set fast share over the last quarter of the time budget."""
    tail = [s for t, s in series if t >= 0.75 * limit]
    return statistics.median(tail) if tail else None


def vm_runs(runs: int, limit: int, total: int, hot: int, rate: int, cpu_mb: int):
    from emulation.machine import Machine
    res = {k: [] for k in ("m5", "damon", "tpp", "kernel")}
    cpu = []
    work = tempfile.mkdtemp(prefix="bench-daemon-vm-", dir="/var/tmp")
    size = [str(limit), str(total), str(hot), "1"]          # every mode runs to the limit
    with Machine(workdir=work) as m:
        m.start(timeout=240)
        for i in range(runs):
            for k in res:
                args = ["kernel", *size, str(rate)] if k == "kernel" else ["promote", k, *size]
                r = m.run([PY, SCENARIO, args[0], os.path.join(work, f"{k}{i}"), *args[1:]],
                          timeout=limit + 600)
                d = json.loads(r.stdout)
                if "exception" in d:
                    raise SystemExit(f"{k}: {d['exception']}")
                res[k].append(d)
                extra = (f", knobs {d['knobs_set']}, debugfs {d['debugfs']}, vmstat "
                         f"{d['vmstat_delta']}") if k == "kernel" else ""
                print(f"  run {i + 1}/{runs} {k}: t90 {d['t90']} s, steady hot share "
                      f"{fmt(steady(d['series'], limit), '', 3)}{extra}", file=sys.stderr,
                      flush=True)
        for i in range(runs):
            r = m.run([PY, SCENARIO, "cpu", os.path.join(work, f"cpu{i}"), str(cpu_mb), "64",
                       "damon", "20", "30"], timeout=900)
            d = json.loads(r.stdout)
            if "exception" in d:
                raise SystemExit(d["exception"])
            cpu.append(d)
            print(f"  cpu run {i + 1}/{runs}: daemon {d['daemon_cpu_pct']:.2f} %, sampler "
                  f"{d['sampler_cpu_pct']:.2f} %", file=sys.stderr, flush=True)
    return res, cpu


def live_runs(runs: int, seconds: int, workloads: str):
    """The live workloads (emulation/tierdemo.py: dense, sparse, shifting, competing) under
    tiermemd-m5 and the kernel, in one guest, `runs` times each, modes interleaved."""
    from emulation.machine import Machine
    work = tempfile.mkdtemp(prefix="bench-daemon-live-", dir="/var/tmp")
    out = []
    with Machine(workdir=work) as m:
        m.start(timeout=240)
        for i in range(runs):
            path = os.path.join(work, f"live{i}.json")
            r = m.run([PY, "-m", "emulation.tierdemo", "--workloads", workloads, "--seconds",
                       str(seconds), "--out", path], timeout=12 * seconds + 1800)
            if r.returncode != 0:
                raise SystemExit(f"live run {i + 1}: {(r.stderr.strip().splitlines() or [''])[-1]}")
            with open(path) as f:
                got = json.load(f)["runs"]
            for x in got:
                print(f"  live run {i + 1}/{runs} {x['workload']} {x['mode']}: t90 "
                      f"{x['time_to_90_s']}, hot fast share {x['hot_fast_share']:.3f}, "
                      f"{x['work_rate']:.0f} accesses/s, daemon {x.get('daemon')}",
                      file=sys.stderr, flush=True)
            out.extend(got)
    return out


def live_table(rows, runs: int, seconds: int) -> None:
    print(f"\nLive workloads in the emulated CXL machine (emulation/workloads/tierload.py), "
          f"median of {runs} run(s), {seconds} s each; tiermemd budget = kernel promotion rate "
          f"limit = 64 MB/s; figures are the workload's own (hot fast share and work rate: "
          f"second half of the run)")
    print(f"{'workload':10} {'tiering':14} {'time to 90 %':>14} {'hot fast share':>15} "
          f"{'work rate':>14} {'vs kernel':>22}")
    kinds = list(dict.fromkeys(r["workload"] for r in rows))
    for k in kinds:
        med_of = {}
        for mode in ("tiermemd-m5", "kernel"):
            rs = [r for r in rows if r["workload"] == k and r["mode"] == mode]
            if not rs:
                continue
            reached = [r["time_to_90_s"] for r in rs if r["time_to_90_s"] is not None]
            med_of[mode] = (med(reached) if len(reached) * 2 > len(rs) else None,
                            len(reached), len(rs), med([r["hot_fast_share"] for r in rs]),
                            med([r["work_rate"] for r in rs]))
        kern = med_of.get("kernel")
        for mode, (t90, nr, n, share, rate) in med_of.items():
            vs = "-" if mode == "kernel" or not kern else \
                f"rate {rate / kern[4]:.2f}x share " + (f"{share / kern[3]:.2f}x" if kern[3] >= 0.01
                                                       else f"+{share - kern[3]:.2f}")
            print(f"{k:10} {mode:14} {fmt(t90, ' s'):>8} ({nr}/{n}) {share:>15.3f} "
                  f"{rate / 1e6:>8.3f} M/s {vs:>22}")
    print("(work rate = the workload's 8-byte reads per second, each slow-node access charged "
          "2.8x a fast one because TCG gives both nodes the same speed: see tierload.py)")


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, runs in res.items():
        ts = [r["t90"] if r["t90"] is not None else 1e9 for r in runs]
        r = runs[sorted(range(len(runs)), key=lambda i: ts[i])[len(runs) // 2]]
        xs, ys = zip(*r["series"])
        label = "kernel NUMA balancing (tiering mode)" if k == "kernel" else f"tiermemd {k}"
        ax.plot(xs, [100 * y for y in ys], marker=".", label=label)
    ax.axhline(90, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("seconds (emulated machine, TCG)")
    ax.set_ylabel("hot set on the fast tier (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--limit", type=int, default=150,
                    help="seconds per promotion run (the same for every mode)")
    ap.add_argument("--total-mb", type=int, default=192, help="workload size")
    ap.add_argument("--hot-mb", type=int, default=48, help="its hot set")
    ap.add_argument("--rate", type=int, default=64,
                    help="kernel promotion rate limit, MB/s (tiermemd's budget is 64MB/s)")
    ap.add_argument("--cpu-mb", type=int, default=1024, help="target size of the CPU runs")
    ap.add_argument("--skip-vm", action="store_true")
    ap.add_argument("--skip-policies", action="store_true",
                    help="skip the per-policy promotion runs (the live workloads only)")
    ap.add_argument("--live-seconds", type=int, default=60,
                    help="seconds per live-workload run")
    ap.add_argument("--live-workloads", default="dense,sparse,shifting,competing")
    ap.add_argument("--skip-host", action="store_true")
    ap.add_argument("--plot", default=os.path.join(ROOT, "bench", "out", "bench_daemon.png"))
    a = ap.parse_args()
    if not a.skip_vm:
        rows = live_runs(a.runs, a.live_seconds, a.live_workloads)
        live_table(rows, a.runs, a.live_seconds)
    if not a.skip_vm and not a.skip_policies:
        res, cpu = vm_runs(a.runs, a.limit, a.total_mb, a.hot_mb, a.rate, a.cpu_mb)
        print(f"\nHot set ({a.hot_mb} MiB of {a.total_mb} MiB, starting on the slow node) in "
              f"the emulated CXL machine, median of {a.runs} run(s), {a.limit} s each; "
              f"tiermemd budget 64MB/s, kernel promotion rate limit {a.rate} MB/s")
        print(f"{'tiering':40} {'time to 90 % fast':>18} {'steady fast-tier access share':>30}")
        for k, runs in res.items():
            name = "kernel NUMA balancing (baseline)" if k == "kernel" else \
                f"tiermemd, damon sampler, {k} policy"
            t90 = med([r["t90"] for r in runs])
            reached = sum(r["t90"] is not None for r in runs)
            share = med([steady(r["series"], a.limit) for r in runs])
            print(f"{name:40} {fmt(t90, ' s'):>12} ({reached}/{len(runs)}) "
                  f"{fmt(100 * share if share is not None else None, ' %'):>30}")
        print("(steady share: median of the hot set's fast share over the last quarter of "
              "the budget; the workload reads only its hot set, uniformly, so this is the "
              "share of its accesses served by the fast tier)")
        print(f"\nDaemon CPU, {a.cpu_mb} MiB target, damon sampler + m5, in the guest (TCG), "
              f"median of {a.runs}")
        print(f"{'what':40} {'% of one core':>14}")
        print(f"{'tiermemd process':40} {fmt(med([c['daemon_cpu_pct'] for c in cpu]), ' %', 2):>14}")
        print(f"{'its sampler (thread + kdamond)':40} "
              f"{fmt(med([c['sampler_cpu_pct'] for c in cpu]), ' %', 2):>14}")
        plot(res, a.plot)
        print(f"plot: {a.plot}")
    if not a.skip_host:
        rows = host_cpu(a.runs)
        print(f"\nDaemon CPU on this host (real CPU), 1 GiB target, no sampler (one node), "
              f"median of {a.runs}; target < 2 %")
        print(f"{'configuration':48} {'% of one core':>14}  runs")
        for name, m, vals in rows:
            print(f"{name:48} {fmt(m, ' %', 2):>14}  {', '.join(f'{v:.2f}' for v in vals)}")
        print("(baseline: rescan every loop = a full pagemap + move_pages placement query of "
              "the target each second)")


if __name__ == "__main__":
    main()

"""The tiermemd demo, run inside the emulated CXL machine (python -m tiermemd.demo; `make demo`
runs it after the foundation demo):

1. a workload maps TOTAL MiB on the slow node (CPU-less, lower memory tier) and reads a HOT
   MiB hot set in a loop;
2. tiermemd (DAMON vaddr sampler, m5 policy, 64 MB/s budget) starts, with the kernel's NUMA
   balancing off (numa_balancing=0; its default mode 1 would move pages to the CPU's node
   too); a live table shows the hot set's fast-tier share every 2 s, with tiermemd's
   counters;
3. the same workload again without tiermemd, under the kernel's own NUMA-balancing tiering
   (numa_balancing=2, demotion on, promotion rate limit = tiermemd's budget; the settings
   are restored afterwards), for the same time;
4. both workloads verify every page of their memory; a side-by-side summary; a PNG plot of
   both curves (--plot; "" for none) and/or the curves as JSON (--series, which `make demo`
   plots on the host: matplotlib's first start in a fresh guest takes a minute under TCG).

Needs root, a slow memory node (the emulated machine has node 1) and DAMON vaddr.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from tiermem.errors import TiermemError
from tiermem.topology import read_topology
from tiermemd.control import request
from tiermemd.kernel_tiering import kernel_tiering, kernel_tiering_off, vmstat_delta
from tiermemd.workload import WorkloadProcess

BUDGET_MBPS = 64


def say(line: str) -> None:
    print(line, flush=True)


def watch(w, fast, seconds, stats=None):
    """The live table: one row every 2 s for `seconds`. Returns [(t, share)]."""
    series, t0 = [], time.monotonic()
    while time.monotonic() - t0 < seconds:
        t = time.monotonic() - t0
        s = w.hot_share(fast)
        series.append((t, s))
        extra = ""
        if stats:
            st = stats()
            tg = st["targets"].get("demo", {})
            extra = (f"  promoted {tg.get('pages_promoted', 0) * 4 / 1024:6.1f} MiB"
                     f"  demoted {tg.get('pages_demoted', 0) * 4 / 1024:5.1f} MiB"
                     f"  daemon CPU {st['daemon_cpu_seconds']:5.1f} s")
        say(f"{t:6.1f} s  hot set on fast tier {100 * s:5.1f} %  |{'#' * int(30 * s):30}|"
            f"{extra}")
        time.sleep(2)
    return series


def t90(series):
    return next((t for t, s in series if s >= 0.9), None)


def checked(w, what):
    v = w.ask("verify")
    if v != "ok":
        raise TiermemError(f"{what}: the workload's memory changed ({v} pages differ from "
                           f"their pattern)")
    say("   workload memory check: every page intact")


def run_tiermemd(seconds, fast, wd, total, hot):
    """tiermemd starts first (as a service runs before the programs it tiers; its DAMON
    program prewarmed), then the workload; the clock starts when the workload is ready, as
    in the kernel run."""
    w = None
    sock = os.path.join("/run", f"tiermemd-demo-{os.getpid()}.sock")
    cfg = os.path.join(wd, "demo.toml")
    with open(cfg, "w") as f:
        f.write(f"""[daemon]
interval = "1s"
socket = "{sock}"
state_dir = "/run/tiermemd-demo"
metrics = ""
[migration]
bandwidth = "{BUDGET_MBPS}MB/s"
[[targets]]
name = "demo"
cmdline = "tiermemd.workload {total} {hot} .* demo$"
sampler = "damon"
policy = "m5"
[targets.sampler_params]
sample_us = 5000
aggr_us = 100000
min_nr_regions = 200
[targets.policy_params]
top_k = 16384
hot_min = 0.25
rate_init_pct = 100.0
""")
    log = open(os.path.join(wd, "tiermemd.log"), "w+")
    d = subprocess.Popen([sys.executable, "-m", "tiermemd", "-f", "-c", cfg], stderr=log)
    try:
        for _ in range(1200):
            if os.path.exists(sock) or d.poll() is not None:
                break
            time.sleep(0.1)
        if d.poll() is not None or not os.path.exists(sock):
            log.seek(0)
            last = (log.read().strip().splitlines() or ["no output"])[-1]
            raise TiermemError(f"tiermemd did not start: {last}")
        for _ in range(1200):          # its sampler's BPF program is compiled ahead
            log.seek(0)
            if " prewarmed in " in log.read() or d.poll() is not None:
                break
            time.sleep(0.1)
        w = WorkloadProcess(total, hot, slow_node(), "demo")
        series = watch(w, fast, seconds, lambda: request(sock, {"cmd": "stats"}, timeout=60))
        checked(w, "tiermemd run")
        return series
    finally:
        d.send_signal(signal.SIGTERM)
        try:
            d.wait(60)
        except subprocess.TimeoutExpired:
            d.kill()
        if w is not None:
            w.close()


def run_kernel(seconds, fast, total, hot):
    with kernel_tiering(rate_mbps=BUDGET_MBPS) as rec:
        say(f"   set: {', '.join(f'{os.path.basename(k)}={v}' for k, v in rec['set'].items())}"
            f"; left as they are: {rec['debugfs']}")
        w = WorkloadProcess(total, hot, slow_node(), "demo-kernel")
        try:
            series = watch(w, fast, seconds)
            say(f"   kernel counters: {vmstat_delta(rec)}")
            checked(w, "kernel NUMA-balancing run")
            return series
        finally:
            w.close()


def slow_node() -> int:
    topo = read_topology()
    if not topo.slow_nodes:
        raise TiermemError("this machine has no slow memory tier: run the demo inside the "
                           "emulated CXL machine (make demo)")
    return topo.slow_nodes[0]


def plot(curves, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, series in curves.items():
        if series:
            xs, ys = zip(*series)
            ax.plot(xs, [100 * y for y in ys], marker=".", label=label)
    ax.axhline(90, color="grey", lw=0.5, ls="--")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("seconds (emulated machine, QEMU TCG)")
    ax.set_ylabel("hot set on the fast tier (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=60, help="per run (the same for both)")
    ap.add_argument("--total-mb", type=int, default=96)
    ap.add_argument("--hot-mb", type=int, default=24)
    ap.add_argument("--plot", default="demo-tiermemd.png", help='PNG path; "" for none')
    ap.add_argument("--series", help="write the curves as JSON here")
    a = ap.parse_args()
    try:
        if os.geteuid() != 0:
            raise TiermemError("the demo needs root (it starts tiermemd)")
        fast = read_topology().fast_nodes
        slow = slow_node()
        wd = tempfile.mkdtemp(prefix="tiermemd-demo-")
        say(f"workload: {a.total_mb} MiB on slow node {slow}, {a.hot_mb} MiB of it read in a "
            f"loop; {a.seconds} s per run")
        say(f"== tiermemd (DAMON vaddr sampler, m5 policy, {BUDGET_MBPS} MB/s budget)")
        with kernel_tiering_off():       # else numa_balancing=1 (the default) promotes too
            say("   kernel.numa_balancing=0 for this run: in its default mode 1 the kernel "
                "would move the pages too")
            t_series = run_tiermemd(a.seconds, fast, wd, a.total_mb, a.hot_mb)
        say(f"== kernel NUMA balancing, tiering mode (numa_balancing=2, demotion on, promotion "
            f"rate limit {BUDGET_MBPS} MB/s)")
        k_series = run_kernel(a.seconds, fast, a.total_mb, a.hot_mb)
        say(f"== side by side ({a.seconds} s each, same workload)")
        say(f"{'tiering':34} {'time to 90 % fast':>18} {'hot set fast at the end':>24}")
        for name, s in (("tiermemd (m5)", t_series), ("kernel NUMA balancing", k_series)):
            t = t90(s)
            say(f"{name:34} {'not reached' if t is None else f'{t:.0f} s':>18} "
                f"{100 * s[-1][1]:>22.1f} %")
        curves = {"tiermemd (m5)": t_series, "kernel NUMA balancing (tiering mode)": k_series}
        title = f"{a.hot_mb} MiB hot set of {a.total_mb} MiB, starting on the slow node"
        if a.series:
            with open(a.series + ".tmp", "w") as f:
                json.dump({"title": title, "curves": curves}, f)
            os.replace(a.series + ".tmp", a.series)
        if a.plot:
            plot(curves, a.plot, title)
            say(f"plot: {os.path.abspath(a.plot)}")
        if not any(s > 0.1 for _, s in t_series):
            raise TiermemError("tiermemd did not bring even 10 % of the hot set to the fast "
                               f"tier in {a.seconds} s (its log: {wd}/tiermemd.log)")
    except (TiermemError, RuntimeError, OSError) as e:
        print(f"tiermemd demo: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

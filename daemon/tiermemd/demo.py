"""The tiermemd demo, run inside the emulated CXL machine (python -m tiermemd.demo):

1. a workload maps 192 MiB on the slow node (CPU-less, lower memory tier) and reads a 48 MiB
   hot set in a loop;
2. tiermemd (DAMON vaddr sampler, m5 policy) starts; a live table shows the hot set's
   fast-tier share every 2 s, with tiermemd's counters;
3. the same workload again without tiermemd, under the kernel's own NUMA-balancing tiering
   (numa_balancing=2, demotion on; the settings are restored afterwards);
4. a PNG plot of both curves (--plot, default demo-tiermemd.png in the current folder).

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

PY = sys.executable
KNOBS = {"/proc/sys/kernel/numa_balancing": "2", "/sys/kernel/mm/numa/demotion_enabled": "true"}


class Workload:
    def __init__(self, total, hot, node):
        self.p = subprocess.Popen([PY, "-m", "tiermemd.workload", str(total), str(hot),
                                   str(node), "demo"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self.p.stdout.readline())

    def ask(self, cmd):
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def hot_share(self, fast):
        h = json.loads(self.ask("where"))["hot"]
        return sum(v for k, v in h.items() if int(k) in fast) / max(1, sum(h.values()))

    def close(self):
        try:
            self.ask("exit")
        except OSError:
            pass
        self.p.wait(30)


def watch(w, fast, seconds, stats=None, out=print):
    series, t0 = [], time.monotonic()
    while time.monotonic() - t0 < seconds:
        t = time.monotonic() - t0
        s = w.hot_share(fast)
        series.append((t, s))
        extra = ""
        if stats:
            st = stats()
            tg = st["targets"].get("demo", {})
            extra = (f"  promoted {tg.get('pages_promoted', 0) * 4 / 1024:7.1f} MiB"
                     f"  demoted {tg.get('pages_demoted', 0) * 4 / 1024:6.1f} MiB"
                     f"  daemon CPU {st['daemon_cpu_seconds']:5.1f} s")
        bar = "#" * int(40 * s)
        out(f"{t:6.1f} s  hot set on fast tier {100 * s:5.1f} %  |{bar:40}|{extra}")
        if s >= 0.98:
            break
        time.sleep(2)
    return series


def run_tiermemd(seconds, fast, wd):
    w = Workload(192, 48, slow_node())
    sock = os.path.join("/run", f"tiermemd-demo-{os.getpid()}.sock")
    cfg = os.path.join(wd, "demo.toml")
    with open(cfg, "w") as f:
        f.write(f"""[daemon]
interval = "1s"
socket = "{sock}"
state_dir = "/run/tiermemd-demo"
metrics = ""
[migration]
bandwidth = "64MB/s"
[[targets]]
name = "demo"
cmdline = "tiermemd.workload 192 48 .* demo$"
sampler = "damon"
policy = "m5"
[targets.policy_params]
top_k = 16384
hot_min = 1.0
""")
    d = subprocess.Popen([PY, "-m", "tiermemd", "-f", "-c", cfg])
    try:
        for _ in range(600):
            if os.path.exists(sock) or d.poll() is not None:
                break
            time.sleep(0.1)
        if d.poll() is not None:
            raise TiermemError("tiermemd did not start (see its error above)")
        return watch(w, fast, seconds, lambda: request(sock, {"cmd": "stats"})), \
            w.ask("verify")
    finally:
        d.send_signal(signal.SIGTERM)
        d.wait(60)
        w.close()


def run_kernel(seconds, fast):
    old = {k: open(k).read().strip() for k in KNOBS}
    try:
        for k, v in KNOBS.items():
            with open(k, "w") as f:
                f.write(v)
        w = Workload(192, 48, slow_node())
        try:
            return watch(w, fast, seconds), w.ask("verify")
        finally:
            w.close()
    finally:
        for k, v in old.items():
            with open(k, "w") as f:
                f.write(v)


def slow_node() -> int:
    topo = read_topology()
    if not topo.slow_nodes:
        raise TiermemError("this machine has no slow memory tier: run the demo inside the "
                           "emulated CXL machine (python -m emulation run ... or make demo)")
    return topo.slow_nodes[0]


def plot(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, series in curves.items():
        if series:
            xs, ys = zip(*series)
            ax.plot(xs, [100 * y for y in ys], marker=".", label=label)
    ax.set_xlabel("seconds")
    ax.set_ylabel("hot set on the fast tier (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=120, help="per run")
    ap.add_argument("--plot", default="demo-tiermemd.png")
    a = ap.parse_args()
    try:
        if os.geteuid() != 0:
            raise TiermemError("the demo needs root (it starts tiermemd)")
        fast = read_topology().fast_nodes
        slow_node()
        wd = tempfile.mkdtemp(prefix="tiermemd-demo-")
        print("== tiermemd (DAMON sampler, m5 policy)", flush=True)
        t_series, t_ok = run_tiermemd(a.seconds, fast, wd)
        print(f"   workload memory check: {t_ok}")
        print("== kernel NUMA balancing, tiering mode (numa_balancing=2, demotion on)",
              flush=True)
        k_series, k_ok = run_kernel(a.seconds, fast)
        print(f"   workload memory check: {k_ok}")
        plot({"tiermemd (m5)": t_series, "kernel NUMA balancing": k_series}, a.plot)
        print(f"plot: {os.path.abspath(a.plot)}")
    except TiermemError as e:
        print(f"tiermemd demo: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

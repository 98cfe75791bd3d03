"""move_pages throughput (MB/s) for 4 KiB and THP pages between the fast and the slow node,
next to a plain memcpy of the same size between the same nodes, measured in the same run.

Default: boots the emulated CXL machine and runs the measurement inside it (node 0 fast,
node 1 CPU-less). `--here` measures on this host instead (needs two memory nodes).
Prints a table of medians over several runs and the move/memcpy ratio.
Usage: python bench/bench_move.py [--here] [--size-mb 64] [--runs 5]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from tiermem import native  # noqa: E402

HUGE = 2 << 20


def thp_kb(addr, size):
    """AnonHugePages (kB) of the mapping containing addr, from our own smaps."""
    cur = None
    for line in open("/proc/self/smaps"):
        parts = line.split()
        if "-" in parts[0] and len(parts) >= 5:
            a, b = (int(x, 16) for x in parts[0].split("-"))
            cur = a <= addr < b
        elif cur and parts[0] == "AnonHugePages:":
            return int(parts[1])
    return 0


def measure(size_mb, runs, fast, slow):
    size = size_mb << 20
    pid = os.getpid()
    out = {}
    for label, huge in (("4 KiB", False), ("THP 2 MiB", True)):
        buf = native.NodeBuffer(size + (HUGE if huge else 0), slow, hugepages=huge)
        base = (buf.address + HUGE - 1) // HUGE * HUGE if huge else buf.address
        step = HUGE if huge else native.PAGE_SIZE
        pages = np.arange(base, base + size, step, dtype=np.uint64)
        thp = thp_kb(base, size) if huge else 0
        rates = []
        for i in range(runs):
            for dst in (fast, slow):          # there and back; time both directions
                t0 = native.now_ns()
                st = native.move_pages(pid, pages, dst)
                dt = (native.now_ns() - t0) / 1e9
                if (st != dst).any():
                    raise SystemExit(f"move to node {dst} failed for {(st != dst).sum()} pages: "
                                     f"{np.unique(st[st != dst])}")
                rates.append(size / dt / 1e6)
        buf.close()
        out[label] = {"move_mbs": statistics.median(rates), "thp_kb": thp,
                      "min": min(rates), "max": max(rates)}
    with native.NodeBuffer(size, slow) as src, native.NodeBuffer(size, fast) as dst:
        cp = [native.memcpy_rate(dst, src, passes=1) / 1e6 for _ in range(runs * 2)]
    out["memcpy_mbs"] = statistics.median(cp)
    return out


def table(res, size_mb, where):
    print(f"move_pages vs memcpy, {size_mb} MiB, slow<->fast node, {where} (medians)")
    print(f"{'pages':<12}{'move_pages MB/s':>18}{'memcpy MB/s':>14}{'move/memcpy':>13}"
          f"{'THP backed':>12}")
    for label in ("4 KiB", "THP 2 MiB"):
        r = res[label]
        thp = f"{r['thp_kb'] >> 10} MiB" if label.startswith("THP") else "-"
        print(f"{label:<12}{r['move_mbs']:>18,.0f}{res['memcpy_mbs']:>14,.0f}"
              f"{r['move_mbs'] / res['memcpy_mbs']:>13.2f}{thp:>12}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--here", action="store_true", help="measure on this host")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size-mb", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    if a.inner or a.here:
        from tiermem.topology import read_topology
        t = read_topology()
        if not t.slow_nodes:
            raise SystemExit("this host has no slow memory node; run without --here to use "
                             "the emulated CXL machine")
        res = measure(a.size_mb, a.runs, t.fast_nodes[0], t.slow_nodes[0])
        if a.inner:
            print(json.dumps(res))
        else:
            table(res, a.size_mb, "this host")
        return
    from emulation.machine import Machine
    with Machine() as vm:
        r = vm.run([sys.executable, os.path.abspath(__file__), "--inner",
                    "--size-mb", str(a.size_mb), "--runs", str(a.runs)], timeout=1200)
        if r.returncode != 0:
            raise SystemExit(f"benchmark failed in the guest: {r.stderr.strip()}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
    table(res, a.size_mb, "emulated CXL machine (QEMU TCG: ratios, not absolute speed)")


if __name__ == "__main__":
    main()

"""Benchmark: the emulated CXL machine's boot-to-command time and the cost of running a
command inside it, next to running the same command on the host (measured in the same run).

    .venv/bin/python bench/bench_emulation.py [--boots 3] [--reps 10] [--json]

Boot-to-command: from starting QEMU to the answer of the first command (`true`) in the
guest; the median of --boots boots (target: under 10 s). Command overhead: median wall
time of --reps runs of each command through Machine.run, and with subprocess on the host.
The guest runs under QEMU TCG (no KVM here), so guest commands are slower by the emulation
factor as well as the agent round trip; the table shows both, side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from emulation.machine import Machine, prepare  # noqa: E402

COMMANDS = [
    ("true (argv)", ["true"]),
    ("sh -c 'echo x'", "echo x"),
    ("cat /proc/meminfo", ["cat", "/proc/meminfo"]),
    ("python3 -c pass", ["/usr/bin/python3", "-c", "pass"]),
    ("python -c 'import numpy'", [sys.executable, "-c", "import numpy"]),
]


def _host_time(cmd) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"host command failed: {cmd}")
    return dt


def _guest_time(m: Machine, cmd) -> float:
    t0 = time.perf_counter()
    r = m.run(cmd, timeout=300)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"guest command failed: {cmd}: {r.stderr.strip()}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boots", type=int, default=3, help="boots to time (median)")
    ap.add_argument("--reps", type=int, default=10, help="runs of each command (median)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON too")
    a = ap.parse_args()
    prepare(log=lambda msg: print(f"# {msg}", file=sys.stderr))
    work = tempfile.mkdtemp(prefix="tiermem-bench-", dir="/var/tmp")
    load = os.getloadavg()[0]

    boots, readies, firsts = [], [], []
    for i in range(a.boots):
        print(f"# boot {i + 1}/{a.boots}", file=sys.stderr)
        t0 = time.perf_counter()
        m = Machine(workdir=work).start()
        try:
            m.run(["true"], timeout=120, check=True)
            boots.append(time.perf_counter() - t0)
            readies.append(m.boot_s)
            firsts.append(boots[-1] - m.boot_s)
            if i == a.boots - 1:     # keep the last machine for the command figures
                rows = []
                for name, cmd in COMMANDS:
                    print(f"# {name}", file=sys.stderr)
                    _guest_time(m, cmd)          # warm the guest's caches once
                    _host_time(cmd)
                    g = statistics.median(_guest_time(m, cmd) for _ in range(a.reps))
                    h = statistics.median(_host_time(cmd) for _ in range(a.reps))
                    rows.append((name, h, g))
        finally:
            m.stop()

    print(f"\nEmulated CXL machine (QEMU TCG, 2 vCPUs, 2+2 GiB), host load average at start "
          f"{load:.1f}, {a.boots} boots, {a.reps} runs per command, medians\n")
    print(f"{'boot to first command':<28}{'median s':>10}{'min s':>9}{'max s':>9}")
    print(f"{'  QEMU start -> agent ready':<28}{statistics.median(readies):>10.2f}"
          f"{min(readies):>9.2f}{max(readies):>9.2f}")
    print(f"{'  first command (true)':<28}{statistics.median(firsts):>10.2f}"
          f"{min(firsts):>9.2f}{max(firsts):>9.2f}")
    print(f"{'  total (target < 10 s)':<28}{statistics.median(boots):>10.2f}"
          f"{min(boots):>9.2f}{max(boots):>9.2f}")
    print(f"\n{'command':<28}{'host ms':>10}{'guest ms':>10}{'guest/host':>12}"
          f"{'overhead ms':>13}")
    for name, h, g in rows:
        print(f"{name:<28}{h * 1e3:>10.1f}{g * 1e3:>10.1f}{g / h:>11.1f}x{(g - h) * 1e3:>13.1f}")
    if a.json:
        print(json.dumps({"load_avg": load, "boot_total_s": boots, "boot_ready_s": readies,
                          "first_command_s": firsts,
                          "commands": [{"name": n, "host_s": h, "guest_s": g}
                                       for n, h, g in rows]}))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

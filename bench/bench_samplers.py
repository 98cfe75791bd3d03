"""Sampler cost and accuracy: CPU cost (% of one core) and precision/recall at finding a
known hot set, per sampler, side by side, for a 1 GiB and a 4 GiB target with a 10% hot set.

Runs in the emulated CXL machine (its 6.12 kernel has DAMON vaddr, soft-dirty and NUMA
balancing; the host kernel has none of these), booted here with a 6 GiB fast node so a
4 GiB target fits. The target is emulation/workloads/sampler_hot.c: 10 regions, region 3
hot; every 100 ms pass writes every hot page and a random 10% of the cold pages, so hot pages
are accessed 10x as often. Each sampler samples for --seconds, reading every --interval;
its top-k pages (k = number of hot pages) are scored against the hot region.

Baseline, measured in the same run: `pagemap present` (residency only: it cannot tell hot
from cold, so its top-k is an arbitrary 10% of resident pages). The table shows medians over
--runs runs and each sampler's precision as a ratio to the baseline's.

CPU cost: the sampler's own CPU time after its one-off start (Python thread time + kdamond
thread utime/stime + BPF program run time from the kernel's BPF statistics), divided by
the sampling time; "of it reading" is the Python thread's part (reading the results). The
two DAMON rows are the same kdamond read two ways: tried-regions snapshots (sysfs) and the
damon_aggregated tracepoint (BPF map). The two eBPF rows count NUMA hinting faults, or
weight each by how soon after the NUMA scan it came (kprobes on change_prot_numa). Under QEMU TCG the guest CPU is many times slower
than the host's, so these percentages overstate what the same sampler costs on real
hardware; compare them with each other, not with the goals in absolute terms.

    python bench/bench_samplers.py [--sizes 1024,4096] [--runs 3,1] [--seconds 10]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CHECK = os.path.join(ROOT, "emulation/workloads/sampler_hotcheck.py")
NB = "/sys/kernel/debug/sched/numa_balancing"

SAMPLERS = {
    # name: (hotcheck sampler, extra args)
    "pagemap present (baseline)": ("pagemap-present", []),
    "damon vaddr, snapshots": ("damon", ["--sample-us", "5000", "--aggr-us", "100000",
                                         "--damon-results", "snapshot"]),
    "damon vaddr, tracepoint": ("damon", ["--sample-us", "5000", "--aggr-us", "100000",
                                          "--damon-results", "tracepoint"]),
    # the same tracepoint path at longer intervals: DAMON's cost is one access-bit check per
    # region per sampling interval, so it falls with the interval; does recall hold?
    "damon tracepoint 20/400 ms": ("damon", ["--sample-us", "20000", "--aggr-us", "400000",
                                             "--damon-results", "tracepoint"]),
    "damon tracepoint 100 ms/2 s": ("damon", ["--sample-us", "100000", "--aggr-us",
                                              "2000000", "--damon-results", "tracepoint"]),
    # ... and read once per aggregation instead of every --interval
    "damon 100 ms/2 s, read 2 s": ("damon", ["--sample-us", "100000", "--aggr-us", "2000000",
                                             "--damon-results", "tracepoint",
                                             "--interval", "2"]),
    # ... with at most 200 regions (the kdamond checks one page per region per sample)
    "damon 100 ms/2 s, 200 regions": ("damon", ["--sample-us", "100000", "--aggr-us",
                                                "2000000", "--damon-results", "tracepoint",
                                                "--interval", "2", "--max-regions", "200"]),
    "pagemap soft-dirty": ("pagemap", []),
    "ebpf hint faults, count": ("ebpf", ["--ebpf-weights", "count"]),
    "ebpf hint faults, delay": ("ebpf", ["--ebpf-weights", "delay"]),
    # the BPF maps keep summing between reads: reading less often costs less
    "ebpf delay, read 2 s": ("ebpf", ["--ebpf-weights", "delay", "--interval", "2"]),
}


def run_one(vm, binary, sampler, extra, size_mb, seconds, interval, tlb_flush=False):
    # numpy's AVX2 argsort of 64-bit integers is wrong under QEMU TCG: baseline paths only
    args = ["env", "NPY_DISABLE_CPU_FEATURES=X86_V3", sys.executable, CHECK, "--binary", binary, "--sampler", sampler,
            "--size-mb", str(size_mb), "--regions", "10", "--hot", "3",
            "--seconds", str(seconds), "--interval", str(interval), "--pass-us", "100000",
            "--cold-ppm", "100000", "--warmup", "1", *extra,
            *(["--tlb-flush"] if tlb_flush else [])]
    r = vm.run(args, timeout=1200)
    if r.returncode != 0:
        raise RuntimeError(f"{sampler} {size_mb} MiB failed: {r.stderr.strip()[-600:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1024,4096")  # MiB
    ap.add_argument("--runs", default="3,1", help="runs per size: one number, or one per size "
                    "(e.g. 3,1)")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--json", help="also write all results to this file")
    ap.add_argument("--tlb-flush", action="store_true",
                    help="the workload flushes its TLB every pass, as a real CPU's small TLB "
                    "would force (TCG's software TLB can hold the hot set: DAMON then misses "
                    "hot accesses; see emulation/workloads/sampler_hot.c)")
    ap.add_argument("--samplers", default=None,
                    help="subset, separated by ';' (labels contain commas): "
                    + "; ".join(SAMPLERS))
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    chosen = dict(SAMPLERS)
    if a.samplers:
        want = [x.strip() for x in a.samplers.split(";")]
        bad = [w for w in want if w not in SAMPLERS]
        if bad:
            ap.error(f"unknown samplers {bad}; have {list(SAMPLERS)}")
        chosen = {k: SAMPLERS[k] for k in SAMPLERS if k in want}
    runs = [int(x) for x in a.runs.split(",")]
    runs = runs * len(sizes) if len(runs) == 1 else runs
    if len(runs) != len(sizes) or min(runs) < 1:
        ap.error("--runs: one number >= 1, or one per size")

    from emulation.config import MachineConfig
    from emulation.machine import Machine, prepare
    prepare(log=lambda m: None)
    cfg = MachineConfig(fast_mem_mib=max(sizes) + 2048, slow_mem_mib=1024)
    results = {}
    with Machine(cfg) as vm:
        vm.start(timeout=300)
        binary = os.path.join(vm.workdir, "sampler_hot")
        subprocess.run(["gcc", "-O2", "-pthread", "-o", binary,
                        os.path.join(ROOT, "emulation/workloads/sampler_hot.c")], check=True)
        # NUMA balancing on for the hint-fault sampler, scanning the whole target each period.
        # scan_delay_ms stays at its default: 6.x forgets which VMAs a task touched every
        # 4 x scan_delay_ms, and with 0 it scans one VMA per period (see docs/sampling.md).
        vm.run(f"echo 1 > /proc/sys/kernel/numa_balancing; echo 100 > {NB}/scan_period_min_ms;"
               f" echo 200 > {NB}/scan_period_max_ms; echo 1000 > {NB}/scan_delay_ms;"
               f" echo 8192 > {NB}/scan_size_mb", timeout=60, check=True)
        kernel = vm.run("uname -r", timeout=30).stdout.strip()
        for size, nrun in zip(sizes, runs):
            for label, (sampler, extra) in chosen.items():
                for i in range(nrun):
                    t = time.monotonic()
                    try:
                        res = run_one(vm, binary, sampler, extra, size, a.seconds, a.interval,
                                      a.tlb_flush)
                    except RuntimeError as e:
                        print(f"# {size} MiB {label} run {i + 1} FAILED: {e}", file=sys.stderr,
                              flush=True)
                        continue
                    results.setdefault((size, label), []).append(res)
                    print(f"# {size} MiB {label} run {i + 1}: precision {res['precision']:.3f} "
                          f"recall {res['recall']:.3f} cpu {res['cpu_percent']:.3f} % "
                          f"(reading {res['reader_cpu_percent']:.3f} %) "
                          f"pages seen {res['pages_seen']} "
                          f"dropped {res['sampler_meta'].get('dropped', '-')} "
                          f"({time.monotonic() - t:.0f} s)", file=sys.stderr, flush=True)

    med = lambda xs: statistics.median(xs)  # noqa: E731
    print(f"\nbench_samplers: guest kernel {kernel} (QEMU TCG), 10% hot set, hot pages "
          f"accessed 10x as often, {a.seconds:g} s of sampling, median of "
          + ", ".join(f"{n} run(s) at {s / 1024:g} GiB" for s, n in zip(sizes, runs))
          + (", workload flushes its TLB every pass" if a.tlb_flush else ""))
    hdr = (f"{'target':>8}  {'sampler':<28} {'CPU % of 1 core':>15} {'of it reading':>13} "
           f"{'precision':>10} "
           f"{'recall':>7} {'prec / baseline':>16} {'pages seen':>11}")
    print(hdr)
    print("-" * len(hdr))
    for size in sizes:
        bl = results.get((size, "pagemap present (baseline)"))
        base = med([r["precision"] for r in bl]) if bl else 0.0
        for label in chosen:
            rs = results.get((size, label))
            if not rs:
                print(f"{size / 1024:>6.0f} GiB  {label:<28} failed (see stderr)")
                continue
            p = med([r["precision"] for r in rs])
            print(f"{size / 1024:>6.0f} GiB  {label:<28} "
                  f"{med([r['cpu_percent'] for r in rs]):>15.3f} "
                  f"{med([r['reader_cpu_percent'] for r in rs]):>13.3f} {p:>10.3f} "
                  f"{med([r['recall'] for r in rs]):>7.3f} "
                  f"{(f'{p / base:.2f}x' if base > 0 else 'n/a'):>16} "
                  f"{int(med([r['pages_seen'] for r in rs])):>11}")
    left = [(k, r["kdamonds_after"], r["bpf_progs_left"]) for k, rs in results.items()
            for r in rs if r["kdamonds_after"] != r["kdamonds_before"] or r["bpf_progs_left"]]
    print(f"left in the kernel after stop(): {'nothing' if not left else left}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({f"{k[0]}:{k[1]}": v for k, v in results.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

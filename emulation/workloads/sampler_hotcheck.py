"""sampler_hotcheck: run the sampler_hot workload under one sampler and score what it found.

    python sampler_hotcheck.py --binary PATH
        --sampler damon|damon-paddr|ebpf|pagemap|pagemap-present|idle
        [--size-mb 64] [--regions 8] [--hot 3] [--seconds 4] [--pass-us 10000]
        [--cold-ppm 100000] [--interval 0.5] [--sample-us 5000] [--aggr-us 100000]
        [--damon-results auto|tracepoint|snapshot] [--ebpf-weights auto|delay|count]

Prints one JSON object: the workload's hot range, the sampler's top-k pages (k = number of
hot pages) scored against it (precision, recall), whether the hottest merged range from
reports.hot() lies inside the hot range, the sampler's CPU cost (% of one core, after its
one-off start cost; and the part of it spent reading results in this process), and what was left in the kernel after stop() (running kdamonds, BPF
program ids still loaded). Used by the VM tests and by bench/bench_samplers.py; runs on the
host or in the emulated CXL machine.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import time

import numpy as np


def prog_loaded(prog_id: int) -> bool:
    """Whether a BPF program with this id still exists (BPF_PROG_GET_FD_BY_ID)."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 32)()
    attr[0] = prog_id
    fd = libc.syscall(321, 13, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd >= 0:
        os.close(fd)
        return True
    return False


def _overlap(r: dict, hs: int, he: int) -> int:
    """Bytes of range r inside [hs, he)."""
    return max(0, min(r["end"], he) - max(r["start"], hs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--sampler", required=True)
    ap.add_argument("--size-mb", type=int, default=64)
    ap.add_argument("--regions", type=int, default=8)
    ap.add_argument("--hot", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--pass-us", type=int, default=10000)
    ap.add_argument("--cold-ppm", type=int, default=100000)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--sample-us", type=int, default=5000)
    ap.add_argument("--aggr-us", type=int, default=100000)
    ap.add_argument("--min-regions", type=int, default=10)
    ap.add_argument("--max-regions", type=int, default=1000)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--ebpf-weights", default="auto", choices=["auto", "delay", "count"])
    ap.add_argument("--damon-results", default="auto", choices=["auto", "tracepoint", "snapshot"])
    ap.add_argument("--tlb-flush", action="store_true",
                    help="the workload flushes its TLB every pass (see sampler_hot.c)")
    a = ap.parse_args(argv)

    from tiermem import damon_sysfs, reports
    from tiermem.record import Record
    from tiermem.samplers import REGISTRY, Target
    from tiermem.samplers.damon import DamonSampler

    # The workload maps its memory and waits; the sampler starts while nothing faults (under
    # QEMU TCG, flipping the page-fault tracepoint's static key while another vCPU is in the
    # fault handler can oops the guest); then the workload touches its memory, and batches
    # read during --warmup are dropped (first touches are no signal).
    wl = subprocess.Popen([a.binary, str(a.size_mb), str(a.regions), str(a.hot),
                           "0", str(a.pass_us), str(a.cold_ppm)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "SAMPLER_HOT_WAIT": "1",
                               **({"SAMPLER_HOT_TLB_FLUSH": "1"} if a.tlb_flush else {})})
    s = None
    try:
        line = wl.stdout.readline()
        if not line.startswith("mapped"):
            print(json.dumps({"error": "workload did not start"}))
            return 1
        target = Target(pids=[wl.pid])
        if a.sampler == "damon":
            s = DamonSampler(a.sample_us, a.aggr_us, max(a.aggr_us, 1_000_000),
                             a.min_regions, a.max_regions, results=a.damon_results)
        elif a.sampler == "damon-paddr":
            # physical monitoring of the node the workload's memory is on
            s = DamonSampler(a.sample_us, a.aggr_us, max(a.aggr_us, 1_000_000),
                             a.min_regions, a.max_regions, results=a.damon_results)
            target = Target(phys_ranges=[damon_sysfs.node_phys_range(0)])
        elif a.sampler == "ebpf":
            from tiermem.samplers.ebpf import FaultSampler
            s = FaultSampler(a.ebpf_weights)
        elif a.sampler == "pagemap-present":
            from tiermem.samplers.pagemap import PagemapSampler
            s = PagemapSampler("present")
        else:
            s = REGISTRY[a.sampler]()
        kd_before = [k["index"] for k in damon_sysfs.running_kdamonds()] \
            if os.path.exists(damon_sysfs.ADMIN) else []
        s.start(target)
        ids = list(s.prog_ids())
        wl.stdin.write("go\n")
        wl.stdin.flush()
        line = wl.stdout.readline()
        if not line.startswith("ready"):
            print(json.dumps({"error": "workload did not become ready"}))
            return 1
        f = dict(re.findall(r"(\w+)=(\S+)", line))
        base, size = int(f["base"], 16), int(f["size"])
        hs, he = int(f["hot_start"], 16), int(f["hot_end"], 16)
        time.sleep(a.warmup)
        s.read_spans()                       # drop first touches and warm-up
        cpu0, th0 = s.cpu_seconds(), s.thread_cpu_seconds()
        t0 = time.monotonic()
        batches = []
        nxt = t0
        while time.monotonic() - t0 < a.seconds - 1e-3:
            nxt += a.interval
            time.sleep(max(0.0, nxt - time.monotonic()))
            batches.append(s.read_spans())
        dur = time.monotonic() - t0
        cpu = s.cpu_seconds() - cpu0
        th = s.thread_cpu_seconds() - th0
        setup = s.setup_cpu
        page = 4096
        if a.sampler == "damon-paddr":      # physical pages of the workload, while it lives
            from tiermem import native
            d = native.pagemap_decode(native.pagemap_read(wl.pid, base, size // page))
        wl.kill()
        wl.wait()
        smeta = s.metadata()
        s.stop()
        rec = Record.from_spans(batches, {"sampler": a.sampler}, t0)
        kd_after = [k["index"] for k in damon_sysfs.running_kdamonds()] \
            if os.path.exists(damon_sysfs.ADMIN) else []
        page = 4096
        truth = np.arange(hs // page, he // page, dtype=np.uint64)
        if a.sampler == "damon-paddr":
            pfn = d["pfn"]
            vpages = np.arange(base // page, (base + size) // page, dtype=np.uint64)
            hot_mask = (vpages >= np.uint64(hs // page)) & (vpages < np.uint64(he // page))
            truth = pfn[hot_mask & d["present"]]
            pages, scores = reports.page_scores(rec)
            mine = np.isin(pages, pfn[d["present"]])
            pages, scores = pages[mine], scores[mine]
        else:
            pages, scores = reports.page_scores(rec, pid=wl.pid)
            inside = (pages >= np.uint64(base // page)) & (pages < np.uint64((base + size) // page))
            pages, scores = pages[inside], scores[inside]
        prec, rec_ = reports.precision_recall(pages, scores, truth, truth.size)
        is_hot = np.isin(pages, truth)
        n_cold = max(int(size // page) - truth.size, 1)   # unseen pages score 0
        mean_hot = float(scores[is_hot].sum()) / max(truth.size, 1)
        mean_cold = float(scores[~is_hot].sum()) / n_cold
        top = [r for r in reports.hot(rec, 20) if r["pid"] == wl.pid
               and base <= r["start"] < base + size] if a.sampler != "damon-paddr" else []
        out = {"sampler": a.sampler, "size_mb": a.size_mb, "hot_start": hs, "hot_end": he,
               "batches": rec.nr_batches, "pages_seen": int((scores > 0).sum()),
               "hot_pages_seen": int((scores[is_hot] > 0).sum()), "hot_pages": int(truth.size),
               "precision": prec, "recall": rec_,
               "mean_score_hot": mean_hot, "mean_score_cold": mean_cold,
               "top_range": top[0] if top else None,
               # DAMON's region edges are not page-exact: "inside" = 90 % of its bytes
               "top_inside_hot": bool(top and _overlap(top[0], hs, he)
                                      >= 0.9 * (top[0]["end"] - top[0]["start"])),
               "cpu_seconds": cpu, "duration_s": dur,
               "cpu_percent": 100.0 * cpu / dur if dur > 0 else 0.0,
               "reader_cpu_percent": 100.0 * th / dur if dur > 0 else 0.0,
               "setup_cpu_seconds": setup, "sampler_meta": smeta,
               "kdamonds_before": kd_before, "kdamonds_after": kd_after,
               "bpf_prog_ids": ids, "bpf_progs_left": [i for i in ids if prog_loaded(i)],
               }
        print(json.dumps(out))
        return 0
    finally:
        if s is not None:
            s.stop()
        if wl.poll() is None:
            wl.kill()
        wl.wait()


if __name__ == "__main__":
    sys.exit(main())

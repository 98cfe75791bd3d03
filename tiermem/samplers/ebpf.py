"""eBPF samplers (bcc): the target's user page faults, and hardware data-address sampling.

FaultSampler attaches to the `exceptions:page_fault_user` tracepoint. Every fault of a
target process is counted in a BPF hash map keyed by (pid, 64-byte word of the faulting
address), with the write bit of the error code; Python drains the map in batches at read().
With NUMA balancing on, the kernel's NUMA hinting faults land here too: they are sampled
accesses with addresses, the signal TPP and NUMA balancing use. Without it, only first
touches (and faults after reclaim/migration) show.

MemSampler samples loads with their data address from the CPU's PMU (Intel PEBS
`mem-loads`, AMD IBS op) into the same kind of map. It needs a hardware PMU; on machines
without one (VMs such as this project's host and its TCG guest) available() says so.
"""
from __future__ import annotations

import os

import numpy as np

from tiermem import kfs
from tiermem.errors import TiermemError
from tiermem.samplers import bpf as bpfu
from tiermem.samplers.base import Sampler, Spans, Target

MAX_ENTRIES = 1 << 18           # distinct (pid, word) keys per read interval
MAX_PIDS = 64

_KEY = np.dtype([("pid", "<u4"), ("pad", "<u4"), ("addr", "<u8")])
_VAL = np.dtype([("count", "<u8"), ("writes", "<u8")])

_COMMON = r"""
struct key_t { u32 pid; u32 pad; u64 addr; };
struct val_t { u64 count; u64 writes; };
BPF_HASH(counts, struct key_t, struct val_t, MAX_ENTRIES);
BPF_HASH(targets, u32, u8, MAX_PIDS);
BPF_ARRAY(dropped, u64, 1);

static __always_inline void count_access(u32 tgid, u64 addr, u64 is_write) {
    struct key_t k = {};
    struct val_t zero = {};
    k.pid = tgid;
    k.addr = addr & ~63ULL;
    struct val_t *v = counts.lookup_or_try_init(&k, &zero);
    if (v) {
        __sync_fetch_and_add(&v->count, 1);
        if (is_write)
            __sync_fetch_and_add(&v->writes, 1);
    } else {
        int z = 0;
        u64 *d = dropped.lookup(&z);
        if (d)
            __sync_fetch_and_add(d, 1);
    }
}
"""

_FAULT_PROG = _COMMON + r"""
TRACEPOINT_PROBE(exceptions, page_fault_user) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!targets.lookup(&tgid))
        return 0;
    count_access(tgid, args->address, args->error_code & 2);   /* x86 PF_WRITE */
    return 0;
}
"""

_MEM_PROG = _COMMON + r"""
#include <uapi/linux/bpf_perf_event.h>
int on_sample(struct bpf_perf_event_data *ctx) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!targets.lookup(&tgid) || ctx->addr == 0)
        return 0;
    count_access(tgid, ctx->addr, 0);
    return 0;
}
"""


class _BpfCounter(Sampler):
    """Shared part: a target pid set, a counts map drained at read()."""

    space = "vaddr"
    program = ""

    def __init__(self):
        super().__init__()
        self.bpf = None
        self.stats: bpfu.BpfStats | None = None
        self.dropped_total = 0
        self._bufs = None

    def _load(self, target: Target) -> None:
        if not target.pids:
            raise TiermemError(f"sampler {self.name} needs target pids")
        if len(target.pids) > MAX_PIDS:
            raise TiermemError(f"sampler {self.name}: at most {MAX_PIDS} pids")
        target.check_pids()
        self.stats = bpfu.BpfStats()
        self.bpf = bpfu.load(self.program, cflags=[f"-DMAX_ENTRIES={MAX_ENTRIES}",
                                                   f"-DMAX_PIDS={MAX_PIDS}"])
        import ctypes as ct
        t = self.bpf[b"targets"]
        for p in target.pids:
            t[ct.c_uint32(p)] = ct.c_uint8(1)

    def _read_spans(self, t0, t1) -> Spans:
        if self._bufs is None:
            self._bufs = bpfu.DrainBuffers(_KEY, _VAL, MAX_ENTRIES)
        k, v = bpfu.drain_hash(self.bpf[b"counts"], self._bufs)
        import ctypes as ct
        d = self.bpf[b"dropped"]
        dropped = int(d[ct.c_int(0)].value)
        if dropped:
            d[ct.c_int(0)] = ct.c_uint64(0)
            self.dropped_total += dropped
        return Spans(k["pid"].astype(np.int32), k["addr"], np.full(k.size, 64, np.uint64),
                     v["count"].astype(np.float32), True, "vaddr", t0, t1)

    def _stop(self) -> None:
        if self.bpf is not None:
            self._run_ns_final = bpfu.prog_run_ns(self.bpf)
            self.bpf.cleanup()          # detaches the tracepoint/perf events, closes maps
            self.bpf = None
        if self.stats is not None:
            self.stats.close()
            self.stats = None

    _run_ns_final = 0

    def _kernel_cpu_seconds(self) -> float:
        ns = bpfu.prog_run_ns(self.bpf) if self.bpf is not None else self._run_ns_final
        return ns / 1e9

    def prog_ids(self) -> list[int]:
        return bpfu.prog_ids(self.bpf) if self.bpf is not None else []

    def metadata(self) -> dict:
        return {"map_entries": MAX_ENTRIES, "dropped": self.dropped_total,
                "bpf_stats": "on" if self.stats and self.stats.fd >= 0 else
                             f"off ({self.stats.error if self.stats else 'not started'})"}


class FaultSampler(_BpfCounter):
    name = "ebpf"
    program = _FAULT_PROG

    @classmethod
    def available(cls) -> tuple[bool, str]:
        ok, why = bpfu.bcc_available()
        if not ok:
            return ok, why
        try:
            kfs.ensure_tracefs()
        except TiermemError as e:
            return False, str(e)
        if not kfs.exists(kfs.TRACEFS + "/events/exceptions/page_fault_user"):
            return False, "tracepoint exceptions:page_fault_user missing (x86 kernels only)"
        return True, ""

    def _start(self, target: Target) -> None:
        self._load(target)      # bcc attaches TRACEPOINT_PROBE programs when it loads them

    def metadata(self) -> dict:
        nb = kfs.read("/proc/sys/kernel/numa_balancing", "absent")
        return {**super().metadata(), "tracepoint": "exceptions:page_fault_user",
                "numa_balancing": nb}


PMU_DIR = "/sys/bus/event_source/devices"


def _hw_pmu() -> tuple[str, dict] | None:
    """(pmu, perf_event_attr fields) for data-address load sampling, or None."""
    # Intel PEBS: cpu (or cpu_core on hybrid parts) with a mem-loads event.
    for pmu in ("cpu", "cpu_core"):
        ev = f"{PMU_DIR}/{pmu}/events/mem-loads"
        if kfs.exists(ev):
            spec = dict(x.split("=") for x in kfs.read(ev).split(","))
            config = int(spec.get("event", "0"), 16) | (int(spec.get("umask", "0"), 16) << 8)
            ldlat = 3
            return pmu, {"type": kfs.read_int(f"{PMU_DIR}/{pmu}/type"), "config": config,
                         "config1": ldlat, "precise_ip": 2}
    if kfs.exists(f"{PMU_DIR}/ibs_op/type"):   # AMD IBS op sampling
        return "ibs_op", {"type": kfs.read_int(f"{PMU_DIR}/ibs_op/type"), "config": 0,
                          "config1": 0, "precise_ip": 0}
    return None


class MemSampler(_BpfCounter):
    """Hardware load sampling with data addresses (PEBS mem-loads / IBS op)."""

    name = "ebpf-mem"
    program = _MEM_PROG
    sample_period = 10007

    @classmethod
    def available(cls) -> tuple[bool, str]:
        ok, why = bpfu.bcc_available()
        if not ok:
            return ok, why
        if _hw_pmu() is None:
            have = ", ".join(kfs.listdir(PMU_DIR)) or "none"
            return False, ("not available on this machine: no hardware PMU with data-address "
                           f"sampling (no cpu/events/mem-loads, no ibs_op in {PMU_DIR}; it "
                           f"has: {have})")
        return True, ""

    def _start(self, target: Target) -> None:
        self._load(target)
        from bcc import Perf
        pmu, f = _hw_pmu()
        attr = Perf.perf_event_attr()
        attr.type = f["type"]
        attr.config = f["config"]
        attr.config1 = f["config1"]
        attr.sample_period = self.sample_period
        attr.sample_type = 0x8 | 0x4000   # PERF_SAMPLE_ADDR | PERF_SAMPLE_DATA_SRC
        attr.precise_ip = f["precise_ip"]
        attr.exclude_kernel = 1
        self._pmu = pmu
        for p in target.pids:
            for tid in os.listdir(f"/proc/{p}/task"):
                self.bpf.attach_perf_event_raw(attr=attr, fn_name=b"on_sample", pid=int(tid),
                                               cpu=-1)

    def metadata(self) -> dict:
        return {**super().metadata(), "pmu": getattr(self, "_pmu", ""),
                "sample_period": self.sample_period}

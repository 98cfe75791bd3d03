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


import numpy as np
import psutil

from tiermem import kfs, procmaps
from tiermem.errors import TiermemError
from tiermem.samplers import bpf as bpfu
from tiermem.samplers.base import Sampler, Spans, Target

MAX_ENTRIES = 1 << 18           # distinct (pid, word) keys per read interval, at least;
MAX_ENTRIES_CAP = 1 << 21       # sized to the targets' writable memory (a NUMA scan makes
                                # every page fault once), at most 8 GiB of pages. Both maps
                                # are preallocated (~100 bytes of kernel memory per entry):
                                # a map that allocates per key measured 2.5x the reading
                                # cost under TCG. A fixed 2^18 map overflowed at 4 GiB
                                # (~890000 faults dropped per 10 s).
MAX_PIDS = 64

_KEY = np.dtype([("pid", "<u4"), ("pad", "<u4"), ("addr", "<u8")])
_VAL = np.dtype([("count", "<u8"), ("writes", "<u8"), ("score", "<u8")])

_COMMON = r"""
struct key_t { u32 pid; u32 pad; u64 addr; };
struct val_t { u64 count; u64 writes; u64 score; };
BPF_HASH(counts, struct key_t, struct val_t, MAX_ENTRIES);
BPF_HASH(targets, u32, u8, MAX_PIDS);
BPF_ARRAY(dropped, u64, 1);

static __always_inline void count_access(u32 tgid, u64 addr, u64 is_write, u64 score) {
    struct key_t k = {};
    struct val_t zero = {};
    k.pid = tgid;
    k.addr = addr & ~63ULL;
    struct val_t *v = counts.lookup_or_try_init(&k, &zero);
    if (v) {
        __sync_fetch_and_add(&v->count, 1);
        __sync_fetch_and_add(&v->score, score);
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

# NUMA hinting-fault delays. A hinting fault comes at the first access after the NUMA
# scanner made the page inaccessible (change_prot_numa over a range of the task's VMAs), so
# a page accessed at rate r faults about 1/r after its range was scanned. A kprobe and a
# kretprobe on change_prot_numa stamp every 8 MiB chunk of the range with the time the scan
# passed it (interpolated between entry and return; until the return, estimated from the
# task's previous walk speed) and keep the chunk's previous stamp;
# each fault then scores 1 + log2(W / d) in units of 1/16 (d: time since its chunk's last
# stamp, W: time between the chunk's last two stamps, i.e. the scan window), clipped to
# 1 .. 21 units of 1. The scan skips pages that are still inaccessible, so a page that did
# not fault in the previous window (last fault per page kept in an LRU map) was not made
# inaccessible by the last scan: it scores 1. A page touched in every window but long
# after each scan scores about 1 per window (what a plain count gives); one touched soon
# after every scan scores more.
# Integer log2 only (no floats in BPF).
_SCAN_PART = r"""
#if SCAN_TIMES
#include <uapi/linux/ptrace.h>
struct chunk_k { u32 pid; u32 pad; u64 chunk; };
struct chunk_v { u64 prev; u64 last; u64 walk; u64 pwalk; };
/* walk / pwalk: entry times of the scans that stamped last / prev */
BPF_TABLE("lru_hash", struct chunk_k, struct chunk_v, chunks, MAX_CHUNKS);
struct walk_v { u64 start; u64 end; u64 t0; };
BPF_HASH(walks, u32, struct walk_v, 1024);
BPF_HASH(speed, u32, u64, MAX_PIDS);       /* last walk: picoseconds per 4 KiB page */
BPF_TABLE("lru_hash", struct key_t, u64, lastf, MAX_PAGES);   /* page -> last fault, ns */

static __always_inline u64 tm_log2(u64 v) {
    u64 r = 0;
    if (v >> 32) { v >>= 32; r += 32; }
    if (v >> 16) { v >>= 16; r += 16; }
    if (v >> 8) { v >>= 8; r += 8; }
    if (v >> 4) { v >>= 4; r += 4; }
    if (v >> 2) { v >>= 2; r += 2; }
    if (v >> 1) { r += 1; }
    return r;
}

int scan_enter(struct pt_regs *ctx, void *vma, unsigned long start, unsigned long end) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    if (!targets.lookup(&tgid) || end <= start)
        return 0;
    u64 now = bpf_ktime_get_ns();
    struct walk_v w = {start, end, now};
    walks.update(&tid, &w);
    /* until the return gives the real times: this task's last walk speed */
    u64 *sp = speed.lookup(&tgid);
    u64 ps_per_page = sp ? *sp : 0;
    struct chunk_k k = {};
    k.pid = tgid;
    u64 c0 = start >> CHUNK_SHIFT, c1 = (end - 1) >> CHUNK_SHIFT;
    for (int i = 0; i < MAX_WALK_CHUNKS; i++) {
        if (c0 + i > c1)
            break;
        k.chunk = c0 + i;
        u64 a = (c0 + i) << CHUNK_SHIFT;
        u64 off = a > start ? a - start : 0;
        struct chunk_v *c = chunks.lookup(&k);
        struct chunk_v nv = {};
        nv.prev = c ? c->last : 0;
        nv.last = now + ((off >> 12) * ps_per_page) / 1000;
        nv.walk = now;
        nv.pwalk = c ? c->walk : 0;
        chunks.update(&k, &nv);
    }
    return 0;
}

int scan_return(struct pt_regs *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    struct walk_v *w = walks.lookup(&tid);
    if (!w)
        return 0;
    u64 t1 = bpf_ktime_get_ns(), t0 = w->t0, start = w->start, end = w->end;
    walks.delete(&tid);
    u64 span = end - start, dt = t1 - t0;
    if (span >> 12) {
        u64 ps = (dt * 1000) / (span >> 12);
        speed.update(&tgid, &ps);
    }
    struct chunk_k k = {};
    k.pid = tgid;
    u64 c0 = start >> CHUNK_SHIFT, c1 = (end - 1) >> CHUNK_SHIFT;
    for (int i = 0; i < MAX_WALK_CHUNKS; i++) {
        if (c0 + i > c1)
            break;
        k.chunk = c0 + i;
        struct chunk_v *c = chunks.lookup(&k);
        if (!c || c->walk != t0)
            continue;
        u64 a = (c0 + i) << CHUNK_SHIFT;
        u64 off = a > start ? a - start : 0;
        c->last = t0 + (span ? (dt * (off >> 12)) / ((span >> 12) + 1) : 0);
    }
    return 0;
}

static __always_inline u64 hint_score(u32 tgid, u64 addr) {
    u64 now = bpf_ktime_get_ns();
    struct key_t pk = {};
    pk.pid = tgid;
    pk.addr = addr & ~4095ULL;
    u64 *lf = lastf.lookup(&pk);
    u64 pf = lf ? *lf : 0;                   /* this page's previous fault */
    lastf.update(&pk, &now);
    struct chunk_k k = {};
    k.pid = tgid;
    k.chunk = addr >> CHUNK_SHIFT;
    struct chunk_v *c = chunks.lookup(&k);
    if (!c || !c->prev || c->last <= c->prev)
        return 16;                           /* no window known: count 1 */
    /* The scan skips pages that are still inaccessible: a page that did not fault since
       the scan before last was not made inaccessible by the last scan, but earlier, so
       its delay is at least a window: score 1. The bound is that scan's entry time, not
       the chunk's interpolated stamp: a page that faults right after the scan passed it
       (the hottest ones) can come before the stamp when the walk's speed is uneven, and
       comparing with the stamp gave exactly those pages the lowest score. */
    if (pf < c->pwalk || pf >= c->last)
        return 16;
    u64 d = now > c->last ? now - c->last : 1;
    u64 win = c->last - c->prev;
    u64 q = (win << 4) / d;                  /* 16 W / d */
    if (q <= 16)
        return 16;
    u64 l = tm_log2(q) - 4;                  /* floor(log2(W / d)) */
    if (l >= 20)
        return 16 + (20 << 4);
    /* 1 + log2(W/d) in 1/16 units, the fraction from the 4 bits below the top one */
    u64 frac = ((q << 4) >> (l + 4)) - 16;   /* 0..15 */
    return 16 + (l << 4) + frac;
}
#else
static __always_inline u64 hint_score(u32 tgid, u64 addr) { return 16; }
#endif
"""

_FAULT_PROG = _COMMON + _SCAN_PART + r"""
TRACEPOINT_PROBE(exceptions, page_fault_user) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!targets.lookup(&tgid))
        return 0;
    count_access(tgid, args->address, args->error_code & 2,    /* x86 PF_WRITE */
                 hint_score(tgid, args->address));
    return 0;
}
"""

_MEM_PROG = _COMMON + r"""
#include <uapi/linux/bpf_perf_event.h>
int on_sample(struct bpf_perf_event_data *ctx) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!targets.lookup(&tgid) || ctx->addr == 0)
        return 0;
    count_access(tgid, ctx->addr, 0, 16);
    return 0;
}
"""


def map_size(pids, floor: int, cap: int) -> int:
    """Entries for a per-page BPF map: the targets' pages + 1/8, between floor and cap. Pages
    = the larger of the resident pages and the private writable mappings (a target that has
    mapped its memory but not touched it yet). A map smaller than the target drops counts,
    or (LRU) forgets pages, once a NUMA scan makes all of them fault."""
    pages = 0
    for pid in pids:
        rss = wr = 0
        try:
            rss = psutil.Process(pid).memory_info().rss // 4096
            wr = sum(v.size for v in procmaps.read_vmas(pid, with_rss=False)
                     if v.perms[1] == "w" and v.perms[3] == "p") // 4096
        except (TiermemError, psutil.Error):
            pass
        pages += max(rss, wr)
    want = -(-(pages + pages // 8) // 4096) * 4096
    return int(min(max(want, floor), cap))


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
        self.max_entries = MAX_ENTRIES

    def _load(self, target: Target, cflags=()) -> None:
        if not target.pids:
            raise TiermemError(f"sampler {self.name} needs target pids")
        if len(target.pids) > MAX_PIDS:
            raise TiermemError(f"sampler {self.name}: at most {MAX_PIDS} pids")
        target.check_pids()
        self.max_entries = map_size(target.pids, MAX_ENTRIES, MAX_ENTRIES_CAP)
        self.stats = bpfu.BpfStats()
        self.bpf = bpfu.load(self.program, cflags=[f"-DMAX_ENTRIES={self.max_entries}",
                                                   f"-DMAX_PIDS={MAX_PIDS}", *cflags])
        import ctypes as ct
        t = self.bpf[b"targets"]
        for p in target.pids:
            t[ct.c_uint32(p)] = ct.c_uint8(1)

    def _read_spans(self, t0, t1) -> Spans:
        if self._bufs is None:
            self._bufs = bpfu.DrainBuffers(_KEY, _VAL, self.max_entries)
        k, v = bpfu.drain_hash(self.bpf[b"counts"], self._bufs)
        import ctypes as ct
        d = self.bpf[b"dropped"]
        dropped = int(d[ct.c_int(0)].value)
        if dropped:
            d[ct.c_int(0)] = ct.c_uint64(0)
            self.dropped_total += dropped
        return Spans(k["pid"].astype(np.int32), k["addr"], np.full(k.size, 64, np.uint64),
                     self._weight(v), True, "vaddr", t0, t1)

    def _weight(self, v: np.ndarray) -> np.ndarray:
        return v["count"].astype(np.float32)

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
        return {"map_entries": self.max_entries, "dropped": self.dropped_total,
                "bpf_stats": "on" if self.stats and self.stats.fd >= 0 else
                             f"off ({self.stats.error if self.stats else 'not started'})"}


SCAN_FN = "change_prot_numa"
CHUNK_SHIFT = 23                # scan stamps per 8 MiB chunk
MAX_CHUNKS = 1 << 16            # chunks with scan stamps (LRU), all targets together
MAX_PAGES = 1 << 19             # pages whose last fault time is kept (LRU; ~40 MiB of kernel
                                # memory): 2 GiB of 4 KiB pages at least, sized like the
                                # counts map to the targets' resident pages, older forgotten
MAX_WALK_CHUNKS = 1024          # chunks stamped per scan call: 8 GiB (the verifier's limit
                                # on a loop's jumps; a call covers scan_size_mb, 256 MiB)
WEIGHTS = ("auto", "delay", "count")


def hint_delay_available() -> tuple[bool, str]:
    """Whether hinting faults can be weighted by their delay after the NUMA scan: needs
    NUMA balancing in the kernel, kprobes, and change_prot_numa as a probe-able symbol."""
    if not kfs.exists("/proc/sys/kernel/numa_balancing"):
        return False, "no NUMA balancing in this kernel (/proc/sys/kernel/numa_balancing missing)"
    if not (kfs.exists("/sys/bus/event_source/devices/kprobe") or
            kfs.exists(kfs.TRACEFS + "/kprobe_events")):
        return False, ("no kprobes in this kernel (no kprobe event source in "
                       "/sys/bus/event_source/devices, no kprobe_events in tracefs: "
                       "CONFIG_KPROBES / CONFIG_KPROBE_EVENTS off)")
    blk = kfs.read("/sys/kernel/debug/kprobes/blacklist", "").split()
    if SCAN_FN in blk:
        return False, f"{SCAN_FN} is on the kprobe blacklist"
    if f" {SCAN_FN}\n" not in kfs.read("/proc/kallsyms", ""):
        return False, f"symbol {SCAN_FN} not in /proc/kallsyms (inlined or renamed)"
    return True, ""


class FaultSampler(_BpfCounter):
    """weights: 'delay' scores each fault by how soon after the NUMA scan it came (kprobes
    on change_prot_numa, see _SCAN_PART), 'count' counts faults, 'auto' takes delay where
    the kernel allows it. scan_period_ms / scan_size_mb, when given, set the kernel's NUMA
    balancing scan period (min = max) and size while sampling (tiermem.numa_scan), restored
    on stop and, after a crash, by the next start or the daemon's clean-up."""

    name = "ebpf"
    program = _FAULT_PROG

    def __init__(self, weights: str = "auto", scan_period_ms: int | None = None,
                 scan_size_mb: int | None = None):
        super().__init__()
        if weights not in WEIGHTS:
            raise TiermemError(f"eBPF weights must be one of {', '.join(WEIGHTS)}, "
                               f"not {weights!r}")
        self.weights = weights
        self.weights_used = "count"
        self.weights_note = ""
        self.scan_period_ms = scan_period_ms
        self.scan_size_mb = scan_size_mb

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return bpfu.tracepoint_ready(
            "exceptions/page_fault_user",
            "tracepoint exceptions:page_fault_user missing (x86 kernels only)")

    def _start(self, target: Target) -> None:
        delay = False
        if self.weights != "count":
            ok, why = hint_delay_available()
            if not ok and self.weights == "delay":
                raise TiermemError(f"eBPF delay weights not available: {why}")
            delay, self.weights_note = ok, why
        self.weights_used = "delay" if delay else "count"
        # bcc attaches TRACEPOINT_PROBE programs when it loads them
        self._load(target, [f"-DSCAN_TIMES={int(delay)}", f"-DMAX_CHUNKS={MAX_CHUNKS}",
                            f"-DCHUNK_SHIFT={CHUNK_SHIFT}", f"-DMAX_PAGES={map_size(target.pids, MAX_PAGES, MAX_ENTRIES_CAP)}", "-Wno-duplicate-decl-specifier",
                            f"-DMAX_WALK_CHUNKS={MAX_WALK_CHUNKS}"])
        if delay:
            try:
                self.bpf.attach_kprobe(event=SCAN_FN.encode(), fn_name=b"scan_enter")
                self.bpf.attach_kretprobe(event=SCAN_FN.encode(), fn_name=b"scan_return")
            except Exception as e:
                raise TiermemError(f"cannot attach kprobes to {SCAN_FN}: {e}") from e

    def _weight(self, v: np.ndarray) -> np.ndarray:
        if self.weights_used == "delay":
            return (v["score"] / 16.0).astype(np.float32)
        return v["count"].astype(np.float32)

    def metadata(self) -> dict:
        nb = kfs.read("/proc/sys/kernel/numa_balancing", "absent")
        m = {**super().metadata(), "tracepoint": "exceptions:page_fault_user",
             "numa_balancing": nb,
             "weights": ("hint-fault delay score (kprobes on change_prot_numa)"
                         if self.weights_used == "delay" else "fault count")}
        if self.weights_note:
            m["weights_note"] = self.weights_note
        return m


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
            for th in psutil.Process(p).threads():
                self.bpf.attach_perf_event_raw(attr=attr, fn_name=b"on_sample", pid=th.id,
                                               cpu=-1)

    def metadata(self) -> dict:
        return {**super().metadata(), "pmu": getattr(self, "_pmu", ""),
                "sample_period": self.sample_period}

"""DAMON sampler: region access frequencies from the kernel's DAMON, through sysfs.

Two ways in:
  * own kdamond (default): tiermem starts a kdamond of its own (tiermem.damon_sysfs) with
    'vaddr' for target pids, or 'paddr' for physical ranges (a node's memory);
  * attach: read the results of a kdamond that is already running (started by someone
    else), read-only. Nothing about that kdamond is changed; the sysfs interface cannot add
    a kdamond while another runs, so this is the way to use DAMON on a machine where one
    already runs (such as this project's host).

Results come from the `damon:damon_aggregated` tracepoint: a BPF program, filtered to the
kdamond's pid, sums each region's nr_accesses per aggregation in a BPF map that read()
drains in one batch, so reading costs almost nothing. An own kdamond falls back to
tried-regions snapshots of a 'stat' scheme (about 4 sysfs reads per region per read) where
bcc or the tracepoint is missing, or with results="snapshot"; metadata() says which.

Weights: nr_accesses of a region = the number of sampling intervals (of one aggregation
interval) in which an access to it was seen; every page of the region gets that weight
(with the tracepoint: its mean over the aggregations since the previous read).
"""
from __future__ import annotations

import ctypes as ct
import os
import threading
import time

import numpy as np

from tiermem import damon_sysfs as ds
from tiermem import kfs
from tiermem.errors import TiermemError
from tiermem.samplers import bpf as bpfu
from tiermem.samplers.base import Sampler, Spans, Target

# Sums nr_accesses per region shape (target, start, end) over the aggregations between two
# reads, and counts the aggregations per target: a target's regions come in ascending
# address order, so a start at or below the previous one opens a new aggregation. Only the
# kdamond thread runs this for its own events, so plain updates suffice.
_AGG_PROG = r"""
struct key_t { u64 target; u64 start; u64 end; };
struct val_t { u64 acc; u64 n; u64 age; };
BPF_HASH(regions, struct key_t, struct val_t, MAX_ENTRIES);
BPF_ARRAY(kdpid, u32, 1);                 /* the kdamond to listen to; 0 = none yet */
BPF_ARRAY(last_start, u64, MAX_TARGETS);  /* previous region's start + 1, per target */
BPF_ARRAY(aggs, u64, MAX_TARGETS);        /* aggregations seen, per target */
BPF_ARRAY(dropped, u64, 1);

TRACEPOINT_PROBE(damon, damon_aggregated) {
    int z = 0;
    u32 *want = kdpid.lookup(&z);
    if (!want || *want == 0 || (u32)(bpf_get_current_pid_tgid() & 0xffffffff) != *want)
        return 0;
    u32 t = args->target_id < MAX_TARGETS ? args->target_id : MAX_TARGETS - 1;
    u64 *ls = last_start.lookup(&t);
    u64 *ag = aggs.lookup(&t);
    if (!ls || !ag)
        return 0;
    u64 s1 = args->start + 1;
    if (*ls == 0 || s1 <= *ls)
        *ag += 1;
    *ls = s1;
    struct key_t k = {};
    struct val_t zero = {};
    k.target = t;
    k.start = args->start;
    k.end = args->end;
    struct val_t *v = regions.lookup_or_try_init(&k, &zero);
    if (v) {
        v->acc += args->nr_accesses;
        v->n += 1;
        v->age = args->age;
    } else {
        u64 *d = dropped.lookup(&z);
        if (d)
            *d += 1;
    }
    return 0;
}
"""
_AKEY = np.dtype([("target", "<u8"), ("start", "<u8"), ("end", "<u8")])
_AVAL = np.dtype([("acc", "<u8"), ("n", "<u8"), ("age", "<u8")])
AGG_MAX_ENTRIES = 1 << 17       # region shapes between two reads (DAMON reshapes every aggr.)
MAX_TARGETS = 64


def mean_over_aggregations(start: np.ndarray, end: np.ndarray, acc: np.ndarray,
                           n_aggs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Regions of several aggregations (they overlap: DAMON splits and merges regions at
    every one) -> disjoint (start, end, weight) pieces where weight is the sum of acc over the
    regions covering the piece divided by n_aggs: each page's mean nr_accesses."""
    if start.size == 0:
        z = np.empty(0, np.uint64)
        return z, z, np.empty(0, np.float32)
    b = np.concatenate([start, end]).astype(np.uint64)
    d = np.concatenate([acc, -acc.astype(np.int64)]).astype(np.int64)
    order = np.argsort(b, kind="stable")
    b, c = b[order], np.cumsum(d[order])
    last = np.r_[b[1:] != b[:-1], True]        # the running sum after each boundary
    ub, cw = b[last], c[last]
    w = cw[:-1]
    keep = w > 0
    return (ub[:-1][keep], ub[1:][keep],
            (w[keep] / max(n_aggs, 1)).astype(np.float32))


RESULTS = ("auto", "tracepoint", "snapshot")

# Loaded aggregation programs not in use (listening to no kdamond). bcc compiles a program
# with clang at load time: about 1 s natively, 15-35 s under QEMU TCG, and that was the
# daemon's whole start-up delay for a new process. A stopped sampler gives its program back
# here (maps zeroed) and the next one takes it; prewarm() loads one ahead of time. Pooling is
# on from the first prewarm() to release() (tiermemd's lifetime); otherwise stop() unloads.
_POOL: list = []
_POOLING = [False]
_POOL_LOCK = threading.Lock()      # guards _POOL
_LOAD_LOCK = threading.Lock()      # held while a program compiles: one compile at a time


def _load_program():
    return bpfu.load(_AGG_PROG, cflags=[f"-DMAX_ENTRIES={AGG_MAX_ENTRIES}",
                                        f"-DMAX_TARGETS={MAX_TARGETS}"])


def _take_program():
    with _LOAD_LOCK:                # waits for a prewarm compile under way
        with _POOL_LOCK:
            if _POOL:
                return _POOL.pop()
        return _load_program()


def _give_back(bpf) -> None:
    """Zero the program's maps (it listens to no kdamond from here on) and pool it."""
    bpf[b"kdpid"][ct.c_int(0)] = ct.c_uint32(0)
    bpf[b"regions"].clear()
    for name in (b"last_start", b"aggs"):
        t = bpf[name]
        for i in range(MAX_TARGETS):
            t[ct.c_int(i)] = ct.c_uint64(0)
    bpf[b"dropped"][ct.c_int(0)] = ct.c_uint64(0)
    with _POOL_LOCK:
        if _POOLING[0]:
            _POOL.append(bpf)
            return
    bpf.cleanup()


def pooled() -> int:
    """Loaded, unused aggregation programs."""
    with _POOL_LOCK:
        return len(_POOL)


def tracepoint_available() -> tuple[bool, str]:
    """Whether results can come from damon:damon_aggregated (bcc, headers, the event)."""
    return bpfu.tracepoint_ready(
        "damon/damon_aggregated", f"tracepoint damon:damon_aggregated missing in "
        f"{kfs.TRACEFS}/events (kernel without CONFIG_DAMON tracepoints)")


class DamonSampler(Sampler):
    name = "damon"

    def __init__(self, sample_us: int = 5_000, aggr_us: int = 100_000,
                 update_us: int = 1_000_000, min_nr_regions: int = 10,
                 max_nr_regions: int = 1000, force: bool = False, attach: int | None = None,
                 results: str = "auto"):
        super().__init__()
        if results not in RESULTS:
            raise TiermemError(f"DAMON results must be one of {', '.join(RESULTS)}, "
                               f"not {results!r}")
        self.cfg = dict(sample_us=sample_us, aggr_us=aggr_us, update_us=update_us,
                        min_nr_regions=min_nr_regions, max_nr_regions=max_nr_regions)
        self.force = force
        self.attach = attach
        self.results = results
        self.results_used = ""          # 'tracepoint' or 'snapshot' once started
        self.results_note = ""          # why the snapshot fallback was taken
        self.kd: ds.Kdamond | None = None
        self.bpf = None
        self.stats = None
        self._pids: list[int] = []
        self._kd_pid = -1
        self._last_agg = 0.0
        self._final_kernel = 0.0
        self._bufs = None
        self.dropped_total = 0

    @classmethod
    def prewarm(cls, **params) -> bool:
        """Compile and load one aggregation program ahead of a start (tiermemd does this in
        the background when a target uses DAMON), so a new process is sampled within an
        aggregation interval instead of after a compile. False (nothing loaded) where the
        tracepoint path is not available or one is pooled already."""
        if params.get("results") == "snapshot" or not tracepoint_available()[0]:
            return False
        _POOLING[0] = True
        with _LOAD_LOCK:
            with _POOL_LOCK:
                if _POOL:
                    return False
            b = _load_program()
            with _POOL_LOCK:
                _POOL.append(b)
        return True

    @classmethod
    def release(cls) -> None:
        """Unload the pooled programs (daemon shutdown)."""
        with _POOL_LOCK:
            progs, _POOL[:] = list(_POOL), []
            _POOLING[0] = False
        for b in progs:
            b.cleanup()

    @classmethod
    def available(cls) -> tuple[bool, str]:
        if not kfs.exists(ds.ADMIN):
            return False, ("no DAMON sysfs interface (/sys/kernel/mm/damon/admin missing; "
                           "kernel without CONFIG_DAMON_SYSFS)")
        return True, ""

    def _start(self, target: Target) -> None:
        if self.attach is not None:
            return self._start_attach()
        if target.pids and target.phys_ranges:
            raise TiermemError("DAMON: give pids (vaddr) or physical ranges (paddr), not both")
        if target.pids:
            target.check_pids()
            ops = "vaddr"
            if not ds.has_operations("vaddr"):
                raise TiermemError(
                    f"DAMON 'vaddr' (per-process monitoring) is not built into this kernel "
                    f"({os.uname().release}): monitor physical memory with paddr "
                    "(--node / --phys-range) instead")
        elif target.phys_ranges:
            ops = "paddr"
        else:
            raise TiermemError("DAMON needs target pids or physical ranges")
        if not self.force:
            ds.check_free()     # refuse a busy DAMON before compiling anything
        use_tp = self._choose_results()
        if len(target.pids) > 1 and not use_tp:
            raise TiermemError("DAMON sampler: one pid at a time with snapshot results (a "
                               "tried-regions snapshot does not say which target a region "
                               "belongs to)" + (f"; tracepoint results: {self.results_note}"
                                                if self.results_note else ""))
        self.space = "vaddr" if ops == "vaddr" else "paddr"
        self._pids = list(target.pids)
        if use_tp:
            # Loaded (tracepoint switched on) before the kdamond runs: no CPU is inside the
            # traced code while its static key is patched (see docs: TCG caveat).
            self._load_agg()
        cfg = ds.DamonConfig(ops=ops, pids=list(target.pids),
                             ranges=list(target.phys_ranges), stat_scheme=not use_tp,
                             **self.cfg)
        self.kd = ds.Kdamond(cfg, force=self.force)
        self.kd.start()
        self._kd_pid = self.kd.pid
        if use_tp:
            self._listen(self._kd_pid)
        self._last_agg = time.monotonic()

    def _choose_results(self) -> bool:
        """True: results from the tracepoint; False: tried-regions snapshots."""
        if self.results == "snapshot":
            self.results_used = "snapshot"
            return False
        ok, why = tracepoint_available()
        if ok:
            self.results_used = "tracepoint"
            return True
        if self.results == "tracepoint":
            raise TiermemError(f"DAMON tracepoint results not available: {why}")
        self.results_used, self.results_note = "snapshot", why
        return False

    def _load_agg(self) -> None:
        self.stats = bpfu.BpfStats()
        self.bpf = _take_program()
        self._prog_ns0 = bpfu.prog_run_ns(self.bpf)     # run time of earlier users
        self._aggs_seen = np.zeros(MAX_TARGETS, np.uint64)

    def _listen(self, kdamond_pid: int) -> None:
        self.bpf[b"kdpid"][ct.c_int(0)] = ct.c_uint32(kdamond_pid)

    def _start_attach(self) -> None:
        i = self.attach
        if not 0 <= i < ds.nr_kdamonds():
            raise TiermemError(f"no kdamond {i} to attach to (nr_kdamonds is "
                               f"{ds.nr_kdamonds()})")
        info = ds.kdamond_info(i)
        if info["state"] != "on" or info["pid"] <= 0:
            raise TiermemError(f"kdamond {i} is not running (state {info['state']})")
        ctx = f"{ds.KDAMONDS}/{i}/contexts/0/monitoring_attrs/intervals"
        self.cfg.update(sample_us=kfs.read_int(ctx + "/sample_us", 0),
                        aggr_us=kfs.read_int(ctx + "/aggr_us", 0))
        self.space = "paddr" if info["operations"] == "paddr" else "vaddr"
        self._attach_ops = info["operations"]
        self._kd_pid = info["pid"]
        self.results_used = "tracepoint"
        self._load_agg()
        self._listen(self._kd_pid)

    def _read_spans(self, t0, t1) -> Spans:
        if self.kd is not None and not self.kd.running:
            raise TiermemError(f"kdamond {self.kd.index} stopped (its target exited?)")
        if self.bpf is not None:
            return self._drain_aggregated(t0, t1)
        r = self.kd.snapshot()
        nz = r["nr_accesses"] > 0
        if self.space == "vaddr":
            pids = np.full(int(nz.sum()), self._pids[0], np.int32)
        else:
            pids = np.zeros(int(nz.sum()), np.int32)
        return Spans(pids, r["start"][nz], (r["end"] - r["start"])[nz],
                     r["nr_accesses"][nz].astype(np.float32), False, self.space, t0, t1)

    def _drain_aggregated(self, t0, t1) -> Spans:
        if self._bufs is None:
            self._bufs = bpfu.DrainBuffers(_AKEY, _AVAL, AGG_MAX_ENTRIES)
        k, v = bpfu.drain_hash(self.bpf[b"regions"], self._bufs)
        targets = np.unique(k["target"]) if k.size else []
        if k.size:
            self._last_agg = time.monotonic()
        elif self.kd is not None and time.monotonic() - self._last_agg > self._agg_patience():
            # an own kdamond that runs but reports nothing would read as "no accesses"
            raise TiermemError(
                f"kdamond {self.kd.index} (pid {self._kd_pid}) delivered no damon_aggregated "
                f"events for {time.monotonic() - self._last_agg:.0f} s (aggregation interval "
                f"{self.cfg['aggr_us'] / 1e6:g} s)")
        aggs, n_aggs = self.bpf[b"aggs"], {}
        for t in targets:           # aggregations since the previous read, per target
            now = int(aggs[ct.c_int(int(t))].value)
            n_aggs[int(t)] = now - int(self._aggs_seen[int(t)])
            self._aggs_seen[int(t)] = now
        d = self.bpf[b"dropped"]
        dropped = int(d[ct.c_int(0)].value)
        if dropped:
            d[ct.c_int(0)] = ct.c_uint64(0)
            self.dropped_total += dropped
        parts = []
        for t in targets:
            m = k["target"] == t
            s, e, w = mean_over_aggregations(k["start"][m], k["end"][m], v["acc"][m],
                                             n_aggs[int(t)])
            if self.space == "vaddr" and self._pids:
                pid = self._pids[min(int(t), len(self._pids) - 1)]
            else:
                pid = 0
            parts.append((np.full(s.size, pid, np.int32), s, e - s, w))
        if not parts:
            return Spans.empty(self.space, t0, t1)
        pid, s, ln, w = (np.concatenate(x) for x in zip(*parts))
        return Spans(pid, s, ln, w, False, self.space, t0, t1)

    def _agg_patience(self) -> float:
        """Seconds without any aggregation before an own kdamond counts as broken: ten
        aggregation intervals, at least 10 s (a slow, loaded machine stretches them)."""
        return max(10 * self.cfg["aggr_us"] / 1e6, 10.0)

    def regions(self) -> dict[str, np.ndarray]:
        """All monitored regions now, including unaccessed ones (own kdamond with snapshot
        results only)."""
        if self.kd is None:
            raise TiermemError("regions() needs an own kdamond (not attach mode)")
        return self.kd.snapshot()

    def _stop(self) -> None:
        self._final_kernel = self._kernel_cpu_seconds()
        # kdamond off first, then the tracepoint (nothing runs the traced code then)
        if self.kd is not None:
            try:
                self.kd.stop()
            finally:
                self.kd = None
        if self.bpf is not None:
            b, self.bpf = self.bpf, None
            if _POOLING[0]:
                try:
                    _give_back(b)   # kdamond off: nothing runs the program now
                except Exception:
                    b.cleanup()
            else:
                b.cleanup()
        if self.stats is not None:
            self.stats.close()
            self.stats = None

    def _kernel_cpu_seconds(self) -> float:
        if self.kd is None and self.bpf is None:
            return self._final_kernel
        t = self.kd.cpu_seconds() if self.kd is not None else 0.0
        if self.bpf is not None:
            # in attach mode the kdamond is someone else's and runs anyway: our cost is the
            # BPF program on its tracepoint
            t += (bpfu.prog_run_ns(self.bpf) - self._prog_ns0) / 1e9
        return t

    def prog_ids(self) -> list[int]:
        return bpfu.prog_ids(self.bpf) if self.bpf is not None else []

    def kdamond_pid(self) -> int:
        return self._kd_pid

    def metadata(self) -> dict:
        m = {"sample_us": self.cfg["sample_us"], "aggr_us": self.cfg["aggr_us"],
             "ops": self.space if self.attach is None else getattr(self, "_attach_ops", ""),
             "results": ("damon:damon_aggregated (BPF)" if self.results_used == "tracepoint"
                         else "tried_regions")}
        if self.attach is None:
            m.update(update_us=self.cfg["update_us"], min_nr_regions=self.cfg["min_nr_regions"],
                     max_nr_regions=self.cfg["max_nr_regions"])
            if self.results_note:
                m["results_fallback"] = self.results_note
        else:
            m["attached_kdamond"] = self.attach
        if self.results_used == "tracepoint":
            m.update(map_entries=AGG_MAX_ENTRIES, dropped=self.dropped_total,
                     kdamond_pid=self._kd_pid)
        return m

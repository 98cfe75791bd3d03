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

import os

import numpy as np

from tiermem import damon_sysfs as ds
from tiermem import kfs
from tiermem.errors import TiermemError
from tiermem.samplers import bpf as bpfu
from tiermem.samplers.base import Sampler, Spans, Target

_AGG_PROG = r"""
struct key_t { u64 target; u64 start; };
struct val_t { u64 end; u64 acc; u64 n; u64 age; };
BPF_HASH(regions, struct key_t, struct val_t, MAX_ENTRIES);

BPF_ARRAY(kdpid, u32, 1);    /* the kdamond to listen to; 0 = none yet */

TRACEPOINT_PROBE(damon, damon_aggregated) {
    int z = 0;
    u32 *want = kdpid.lookup(&z);
    if (!want || *want == 0 || (u32)(bpf_get_current_pid_tgid() & 0xffffffff) != *want)
        return 0;
    struct key_t k = {};
    struct val_t zero = {};
    k.target = args->target_id;
    k.start = args->start;
    struct val_t *v = regions.lookup_or_try_init(&k, &zero);
    if (v) {
        v->end = args->end;
        v->acc += args->nr_accesses;
        v->n += 1;
        v->age = args->age;
    }
    return 0;
}
"""
_AKEY = np.dtype([("target", "<u8"), ("start", "<u8")])
_AVAL = np.dtype([("end", "<u8"), ("acc", "<u8"), ("n", "<u8"), ("age", "<u8")])
ATTACH_MAX_ENTRIES = 1 << 16


RESULTS = ("auto", "tracepoint", "snapshot")


def tracepoint_available() -> tuple[bool, str]:
    """Whether results can come from damon:damon_aggregated (bcc, headers, the event)."""
    ok, why = bpfu.bcc_available()
    if not ok:
        return ok, why
    try:
        kfs.ensure_tracefs()
    except TiermemError as e:
        return False, str(e)
    if not kfs.exists(kfs.TRACEFS + "/events/damon/damon_aggregated"):
        return False, (f"tracepoint damon:damon_aggregated missing in {kfs.TRACEFS}/events "
                       "(kernel without CONFIG_DAMON tracepoints)")
    return True, ""


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
        self._final_kernel = 0.0
        self._bufs = None

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
        self.bpf = bpfu.load(_AGG_PROG, cflags=[f"-DMAX_ENTRIES={ATTACH_MAX_ENTRIES}"])

    def _listen(self, kdamond_pid: int) -> None:
        import ctypes as ct
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
            self._bufs = bpfu.DrainBuffers(_AKEY, _AVAL, ATTACH_MAX_ENTRIES)
        k, v = bpfu.drain_hash(self.bpf[b"regions"], self._bufs)
        keep = v["n"] > 0
        k, v = k[keep], v[keep]
        # Regions split and merge between aggregations: one key per (target, start) seen,
        # with the end it last had. Clip each to the next start so no page counts twice.
        order = np.lexsort((k["start"], k["target"]))
        k, v = k[order], v[order]
        end = v["end"].copy()
        if k.size > 1:
            same = k["target"][1:] == k["target"][:-1]
            end[:-1] = np.where(same, np.minimum(end[:-1], k["start"][1:]), end[:-1])
        w = (v["acc"] / v["n"]).astype(np.float32)
        nz = (w > 0) & (end > k["start"])
        if self.space == "vaddr" and self._pids:
            tid = k["target"][nz].astype(np.int64)
            pids = np.asarray(self._pids, np.int32)[np.minimum(tid, len(self._pids) - 1)]
        else:
            pids = np.zeros(int(nz.sum()), np.int32)
        return Spans(pids, k["start"][nz], (end - k["start"])[nz], w[nz], False,
                     self.space, t0, t1)

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
            self.bpf.cleanup()
            self.bpf = None
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
            t += bpfu.prog_run_ns(self.bpf) / 1e9
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
        return m

"""DAMON sampler: region access frequencies from the kernel's DAMON, through sysfs.

Two ways in:
  * own kdamond (default): tiermem starts a kdamond of its own (tiermem.damon_sysfs) with
    'vaddr' for target pids, or 'paddr' for physical ranges (a node's memory), and reads the
    monitoring results as tried-regions snapshots of a 'stat' scheme;
  * attach: read the results of a kdamond that is already running (started by someone
    else), read-only, from the `damon:damon_aggregated` tracepoint with a BPF program that
    sums each region's nr_accesses in a BPF map. Nothing about that kdamond is changed; the
    sysfs interface cannot add a kdamond while another runs, so this is the way to use DAMON
    on a machine where one already runs (such as this project's host).

Weights: nr_accesses of a region = the number of sampling intervals (of one aggregation
interval) in which an access to it was seen; every page of the region gets that weight.
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

TRACEPOINT_PROBE(damon, damon_aggregated) {
    if ((u32)(bpf_get_current_pid_tgid() & 0xffffffff) != KDAMOND_PID)
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


class DamonSampler(Sampler):
    name = "damon"

    def __init__(self, sample_us: int = 5_000, aggr_us: int = 100_000,
                 update_us: int = 1_000_000, min_nr_regions: int = 10,
                 max_nr_regions: int = 1000, force: bool = False, attach: int | None = None):
        super().__init__()
        self.cfg = dict(sample_us=sample_us, aggr_us=aggr_us, update_us=update_us,
                        min_nr_regions=min_nr_regions, max_nr_regions=max_nr_regions)
        self.force = force
        self.attach = attach
        self.kd: ds.Kdamond | None = None
        self.bpf = None
        self.stats = None
        self._pids: list[int] = []
        self._kd_pid = -1
        self._kd_cpu0 = 0.0
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
            if len(target.pids) > 1:
                raise TiermemError("DAMON sampler: one pid at a time (a tried-regions snapshot "
                                   "does not say which target a region belongs to)")
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
        self.space = "vaddr" if ops == "vaddr" else "paddr"
        self._pids = list(target.pids)
        cfg = ds.DamonConfig(ops=ops, pids=list(target.pids),
                             ranges=list(target.phys_ranges), **self.cfg)
        self.kd = ds.Kdamond(cfg, force=self.force)
        self.kd.start()
        self._kd_pid = self.kd.pid

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
        self._kd_cpu0 = ds.thread_cpu_seconds(self._kd_pid)
        self.stats = bpfu.BpfStats()
        self.bpf = bpfu.load(_AGG_PROG, cflags=[f"-DKDAMOND_PID={info['pid']}",
                                                f"-DMAX_ENTRIES={ATTACH_MAX_ENTRIES}"])

    def _read_spans(self, t0, t1) -> Spans:
        if self.bpf is not None:
            if self._bufs is None:
                self._bufs = bpfu.DrainBuffers(_AKEY, _AVAL, ATTACH_MAX_ENTRIES)
            k, v = bpfu.drain_hash(self.bpf[b"regions"], self._bufs)
            keep = v["n"] > 0
            k, v = k[keep], v[keep]
            w = (v["acc"] / v["n"]).astype(np.float32)
            nz = w > 0
            pid = np.zeros(int(nz.sum()), np.int32)
            return Spans(pid, k["start"][nz], (v["end"] - k["start"])[nz], w[nz], False,
                         self.space, t0, t1)
        r = self.kd.snapshot()
        nz = r["nr_accesses"] > 0
        if self.space == "vaddr":
            pids = np.full(int(nz.sum()), self._pids[0], np.int32)
        else:
            pids = np.zeros(int(nz.sum()), np.int32)
        return Spans(pids, r["start"][nz], (r["end"] - r["start"])[nz],
                     r["nr_accesses"][nz].astype(np.float32), False, self.space, t0, t1)

    def regions(self) -> dict[str, np.ndarray]:
        """All monitored regions now, including unaccessed ones (own kdamond only)."""
        if self.kd is None:
            raise TiermemError("regions() needs an own kdamond (not attach mode)")
        return self.kd.snapshot()

    def _stop(self) -> None:
        if self.kd is not None:
            self._final_kernel = self._kernel_cpu_seconds()
            try:
                self.kd.stop()
            finally:
                self.kd = None
        if self.bpf is not None:
            self._final_kernel = self._kernel_cpu_seconds()
            self.bpf.cleanup()
            self.bpf = None
        if self.stats is not None:
            self.stats.close()
            self.stats = None

    def _kernel_cpu_seconds(self) -> float:
        if self.kd is not None:
            return self.kd.cpu_seconds()
        if self.bpf is not None:
            # attach mode: the kdamond is someone else's and runs anyway; our cost is the
            # BPF program on its tracepoint.
            return bpfu.prog_run_ns(self.bpf) / 1e9
        return self._final_kernel

    def prog_ids(self) -> list[int]:
        return bpfu.prog_ids(self.bpf) if self.bpf is not None else []

    def kdamond_pid(self) -> int:
        return self._kd_pid

    def metadata(self) -> dict:
        m = {"sample_us": self.cfg["sample_us"], "aggr_us": self.cfg["aggr_us"],
             "ops": self.space if self.attach is None else getattr(self, "_attach_ops", "")}
        if self.attach is None:
            m.update(update_us=self.cfg["update_us"], min_nr_regions=self.cfg["min_nr_regions"],
                     max_nr_regions=self.cfg["max_nr_regions"], results="tried_regions")
        else:
            m.update(attached_kdamond=self.attach, results="damon:damon_aggregated (BPF)")
        return m

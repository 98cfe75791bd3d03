"""The kernel's own memory tiering, as the baseline tiermemd is compared with: NUMA balancing
in memory-tiering mode (kernel.numa_balancing=2) with demotion on.

    with kernel_tiering(rate_mbps=64) as knobs:   # settings restored on exit
        ...
    with kernel_tiering_off():                    # numa_balancing=0 while tiermemd runs
        ...

The second matters for a fair comparison: distribution kernels boot with numa_balancing=1,
which also migrates pages of the slow (CPU-less) node to the node of the CPU that touches
them, i.e. it promotes on its own, next to tiermemd.

rate_mbps > 0 sets the promotion rate limit (kernel.numa_balancing_promote_rate_limit_MBps,
the kernel's counterpart of tiermemd's migration budget); 0 keeps the kernel's value. The
scan periods and the hot threshold (debugfs sched/numa_balancing) are left alone and
recorded in the returned dict, with the /proc/vmstat promotion counters at entry.
"""
from __future__ import annotations

import contextlib
import glob
import os

from tiermem.errors import TiermemError

NUMA_BALANCING = "/proc/sys/kernel/numa_balancing"
DEMOTION = "/sys/kernel/mm/numa/demotion_enabled"
RATE_LIMIT = "/proc/sys/kernel/numa_balancing_promote_rate_limit_MBps"
DEBUGFS = "/sys/kernel/debug/sched/numa_balancing"


def tiering_vmstat() -> dict[str, int]:
    """/proc/vmstat counters of NUMA balancing and of promotion/demotion."""
    out = {}
    with open("/proc/vmstat") as f:
        for ln in f:
            k, v = ln.split()
            if k.startswith(("pgpromote", "pgdemote", "numa_")):
                out[k] = int(v)
    return out


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def kernel_tiering(rate_mbps: int = 0):
    knobs = {NUMA_BALANCING: "2", DEMOTION: "true"}
    if rate_mbps:
        knobs[RATE_LIMIT] = str(rate_mbps)
    return _knobs(knobs)


def kernel_tiering_off():
    return _knobs({NUMA_BALANCING: "0"})


@contextlib.contextmanager
def _knobs(knobs: dict[str, str]):
    for k in knobs:
        if not os.path.exists(k):
            raise TiermemError(f"this kernel has no {k}: it cannot run NUMA-balancing "
                               f"tiering (needs CONFIG_NUMA_BALANCING and memory tiers)")
    old = {k: _read(k) for k in knobs}
    record = {"set": dict(knobs), "before": old, "vmstat_at_start": tiering_vmstat(),
              "debugfs": {}}
    for f in sorted(glob.glob(DEBUGFS + "/*")):
        with contextlib.suppress(OSError):
            record["debugfs"][os.path.basename(f)] = _read(f)
    try:
        for k, v in knobs.items():
            with open(k, "w") as f:
                f.write(v)
        yield record
    finally:
        for k, v in old.items():
            with contextlib.suppress(OSError), open(k, "w") as f:
                f.write(v)


def vmstat_delta(record: dict) -> dict[str, int]:
    """Counter changes since kernel_tiering() was entered."""
    v0 = record["vmstat_at_start"]
    return {k: v - v0.get(k, 0) for k, v in tiering_vmstat().items() if v - v0.get(k, 0)}

"""The damon policy's kernel option: let the kernel's own DAMOS migrate_hot / migrate_cold
actions (Linux 6.11+) do the tiering, configured through /sys/kernel/mm/damon/admin.

One kdamond with operations ``paddr`` over the fast and the slow node's physical ranges and
three schemes: ``stat`` (scheme 0, whose tried_regions give the monitoring results, as in
tiermem.damon_sysfs), ``migrate_hot`` (hot regions -> fast node, ``target_nid``) and
``migrate_cold`` (cold regions -> slow node), each with a size quota per ``quota_ms``
reset interval and free-memory-rate watermarks on the fast node for migrate_cold (active while
the fast node's free share is under ``wmark_high_pct``). The sysfs plumbing (feature
detection, ownership of the kdamond, start/stop) is tiermem.damon_sysfs's; this module only
adds the schemes. Here the policy object does not plan: the kernel migrates, and
``status()`` reports what its schemes tried and applied.

Refused with a precise error when the kernel has no DAMON sysfs, no paddr operations, no
migrate_hot/migrate_cold (the ``target_nid`` file, or the action write is rejected), or the
machine has fewer than two NUMA nodes with memory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from tiermem import damon_sysfs as ds
from tiermem import kfs
from tiermem.errors import TiermemError


@dataclass
class KernelDamosConfig:
    fast_node: int = 0
    slow_node: int = 1
    sample_us: int = 5_000
    aggr_us: int = 100_000
    hot_min_pct: float = 50.0        # migrate_hot: nr_accesses >= this % of samples
    hot_min_age: int = 1             # aggregations
    cold_max_pct: float = 0.0        # migrate_cold: nr_accesses <= this % of samples
    cold_min_age: int = 10           # aggregations
    quota_mb: int = 256              # per scheme, per quota_ms
    quota_ms: int = 1000
    wmark_high_pct: float = 5.0      # migrate_cold runs while fast free < this %

    def validate(self) -> None:
        if self.fast_node == self.slow_node:
            raise TiermemError("kernel DAMOS: fast_node and slow_node must differ")
        for name in ("hot_min_pct", "cold_max_pct", "wmark_high_pct"):
            v = getattr(self, name)
            if not 0 <= v <= 100:
                raise TiermemError(f"kernel DAMOS: {name} must be 0..100, got {v}")
        if self.quota_mb <= 0 or self.quota_ms <= 0:
            raise TiermemError("kernel DAMOS: quota_mb and quota_ms must be > 0")


def check_supported(cfg: KernelDamosConfig) -> None:
    """Raise TiermemError saying exactly why the kernel's DAMOS migration cannot run here."""
    if not kfs.exists(ds.ADMIN):
        raise TiermemError("kernel DAMOS: no DAMON sysfs interface (/sys/kernel/mm/damon/admin "
                           "missing: CONFIG_DAMON_SYSFS off)")
    feats = {f["name"]: f for f in ds.detect_features(tracefs=False)}
    if not feats["paddr"]["present"]:
        raise TiermemError(f"kernel DAMOS: DAMON paddr operations missing "
                           f"({feats['paddr']['note']})")
    if not feats["migrate_hot_cold"]["present"]:
        raise TiermemError("kernel DAMOS: this kernel has no DAMOS migrate_hot/migrate_cold "
                           f"actions ({feats['migrate_hot_cold']['note']})")
    nodes = [int(d[4:]) for d in kfs.listdir("/sys/devices/system/node")
             if d.startswith("node") and d[4:].isdigit()]
    for n in (cfg.fast_node, cfg.slow_node):
        if n not in nodes:
            raise TiermemError(f"kernel DAMOS: NUMA node {n} does not exist (this machine has "
                               f"node{'s' if len(nodes) != 1 else ''} "
                               f"{', '.join(map(str, nodes)) or 'none'}); tiering needs a fast "
                               "and a slow node")


class KernelDamos(ds.Kdamond):
    """A kdamond whose schemes migrate between the fast and the slow node."""

    def __init__(self, cfg: KernelDamosConfig, force: bool = False):
        cfg.validate()
        check_supported(cfg)
        self.kcfg = cfg
        fast = ds.node_phys_range(cfg.fast_node)
        slow = ds.node_phys_range(cfg.slow_node)
        super().__init__(ds.DamonConfig(ops="paddr", ranges=sorted([fast, slow]),
                                        sample_us=cfg.sample_us, aggr_us=cfg.aggr_us,
                                        update_us=max(cfg.aggr_us, 1_000_000)), force=force)

    def _configure(self) -> None:
        super()._configure()          # context, targets, and scheme 0 = stat
        c = self.kcfg
        ctx = ds._ctx(self.index)
        # writing nr_schemes recreates every scheme directory: set all three up again
        kfs.write(ctx + "/schemes/nr_schemes", 3)
        samples = max(c.aggr_us // c.sample_us, 1)
        hot_min = int(round(samples * c.hot_min_pct / 100))
        cold_max = int(samples * c.cold_max_pct / 100)
        self._scheme(ctx + "/schemes/0", "stat", 0, (1 << 32) - 1, 0, (1 << 32) - 1)
        self._scheme(ctx + "/schemes/1", "migrate_hot", hot_min, (1 << 32) - 1,
                     c.hot_min_age, (1 << 32) - 1, target=c.fast_node)
        self._scheme(ctx + "/schemes/2", "migrate_cold", 0, cold_max, c.cold_min_age,
                     (1 << 32) - 1, target=c.slow_node, wmark=True)

    def _scheme(self, s, action, nr_min, nr_max, age_min, age_max, target=None,
                wmark=False) -> None:
        c = self.kcfg
        try:
            kfs.write(s + "/action", action)
        except TiermemError as e:
            raise TiermemError(f"kernel DAMOS: the kernel rejects action '{action}' "
                               f"({os.uname().release}): {e}") from None
        ap = s + "/access_pattern"
        kfs.write(ap + "/sz/min", 0)
        kfs.write(ap + "/sz/max", (1 << 64) - 1)
        kfs.write(ap + "/nr_accesses/min", nr_min)
        kfs.write(ap + "/nr_accesses/max", nr_max)
        kfs.write(ap + "/age/min", age_min)
        kfs.write(ap + "/age/max", age_max)
        if target is not None:
            kfs.write(s + "/target_nid", target)
            kfs.write(s + "/quotas/bytes", c.quota_mb << 20)
            kfs.write(s + "/quotas/reset_interval_ms", c.quota_ms)
        if wmark:
            w = s + "/watermarks"
            kfs.write(w + "/metric", "free_mem_rate")
            kfs.write(w + "/interval_us", c.aggr_us)
            # free_mem_rate is per thousand; active while low <= free < mid (high: off above)
            hi = int(c.wmark_high_pct * 10)
            kfs.write(w + "/high", min(hi + 50, 1000))
            kfs.write(w + "/mid", hi)
            kfs.write(w + "/low", 0)

    def status(self) -> dict[str, dict[str, int]]:
        """Per migrate scheme: regions and bytes tried and applied so far (kernel stats)."""
        if self.index is None:
            raise TiermemError("kernel DAMOS kdamond not started")
        kfs.write(ds._kd(self.index) + "/state", "update_schemes_stats")
        out = {}
        for i, name in ((1, "migrate_hot"), (2, "migrate_cold")):
            st = f"{ds._ctx(self.index)}/schemes/{i}/stats/"
            out[name] = {k: kfs.read_int(st + k, 0) for k in
                         ("nr_tried", "sz_tried", "nr_applied", "sz_applied", "qt_exceeds")}
        return out

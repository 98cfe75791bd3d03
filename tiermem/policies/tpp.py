"""TPP / NUMA-balancing-style policy: promote on sampled hint faults, demote under a watermark.

What it models (Linux NUMA balancing in memory-tiering mode, plus TPP's demotion):
- The scanner unmaps slow-tier pages every interval; the next access takes a *hint fault*.
  So each interval a slow page that was accessed yields one fault, however many accesses it
  had (the policy reduces the batch to "page touched this interval": it sees no counts).
- A page is promoted when it faulted in ``faults_to_promote`` consecutive intervals (TPP's
  "active LRU" check; 1 = promote on the first fault, like plain NUMA balancing).
- Promotions are rate-limited to ``promote_rate_mb_s`` (the kernel's
  numa_balancing_promote_rate_limit_MBps) and to the migration budget.
- When the fast tier's free pages would fall under ``demote_wmark_pct`` of its capacity,
  the least recently accessed fast pages are demoted (kernel LRU order approximated by the
  time of the last sampled access) to make room.
"""
from __future__ import annotations

import numpy as np

from tiermem.access import AccessBatch
from tiermem.policies.base import (FAST, SLOW, Budget, Capacity, MigrationPlan, Param,
                                   Placement, Policy)
from tiermem.policies.pagetable import PageTable


class TPP(Policy):
    name = "tpp"
    description = "NUMA balancing / TPP: hint-fault promotion with a rate limit, LRU demotion"
    params = {
        "faults_to_promote": Param(int, 2, "consecutive faulting intervals before promotion",
                                   min=1, max=16),
        "promote_rate_mb_s": Param(float, 2048.0, "promotion rate limit, MB/s", min=0.0,
                                   max=1e7),
        "demote_wmark_pct": Param(float, 2.0, "keep this % of the fast tier free", min=0.0,
                                  max=50.0),
    }

    def __init__(self, config=None, where=None, **kw):
        super().__init__(config, where, **kw)
        self.t = PageTable(last=-1.0, streak=0.0, last_fault=-2.0)
        self.interval = 0
        self.duration = 0.0
        self.faults = 0

    def observe(self, batch: AccessBatch) -> None:
        self.interval += 1
        self.duration = batch.duration
        touched = np.unique(batch.pages())
        rows = self.t.upsert(touched)
        c = self.t.cols
        c["last"][rows] = self.interval
        self._touched = touched

    def plan(self, placement: Placement, capacity: Capacity, budget: Budget) -> MigrationPlan:
        c = self.t.cols
        touched = getattr(self, "_touched", np.empty(0, np.uint64))
        self._touched = np.empty(0, np.uint64)
        slow = touched[placement.tier_of(touched) == SLOW]
        rows, _ = self.t.find(slow)
        # one hint fault per touched slow page; a streak counts consecutive faulting intervals
        consecutive = c["last_fault"][rows] == self.interval - 1
        c["streak"][rows] = np.where(consecutive, c["streak"][rows] + 1, 1)
        c["last_fault"][rows] = self.interval
        self.faults += slow.size
        cand = slow[c["streak"][rows] >= self.p["faults_to_promote"]]
        # hottest first is unknown to a fault-driven policy: take them in fault (page) order
        rate_pages = int(self.p["promote_rate_mb_s"] * self.duration * 2**20) // 4096 \
            if self.duration > 0 else budget.pages
        k = min(cand.size, rate_pages, budget.pages)
        free = capacity.fast_pages - placement.count(FAST)
        wm = int(capacity.fast_pages * self.p["demote_wmark_pct"] / 100)
        fast = placement.on(FAST)
        if k > free - wm:   # demotions needed: d = k + wm - free, and k + d <= budget
            k = max(0, min(k, (budget.pages - wm + free) // 2))
        d = max(0, min(k + wm - free, fast.size, budget.pages - k))
        k = min(k, free + d)
        demote = np.empty(0, np.uint64)
        if d > 0:
            last = self.t.get(fast, "last")
            demote = fast[np.argsort(last, kind="stable")[:d]]
        return MigrationPlan(cand[:k], demote)

    def stats(self) -> dict[str, float]:
        return {"hint_faults": float(self.faults)}

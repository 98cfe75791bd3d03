"""DAMON-style policy in user space: adaptive regions, access frequency and age, DAMOS schemes.

Monitoring (as DAMON does, on the batches instead of page-table access bits):
- The known address space is covered by regions (start, end page); gaps larger than
  ``gap_pages`` between known pages are left out, like DAMON vaddr's three big regions.
- Each observed batch is one *aggregation interval* cut into ``samples`` sampling intervals.
  In each, one random page per region is checked for its access bit. From a sampled batch the
  check is emulated statistically: with ``a`` accesses (sum of weights) in a region of ``n``
  pages during a sampling interval, the probed page's bit is set with probability
  ``1 - exp(-a / n)``. ``nr_accesses`` is the number of positive checks (0..samples), so DAMON
  sees "accessed or not", never how often.
  A time-ordered batch (``batch.ordered``: the simulator's sampled trace) is cut into
  consecutive slices, one per sampling interval. An aggregated batch (every live sampler: one
  entry per page, in address order, no time inside the interval) cannot be cut by time, and
  its weights are in the sampler's own unit (DAMON nr_accesses, fault counts, 1 per written
  page): a page with the batch's "full" weight (95th percentile of the per-page weights) is
  taken as accessed in every sampling interval, so a region is found accessed at each check
  with probability ``min(a / (n * full), 1)``, the ``samples`` checks independent draws.
  (Slicing an address-ordered batch by position gives each region its accesses in about one
  slice: nothing ever looked hot, and the policy promoted nothing live.)
- After each aggregation, adjacent regions whose nr_accesses differ by at most
  ``merge_threshold`` are merged (size-weighted), ``age`` counts aggregations a region kept its
  access level, and regions are split in two at random points while there are fewer than
  ``max_regions / 2`` (never below ``min_regions``, never above ``max_regions``).

Schemes (DAMOS, per aggregation):
- ``migrate_hot``: slow pages in regions with nr_accesses >= ``hot_min_pct`` % of samples and
  age >= ``hot_min_age`` are promoted, hottest region first (then older first).
- ``migrate_cold``: fast pages in regions with nr_accesses <= ``cold_max_pct`` % and age >=
  ``cold_min_age`` are demoted when the fast tier's free share is below the high watermark
  ``wmark_high_pct`` (to get back to it), or to make room for hotter pages.
- Quotas: each scheme moves at most ``quota_mb`` per interval, and both share the migration
  budget. Watermarks: ``migrate_cold`` is inactive while the free share is >= wmark_high_pct.

The kernel's own DAMOS migrate_hot/migrate_cold actions are driven by
tiermem.policies.damos_kernel instead (a live-only option).
"""
from __future__ import annotations

import numpy as np

from tiermem.access import AccessBatch
from tiermem.policies.base import (FAST, SLOW, Budget, Capacity, MigrationPlan, Param,
                                   Placement, Policy, exchange)


class Damon(Policy):
    name = "damon"
    description = "DAMON-style adaptive regions with DAMOS migrate_hot/migrate_cold"
    params = {
        "samples": Param(int, 20, "sampling intervals per aggregation (per batch)", min=1,
                         max=1000),
        "min_regions": Param(int, 10, "minimum number of regions", min=1,
                             max=1 << 20),
        "max_regions": Param(int, 1000, "maximum number of regions", min=2,
                             max=1 << 20),
        "merge_threshold": Param(int, 1, "merge neighbours whose nr_accesses differ by <= this",
                                 min=0, max=1000),
        "gap_pages": Param(int, 256, "gaps between known pages larger than this are not "
                                     "monitored", min=1, max=1 << 36),
        "hot_min_pct": Param(float, 50.0, "migrate_hot: min nr_accesses, % of samples",
                             min=0.0, max=100.0),
        "hot_min_age": Param(int, 1, "migrate_hot: min age, aggregations", min=0,
                             max=1 << 20),
        "cold_max_pct": Param(float, 50.0, "migrate_cold: max nr_accesses, % of samples",
                              min=0.0, max=100.0),
        "cold_min_age": Param(int, 1, "migrate_cold: min age, aggregations", min=0,
                              max=1 << 20),
        "quota_mb": Param(float, 1e9, "per-scheme quota per interval, MB (the "
                          "default, 1e9, is no quota)", min=0.0, max=1e9),
        "wmark_high_pct": Param(float, 2.0, "migrate_cold keeps this % of the fast tier free",
                                min=0.0, max=100.0),
        "seed": Param(int, 1, "random seed for sampling and splitting", min=0,
                      max=2**32 - 1),
    }

    @classmethod
    def check_params(cls, p, where):
        from tiermem.errors import TiermemError
        if p["min_regions"] > p["max_regions"]:
            raise TiermemError(f"{where}: min_regions ({p['min_regions']}) must be <= "
                               f"max_regions ({p['max_regions']})")

    def __init__(self, config=None, where=None, **kw):
        super().__init__(config, where, **kw)
        self.rng = np.random.default_rng(self.p["seed"])
        self.start = np.empty(0, np.uint64)   # region [start, end) in pages
        self.end = np.empty(0, np.uint64)
        self.nr = np.empty(0, np.float64)
        self.age = np.empty(0, np.float64)
        self.known = np.empty(0, np.uint64)
        self.aggregations = 0

    # -- regions -------------------------------------------------------------------------
    def _cover(self, pages: np.ndarray) -> None:
        """(Re)build regions over the known pages when new address ranges appear."""
        allp = np.union1d(self.known, pages)
        if allp.size == self.known.size:
            return
        self.known = allp
        cut = np.flatnonzero(np.diff(allp.astype(np.int64)) > self.p["gap_pages"]) + 1
        starts = allp[np.concatenate([[0], cut])]
        ends = allp[np.concatenate([cut - 1, [allp.size - 1]])] + np.uint64(1)
        if self.start.size == 0:
            self.start, self.end = starts, ends
            self.nr = np.zeros(starts.size)
            self.age = np.zeros(starts.size)
            self._split(force=True)
            return
        # keep the existing regions; add regions for ranges not yet covered
        covered = self._region_of(allp) >= 0
        if covered.all():
            return
        newp = allp[~covered]
        cut = np.flatnonzero(np.diff(newp.astype(np.int64)) > 1) + 1
        ns = newp[np.concatenate([[0], cut])]
        ne = newp[np.concatenate([cut - 1, [newp.size - 1]])] + np.uint64(1)
        st = np.concatenate([self.start, ns])
        order = np.argsort(st, kind="stable")
        self.start = st[order]
        self.end = np.concatenate([self.end, ne])[order]
        self.nr = np.concatenate([self.nr, np.zeros(ns.size)])[order]
        self.age = np.concatenate([self.age, np.zeros(ns.size)])[order]

    def _region_of(self, pages: np.ndarray) -> np.ndarray:
        """Region index of each page, -1 if no region covers it."""
        if self.start.size == 0:
            return np.full(np.shape(pages), -1, np.int64)
        r = np.searchsorted(self.start, pages, side="right") - 1
        ok = (r >= 0) & (pages < self.end[np.maximum(r, 0)])
        return np.where(ok, r, -1)

    def _split(self, force: bool = False) -> None:
        n = self.start.size
        if not force and n >= self.p["max_regions"] // 2:
            return
        size = (self.end - self.start).astype(np.int64)
        room = self.p["max_regions"] - n
        can = np.flatnonzero(size >= 2)
        if can.size == 0 or room <= 0:
            return
        can = can[np.argsort(-size[can], kind="stable")[:room]]
        cut = self.start[can] + (1 + (self.rng.random(can.size) * (size[can] - 1))
                                 .astype(np.int64)).astype(np.uint64)
        st = np.concatenate([self.start, cut])
        en = np.concatenate([self.end, self.end[can]])
        en[can] = cut
        order = np.argsort(st, kind="stable")
        self.start, self.end = st[order], en[order]
        self.nr = np.concatenate([self.nr, self.nr[can]])[order]
        self.age = np.concatenate([self.age, self.age[can]])[order]
        if force and self.start.size < self.p["min_regions"]:
            self._split(force=self.start.size > n)

    def _merge(self) -> None:
        n = self.start.size
        if n < 2:
            return
        similar = (np.abs(np.diff(self.nr)) <= self.p["merge_threshold"]) & \
            (self.start[1:] == self.end[:-1])
        # never merge below min_regions
        allowed = max(n - self.p["min_regions"], 0)
        if similar.sum() > allowed:
            idx = np.flatnonzero(similar)[allowed:]
            similar[idx] = False
        group = np.concatenate([[0], np.cumsum(~similar)])
        size = (self.end - self.start).astype(np.float64)
        gsize = np.bincount(group, weights=size)
        first = np.flatnonzero(np.concatenate([[True], ~similar]))
        last = np.concatenate([first[1:] - 1, [n - 1]])
        self.nr = np.bincount(group, weights=self.nr * size) / gsize
        self.age = np.bincount(group, weights=self.age * size) / gsize
        self.start, self.end = self.start[first], self.end[last]

    # -- the interface -------------------------------------------------------------------
    def observe(self, batch: AccessBatch) -> None:
        pages = batch.pages()
        if pages.size == 0 and self.start.size == 0:
            return
        self._cover(np.unique(pages))
        S = self.p["samples"]
        size = (self.end - self.start).astype(np.float64)
        # one access check per region and sampling interval: the probed page is accessed with
        # probability 1 - exp(-accesses in the region in the slice / region size), the chance
        # that a page-table access bit is found set when accesses spread over the region
        r = self._region_of(pages)
        inr = r >= 0
        w = batch.weight[inr].astype(np.float64)
        if batch.ordered:
            slice_of = (np.arange(pages.size) * S) // max(pages.size, 1)
            per = np.bincount(slice_of[inr] * self.start.size + r[inr], weights=w,
                              minlength=S * self.start.size).reshape(S, self.start.size)
            prob = 1.0 - np.exp(-per / size[None, :])
            nr = (self.rng.random(prob.shape) < prob).sum(axis=0).astype(np.float64)
        else:
            a = np.bincount(r[inr], weights=w, minlength=self.start.size)
            nr = self.rng.binomial(S, np.minimum(a / (size * self._full_weight(batch)), 1.0))
            nr = nr.astype(np.float64)
        # age: reset when the access level changed noticeably, else grow
        changed = np.abs(nr - self.nr) > max(self.p["merge_threshold"], 1)
        self.age = np.where(changed, 0, self.age + 1)
        self.nr = nr
        self.aggregations += 1
        self._merge()
        self._split()

    @staticmethod
    def _full_weight(batch: AccessBatch) -> float:
        """The weight of a page accessed in every sampling interval, for an aggregated batch:
        the 95th percentile of the per-page weights (a sampler's weights are in its own unit:
        DAMON's nr_accesses, fault counts, 1 per written page). A region whose pages all have
        that weight is found accessed at every check; half of it, at half the checks."""
        pages, inv = np.unique(batch.pages(), return_inverse=True)
        per_page = np.bincount(inv.ravel(), weights=batch.weight.astype(np.float64),
                               minlength=pages.size)
        per_page = per_page[per_page > 0]
        return float(np.quantile(per_page, 0.95)) if per_page.size else 1.0

    def plan(self, placement: Placement, capacity: Capacity, budget: Budget) -> MigrationPlan:
        if self.start.size == 0 or len(placement) == 0:
            return MigrationPlan()
        S = self.p["samples"]
        r = self._region_of(placement.pages)
        inr = r >= 0
        nr = np.where(inr, self.nr[np.maximum(r, 0)], 0.0)
        age = np.where(inr, self.age[np.maximum(r, 0)], 0.0)
        quota = int(self.p["quota_mb"] * 2**20) // 4096
        slow = placement.tiers == SLOW
        fast = ~slow
        hot = slow & (nr >= self.p["hot_min_pct"] / 100 * S) & (age >= self.p["hot_min_age"])
        cold = fast & (nr <= self.p["cold_max_pct"] / 100 * S) & (age >= self.p["cold_min_age"])
        # priority: frequency first, then age (older hot regions first)
        score = nr + age / (age.max() + 1 if age.size else 1)
        hot_idx = np.flatnonzero(hot)
        hot_idx = hot_idx[np.argsort(-score[hot_idx], kind="stable")[:quota]]
        cold_idx = np.flatnonzero(cold)
        cold_idx = cold_idx[np.argsort(score[cold_idx], kind="stable")[:quota]]
        # watermark: demote cold pages until the free share is back at the high watermark
        free = capacity.fast_pages - placement.count(FAST)
        want_free = int(capacity.fast_pages * self.p["wmark_high_pct"] / 100)
        n_wm = min(max(want_free - free, 0), cold_idx.size, budget.pages)
        demote_wm = placement.pages[cold_idx[:n_wm]]
        left = Budget(budget.pages - n_wm)
        after = placement.apply(MigrationPlan(demote=demote_wm))
        # promotion into free room, swapping out cold fast pages only for hotter ones
        fpages = placement.pages[fast]
        fs = np.full(fpages.size, np.inf)      # fast pages that are not cold stay put
        fs[np.searchsorted(fpages, placement.pages[cold_idx[n_wm:]])] = score[cold_idx[n_wm:]]
        room = Capacity(max(capacity.fast_pages - want_free, 0))
        p = exchange(after, room, left, placement.pages[hot_idx], score[hot_idx], fpages, fs,
                     margin=1.0)
        return MigrationPlan(p.promote, np.concatenate([demote_wm, p.demote]))

    def stats(self) -> dict[str, float]:
        return {"regions": float(self.start.size), "aggregations": float(self.aggregations)}

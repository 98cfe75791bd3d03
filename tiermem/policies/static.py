"""Baseline policies that never migrate: first-touch, interleave, weighted interleave.

They differ only in where a page is first placed (``place_new``); ``plan`` is always empty.
- first-touch: fast tier while it has room, then slow (Linux's default local allocation).
- interleave: pages alternate fast/slow in first-touch order (MPOL_INTERLEAVE), falling back
  to slow when the fast tier is full.
- weighted-interleave: ``fast_weight`` of every ``fast_weight + slow_weight`` pages go to
  the fast tier (MPOL_WEIGHTED_INTERLEAVE, Linux 6.9+), same fallback.
"""
from __future__ import annotations

import numpy as np

from tiermem.access import AccessBatch
from tiermem.policies.base import (FAST, SLOW, Budget, Capacity, MigrationPlan, Param,
                                   Placement, Policy)
from tiermem.errors import TiermemError


class FirstTouch(Policy):
    name = "first-touch"
    description = "no migration; pages stay where first touched (fast while room)"
    params: dict = {}

    def observe(self, batch: AccessBatch) -> None:
        pass

    def plan(self, placement: Placement, capacity: Capacity, budget: Budget) -> MigrationPlan:
        return MigrationPlan()


class WeightedInterleave(FirstTouch):
    name = "weighted-interleave"
    description = "no migration; fast_weight:slow_weight pages interleaved at first touch"
    params = {
        "fast_weight": Param(int, 1, "pages placed on the fast tier per round", min=1, max=255),
        "slow_weight": Param(int, 1, "pages placed on the slow tier per round", min=1, max=255),
    }

    def __init__(self, config=None, where=None, **kw):
        super().__init__(config, where, **kw)
        self._placed = 0   # pages placed so far: the interleave cursor

    def place_new(self, pages: np.ndarray, placement: Placement,
                  capacity: Capacity) -> np.ndarray:
        fw, sw = self.p["fast_weight"], self.p["slow_weight"]
        k = (self._placed + np.arange(len(pages))) % (fw + sw)
        self._placed += len(pages)
        tiers = np.where(k < fw, FAST, SLOW).astype(np.uint8)
        free = max(capacity.fast_pages - placement.count(FAST), 0)
        fast_idx = np.flatnonzero(tiers == FAST)
        tiers[fast_idx[free:]] = SLOW
        return tiers


class Interleave(WeightedInterleave):
    name = "interleave"
    description = "no migration; pages alternate fast/slow at first touch"
    params: dict = {}

    def __init__(self, config=None, where=None, **kw):
        Policy.__init__(self, config, where, **kw)
        self.p.update(fast_weight=1, slow_weight=1)
        self._placed = 0

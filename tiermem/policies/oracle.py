"""Oracle: knows the next epoch's per-page access counts; the upper bound every table shows.

Simulator only (``needs_future``): before each plan the simulator calls ``see_future`` with
the pages the next epoch touches and their counts. The plan puts the next epoch's hottest
pages on the fast tier, greedily swapping out the fast pages that the next epoch uses least,
under the same migration budget and capacity as every other policy.
"""
from __future__ import annotations

import numpy as np

from tiermem.access import AccessBatch
from tiermem.policies.base import Budget, Capacity, MigrationPlan, Placement, Policy, exchange


class Oracle(Policy):
    name = "oracle"
    description = "knows the next epoch's accesses: best placement under the same budget"
    params: dict = {}
    needs_future = True

    def __init__(self, config=None, where=None, **kw):
        super().__init__(config, where, **kw)
        self._pages = None
        self._counts = None

    def observe(self, batch: AccessBatch) -> None:
        pass

    def see_future(self, pages: np.ndarray, counts: np.ndarray) -> None:
        self._pages = np.asarray(pages, np.uint64)
        self._counts = np.asarray(counts, np.float64)

    def plan(self, placement: Placement, capacity: Capacity, budget: Budget) -> MigrationPlan:
        if self._pages is None:
            return MigrationPlan()   # the last epoch: there is no future to act on
        pages, counts = self._pages, self._counts
        self._pages = self._counts = None
        return exchange(placement, capacity, budget, pages, counts, pages, counts, margin=0.0)

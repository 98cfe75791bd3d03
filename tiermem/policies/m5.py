"""M5-style policy: count-min-sketch hot-page tracker, hot-word tracker, adaptive manager.

Roles (after the M5 paper's Monitor / Nominator / Elector / Promoter):

- **Monitor**, hot-page tracker: a count-min sketch (``depth`` rows x ``width`` float32
  counters, one multiply-shift hash per row) estimates every page's access count from the
  batches; a bounded top-K table (``top_k`` pages) keeps the pages with the largest
  estimates. Counters decay by ``decay`` per interval so a moving hot set is followed. Memory is
  bounded: depth*width counters + top_k rows, whatever the footprint.
- **Monitor**, hot-word tracker: for each top-K page a 64-bit bitmap of the 64-byte words seen
  and the number of samples. The number of distinct hot words W is estimated from (samples S,
  distinct words D) by inverting E[D] = W * (1 - (1 - 1/W)**S); density = W / 64. A page
  whose accesses fall on few words (density < ``density_threshold``) is *sparse*: its few hot
  lines are what the CPU caches hold anyway, so moving the whole 4 KiB page is poor value.
  Bitmaps restart after ``word_window`` samples so the estimate follows phase changes.
- **Nominator**: top-K pages on the slow tier whose estimate is at least ``hot_min`` accesses
  per interval and that were sampled in ``min_streak`` intervals in a row (default 1: off;
  2+ keeps pages that are hot for one burst, like a streamed array, out, but at 1-in-64
  sampling it also delays moderately hot pages), scored by benefit = estimate x density (sparse pages: skipped entirely with
  ``sparse="skip"``, scored with their density with ``sparse="weigh"``).
- **Elector**: promotes nominees into free fast memory, and swaps a nominee for the coldest
  fast page (sketch estimate) only if its benefit beats the victim by ``hysteresis`` x.
- **Promoter**: the migration rate (pages per interval) adapts: after each interval it
  measures the benefit of the last promotions (sampled accesses that hit them per promoted
  page) against ``break_even`` accesses per page (the cost of a migration in accesses) and
  grows the rate x1.5 or shrinks it x0.5, between ``rate_min_pages`` and the budget. It also
  keeps migration traffic under ``max_bw_share`` of ``slow_bw_gbs`` over the interval.

Without word addresses (``batch.sub_page`` False, e.g. DAMON or hint-fault samplers) the
hot-word tracker has nothing to measure: every page counts as dense (density 1), so m5 runs
as a count-min top-K policy; ``stats()['word_tracking']`` is then 0.
"""
from __future__ import annotations

import numpy as np

from tiermem.access import AccessBatch
from tiermem.policies.base import (FAST, SLOW, Budget, Capacity, MigrationPlan, Param,
                                   Placement, Policy, exchange)

_U64 = np.uint64
_MASK64 = (1 << 64) - 1


def _popcount64(x: np.ndarray) -> np.ndarray:
    """Bits set in each uint64 (vectorised SWAR)."""
    x = x.astype(_U64)
    x = x - ((x >> _U64(1)) & _U64(0x5555555555555555))
    x = (x & _U64(0x3333333333333333)) + ((x >> _U64(2)) & _U64(0x3333333333333333))
    x = (x + (x >> _U64(4))) & _U64(0x0F0F0F0F0F0F0F0F)
    return ((x * _U64(0x0101010101010101)) >> _U64(56)).astype(np.int64)


def _distinct_table(max_s: int) -> np.ndarray:
    """E[D](W, S) for W = 1..64 (columns) and S = 0..max_s (rows)."""
    W = np.arange(1, 65, dtype=np.float64)
    S = np.arange(max_s + 1, dtype=np.float64)[:, None]
    return W * (1 - (1 - 1 / W) ** S)


class CountMinSketch:
    """depth x width float32 counters; vectorised add / query of uint64 keys."""

    def __init__(self, depth: int, width: int, seed: int):
        rng = np.random.default_rng(seed)
        self.depth, self.width = depth, width
        self.mult = (rng.integers(1, 2**63, depth, dtype=np.uint64) << _U64(1)) | _U64(1)
        self.c = np.zeros((depth, width), np.float32)

    def _cols(self, keys: np.ndarray) -> np.ndarray:
        k = np.asarray(keys, dtype=_U64)
        with np.errstate(over="ignore"):
            h = (k[None, :] ^ (k[None, :] >> _U64(29))) * self.mult[:, None]
        return (h >> _U64(40)) % _U64(self.width)

    def add(self, keys: np.ndarray, weights: np.ndarray) -> None:
        cols = self._cols(keys)
        for r in range(self.depth):
            self.c[r] += np.bincount(cols[r], weights=weights, minlength=self.width) \
                .astype(np.float32)

    def query(self, keys: np.ndarray) -> np.ndarray:
        if np.size(keys) == 0:
            return np.empty(0, np.float64)
        cols = self._cols(keys)
        return self.c[np.arange(self.depth)[:, None], cols].min(axis=0).astype(np.float64)

    def decay(self, f: float) -> None:
        self.c *= np.float32(f)


class M5(Policy):
    name = "m5"
    description = "M5: count-min sketch top-K + hot-word density + adaptive promoter"
    params = {
        "depth": Param(int, 4, "count-min sketch rows", min=1, max=16),
        "width": Param(int, 8192, "count-min sketch counters per row", min=16, max=1 << 24),
        "top_k": Param(int, 8192, "pages tracked by the top-K table", min=1, max=1 << 22),
        "decay": Param(float, 0.5, "counter decay per interval (1 = none)", min=0.0, max=1.0),
        "density_threshold": Param(float, 0.5, "pages with fewer hot words than this share "
                                               "of 64 are sparse", min=0.0, max=1.0),
        "sparse": Param(str, "weigh", "sparse pages: weigh (score x density) or skip",
                        choices=("weigh", "skip")),
        "word_window": Param(int, 192, "samples per page before its word bitmap restarts",
                             min=8, max=4096),
        "min_word_samples": Param(int, 8, "samples needed before a density is trusted",
                                  min=1),
        "hot_min": Param(float, 2.0, "minimum estimated accesses per interval to nominate",
                         min=0.0),
        "min_streak": Param(int, 1, "intervals in a row a page must be seen to be nominated",
                            min=1, max=64),
        "hysteresis": Param(float, 1.25, "a nominee must beat its victim by this factor",
                            min=1.0),
        "rate_init_pct": Param(float, 50.0, "initial rate, % of the budget", min=0.0,
                               max=100.0),
        "rate_min_pages": Param(int, 16, "lowest adaptive rate, pages per interval", min=0),
        "break_even": Param(float, 1.0, "accesses a promoted page must get per interval to "
                                         "pay for its migration", min=0.0),
        "max_bw_share": Param(float, 0.2, "migration may use this share of the slow tier's "
                                          "bandwidth", min=0.0, max=1.0),
        "slow_bw_gbs": Param(float, 25.0, "slow tier bandwidth, GB/s", min=0.001),
        "seed": Param(int, 1, "hash seed", min=0),
    }

    def __init__(self, config=None, where=None, **kw):
        super().__init__(config, where, **kw)
        p = self.p
        self.cms = CountMinSketch(p["depth"], p["width"], p["seed"])
        self.keys = np.empty(0, _U64)              # top-K table, sorted keys
        self.bitmap = np.empty(0, _U64)
        self.nsamp = np.empty(0, np.int64)
        self.density = np.empty(0, np.float64)
        self.streak = np.empty(0, np.int64)        # consecutive intervals seen
        self._table = _distinct_table(p["word_window"])
        self.rate = None
        self.duration = 0.0
        self.word_tracking = False
        self.last_promoted = np.empty(0, _U64)
        self.benefit_hist: list[float] = []
        self.n = {"promoted": 0, "sparse_seen": 0, "nominated": 0}

    # -- Monitor ----------------------------------------------------------------------
    def observe(self, batch: AccessBatch) -> None:
        self.duration = batch.duration
        self.cms.decay(self.p["decay"])
        if len(batch) == 0:
            self._last_hits = 0.0
            return
        pages = batch.pages()
        up, inv = np.unique(pages, return_inverse=True)
        w = np.bincount(inv, weights=batch.weight).astype(np.float64)
        self.cms.add(up, w)
        # benefit of the last promotions: sampled accesses that hit them now
        if self.last_promoted.size:
            hit = np.isin(up, self.last_promoted, assume_unique=True)
            self._last_hits = float(w[hit].sum())
        else:
            self._last_hits = 0.0
        self._update_topk(up)
        seen = np.isin(self.keys, up, assume_unique=True)
        self.streak = np.where(seen, self.streak + 1, 0)
        self.word_tracking = batch.sub_page
        if batch.sub_page:
            self._track_words(pages, batch.words())

    def _update_topk(self, batch_pages: np.ndarray) -> None:
        cand = np.union1d(self.keys, batch_pages)
        est = self.cms.query(cand)
        K = self.p["top_k"]
        if cand.size > K:
            keep = np.sort(np.argpartition(-est, K - 1)[:K])
            cand = cand[keep]
        # carry the word state of pages that stay, fresh state for new ones
        pos = np.searchsorted(self.keys, cand)
        pos_c = np.minimum(pos, max(self.keys.size - 1, 0))
        old = (pos < self.keys.size) & (self.keys[pos_c] == cand) if self.keys.size else \
            np.zeros(cand.size, bool)
        bm = np.zeros(cand.size, _U64)
        ns = np.zeros(cand.size, np.int64)
        de = np.full(cand.size, np.nan)
        st = np.zeros(cand.size, np.int64)
        bm[old], ns[old], de[old] = self.bitmap[pos_c[old]], self.nsamp[pos_c[old]], \
            self.density[pos_c[old]]
        st[old] = self.streak[pos_c[old]]
        self.keys, self.bitmap, self.nsamp, self.density, self.streak = cand, bm, ns, de, st

    def _track_words(self, pages: np.ndarray, words: np.ndarray) -> None:
        pos = np.searchsorted(self.keys, pages)
        pos_c = np.minimum(pos, self.keys.size - 1)
        inside = self.keys[pos_c] == pages
        rows, bits = pos_c[inside], _U64(1) << words[inside].astype(_U64)
        np.bitwise_or.at(self.bitmap, rows, bits)
        self.nsamp += np.bincount(rows, minlength=self.keys.size)
        # estimate the number of hot words where there are enough samples
        ok = self.nsamp >= self.p["min_word_samples"]
        if ok.any():
            S = np.minimum(self.nsamp[ok], self.p["word_window"])
            D = _popcount64(self.bitmap[ok])
            rowsT = self._table[S]                             # E[D] for W = 1..64
            W = (np.abs(rowsT - D[:, None])).argmin(axis=1) + 1
            self.density[ok] = W / 64.0
        full = self.nsamp >= self.p["word_window"]
        self.bitmap[full] = 0
        self.nsamp[full] = 0

    # -- Nominator, Elector, Promoter -------------------------------------------------
    def _adapt_rate(self, budget: Budget) -> int:
        p = self.p
        if self.rate is None:
            self.rate = budget.pages * p["rate_init_pct"] / 100
        elif self.last_promoted.size:
            per_page = self._last_hits / self.last_promoted.size
            self.benefit_hist.append(per_page)
            self.rate *= 1.5 if per_page >= p["break_even"] else 0.5
        self.rate = float(min(max(self.rate, p["rate_min_pages"]), budget.pages))
        limit = budget.pages
        if self.duration > 0:
            bw_pages = p["max_bw_share"] * p["slow_bw_gbs"] * 1e9 * self.duration / 4096
            limit = min(limit, int(bw_pages))
        return int(min(self.rate, limit))

    def plan(self, placement: Placement, capacity: Capacity, budget: Budget) -> MigrationPlan:
        p = self.p
        moves = self._adapt_rate(budget)
        if self.keys.size == 0 or moves == 0:
            self.last_promoted = np.empty(0, _U64)
            return MigrationPlan()
        est = self.cms.query(self.keys)
        dens = np.where(np.isnan(self.density) | (not self.word_tracking), 1.0, self.density)
        sparse = dens < p["density_threshold"]
        self.n["sparse_seen"] = int(sparse.sum())
        tiers = placement.tier_of(self.keys)
        nominee = (tiers == SLOW) & (est >= p["hot_min"]) & (self.streak >= p["min_streak"])
        if p["sparse"] == "skip":
            nominee &= ~sparse
        benefit = est * dens
        self.n["nominated"] += int(nominee.sum())
        fast = placement.on(FAST)
        # victims: fast pages by sketch estimate x known density (unknown density = 1)
        fscore = self.cms.query(fast)
        pos = np.searchsorted(self.keys, fast)
        pos_c = np.minimum(pos, self.keys.size - 1)
        intop = self.keys[pos_c] == fast
        fscore[intop] *= dens[pos_c[intop]]
        plan = exchange(placement, capacity, Budget(moves), self.keys[nominee],
                        benefit[nominee], fast, fscore * p["hysteresis"], margin=0.0)
        self.last_promoted = plan.promote
        self.n["promoted"] += int(plan.promote.size)
        return plan

    def stats(self) -> dict[str, float]:
        return {"tracked_pages": float(self.keys.size), "sparse_pages": self.n["sparse_seen"],
                "promoted": self.n["promoted"], "rate_pages": float(self.rate or 0),
                "word_tracking": float(self.word_tracking)}

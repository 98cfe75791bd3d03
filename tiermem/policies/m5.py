"""M5-style policy: count-min-sketch hot-page tracker, hot-word tracker, adaptive manager.

Roles (after the M5 paper's Monitor / Nominator / Elector / Promoter):

- **Monitor**, hot-page tracker: a count-min sketch (``depth`` rows x ``width`` float32
  counters, one multiply-shift hash per row) estimates every page's access count from the
  batches; a bounded top-K table (``top_k`` pages) keeps the pages with the largest
  estimates. Counters decay per interval so a moving hot set is followed: by ``decay``, raised
  (up to ``decay_max``) so that the counters' memory of 1 / (1 - decay) intervals holds
  ``window_samples`` samples per fast-tier page when sampling is sparse. Memory is
  bounded: depth*width counters + top_k rows, whatever the footprint.
- **Monitor**, hot-word tracker: for each top-K page a 64-bit bitmap of the 64-byte words seen
  and the number of samples. The number of distinct hot words W is estimated from (samples S,
  distinct words D) by inverting E[D] = W * (1 - (1 - 1/W)**S) (a precomputed S x D -> W
  table); density = W / 64. A page whose accesses fall on few words (density <
  ``density_threshold``) is *sparse*: its few hot lines are what the CPU caches hold anyway,
  so moving the whole 4 KiB page is poor value. Bitmaps restart after ``word_window`` samples
  so the estimate follows phase changes.
- **Monitor**, stream detector (ours, not in the paper): within a batch (samples in program
  order), a run of at least ``stream_run`` pages that are consecutive in address, each with
  >= 2 samples, where each page's samples all come after the previous page's (a sequential
  sweep, like PageRank's edge array) is a *stream*. A streamed page's accesses are one burst:
  promoting it after the burst is pure cost. So a page seen in a stream and not seen in the
  interval before (a sweep repeated every interval is not a burst) is not nominated, and on
  the fast tier it is the first victim. With ``stream_ahead`` > 0 the detector also acts as
  a stride prefetcher: the next ``stream_ahead`` x (run length) pages after the run's head
  are promoted ahead, scored with the run's median estimate, so the sweep finds them on the
  fast tier. Only time-ordered batches (``batch.ordered``: the simulator, trace replay) are
  searched: a live sampler's batch is aggregated (address or hash-map order, no time).
- **Nominator**: top-K pages on the slow tier whose estimate is at least ``hot_min`` accesses
  per interval and that were sampled in ``min_streak`` intervals in a row (default 1: off;
  2+ keeps pages that are hot for one burst out, but at 1-in-64 sampling it also delays
  moderately hot pages), scored by benefit = estimate x density (sparse pages: skipped
  entirely with ``sparse="skip"``, scored with their density with ``sparse="weigh"``).
- **Elector**: promotes nominees into free fast memory, and swaps a nominee for the coldest
  fast page only if its benefit beats the victim by ``hysteresis`` x. Victims are ranked by
  the tracker: a fast page outside the top-K table is colder than every tracked page (that
  is what the table means), so it goes first (the coldest of a bounded sample of them by
  sketch estimate), then streamed pages, then tracked fast pages by estimate x density.
- **Promoter**: the migration rate (pages per interval) adapts: after each interval it
  measures the benefit of the last promotions (sampled accesses that hit them per promoted
  page) against ``break_even`` accesses per page (the cost of a migration in accesses) and
  grows the rate by benefit / break_even (at least x1.5, at most ``rate_max_growth``) or
  shrinks it x0.5, between ``rate_min_pages`` and the budget. It also
  keeps migration traffic under ``max_bw_share`` of ``slow_bw_gbs`` over the interval.

Cost per interval is O(samples + top_k) numpy work: one bincount per sketch update, sketch
queries only for the table's candidates (estimates are cached for ``plan``), densities
recomputed only for pages sampled in the interval, and no per-fast-page work unless victims
are needed.

Without word addresses (``batch.sub_page`` False, e.g. DAMON or hint-fault samplers) the
hot-word tracker has nothing to measure: every page counts as dense (density 1), so m5 runs
as a count-min top-K policy; ``stats()['word_tracking']`` is then 0.
"""
from __future__ import annotations

import numpy as np

from tiermem.access import AccessBatch
from tiermem.policies.base import (FAST, SLOW, Budget, Capacity, MigrationPlan, Param,
                                   Placement, Policy)

_U64 = np.uint64
_VICTIM_SAMPLE = 4        # untracked fast pages examined per victim needed


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


def _inverse_table(max_s: int) -> np.ndarray:
    """W_hat[S, D]: the W in 1..64 whose E[D](W, S) is nearest to D, for S <= max_s, D <= 64."""
    t = _distinct_table(max_s)                                     # (S, W)
    D = np.arange(65, dtype=np.float64)
    return (np.abs(t[:, None, :] - D[None, :, None]).argmin(axis=2) + 1).astype(np.int64)


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) indices (end exclusive) of the runs of True in a 1-D bool array."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return np.flatnonzero(d == 1), np.flatnonzero(d == -1)


def detect_streams(pages: np.ndarray, min_run: int):
    """Sequential sweeps in a batch whose samples are in program order.

    Returns (up, stream, heads, lengths): the sorted unique pages, a bool mask over them of
    pages inside a stream, and per stream its head (highest, last swept page) and its length
    in pages. A stream is >= ``min_run`` address-consecutive pages, each sampled >= 2 times,
    each page's samples all after the previous page's."""
    up, first, inv = np.unique(pages, return_index=True, return_inverse=True)
    empty = np.empty(0, _U64)
    stream = np.zeros(up.size, bool)
    if min_run < 2 or up.size < min_run or pages.size < 2 or \
            bool((pages[1:] >= pages[:-1]).all()):       # address-sorted: no time order
        return up, stream, empty, np.empty(0, np.int64)
    n = pages.size
    last = n - 1 - np.unique(pages[::-1], return_index=True)[1]
    cnt = np.bincount(inv, minlength=up.size)
    ok = cnt >= 2
    link = (up[1:] == up[:-1] + _U64(1)) & ok[1:] & ok[:-1] & (first[1:] > last[:-1])
    s, e = _runs(link)                    # link run [s, e) joins pages s .. e
    long = (e - s + 1) >= min_run
    s, e = s[long], e[long]
    if s.size == 0:
        return up, stream, empty, np.empty(0, np.int64)
    mark = np.zeros(up.size + 1, np.int64)
    np.add.at(mark, s, 1)
    np.add.at(mark, e + 1, -1)
    stream = np.cumsum(mark[:-1]) > 0
    return up, stream, up[e], (e - s + 1).astype(np.int64)


class CountMinSketch:
    """depth x width float32 counters; vectorised add / query of uint64 keys.

    One multiply-shift hash per row; the column is the high 32 bits of the hash scaled to
    the width (multiply-high, no modulo). ``add`` is one bincount over the flattened
    (row, column) indices of every key; ``decay`` is lazy (a global scale factor)."""

    def __init__(self, depth: int, width: int, seed: int):
        rng = np.random.default_rng(seed)
        self.depth, self.width = depth, width
        self.mult = (rng.integers(1, 2**63, depth, dtype=np.uint64) << _U64(1)) | _U64(1)
        self._flat = np.zeros(depth * width, np.float32)
        self._row0 = (np.arange(depth, dtype=np.int64) * width)[:, None]
        self.scale = 1.0          # true counter = stored counter x scale (lazy decay)

    def _idx(self, keys: np.ndarray) -> np.ndarray:
        """Flat counter index of each key in each row, shape (depth, n)."""
        k = np.asarray(keys, dtype=_U64)
        with np.errstate(over="ignore"):
            h = (k ^ (k >> _U64(29)))[None, :] * self.mult[:, None]
            col = ((h >> _U64(32)) * _U64(self.width)) >> _U64(32)
        return col.astype(np.int64) + self._row0

    def add(self, keys: np.ndarray, weights: np.ndarray) -> None:
        if np.size(keys) == 0:
            return
        idx = self._idx(keys)
        w = np.broadcast_to(np.asarray(weights, np.float64) / self.scale, idx.shape)
        self._flat += np.bincount(idx.ravel(), weights=w.ravel(),
                                  minlength=self._flat.size).astype(np.float32)

    def query(self, keys: np.ndarray) -> np.ndarray:
        if np.size(keys) == 0:
            return np.empty(0, np.float64)
        return self._flat[self._idx(keys)].min(axis=0).astype(np.float64) * self.scale

    @property
    def c(self) -> np.ndarray:
        """The true counters, depth x width (a copy)."""
        return (self._flat * np.float32(self.scale)).reshape(self.depth, self.width)

    def decay(self, f: float) -> None:
        """Multiply every counter by f. Lazy: only the scale changes, and the stored counters
        are rescaled when it gets small (decaying float32 counters in place would drive them
        into subnormal numbers, which are ~100x slower to compute with)."""
        if f == 0.0:
            self._flat[:] = 0.0
            self.scale = 1.0
        elif f != 1.0:
            self.scale *= f
            if self.scale < 1e-12:
                self._flat *= np.float32(self.scale)
                self._flat[self._flat < 1e-20] = 0.0
                self.scale = 1.0


class M5(Policy):
    name = "m5"
    description = "M5: count-min sketch top-K + hot-word density + adaptive promoter"
    params = {
        "depth": Param(int, 4, "count-min sketch rows", min=1, max=16),
        "width": Param(int, 8192, "count-min sketch counters per row", min=16, max=1 << 24),
        "top_k": Param(int, 8192, "pages tracked by the top-K table", min=1, max=1 << 22),
        "decay": Param(float, 0.5, "counter decay per interval (1 = none); the fastest "
                                   "forgetting, raised by window_samples", min=0.0, max=1.0),
        "window_samples": Param(float, 4.0, "samples per fast-tier page the counters' "
                                            "memory should hold: decay is raised to "
                                            "1 - (samples per interval / fast pages) / this "
                                            "(0 = fixed decay)", min=0.0, max=1e6),
        "decay_max": Param(float, 0.9, "highest decay window_samples may set", min=0.0,
                           max=1.0),
        "density_threshold": Param(float, 0.5, "pages with fewer hot words than this share "
                                               "of 64 are sparse", min=0.0, max=1.0),
        "sparse": Param(str, "weigh", "sparse pages: weigh (score x density) or skip",
                        choices=("weigh", "skip")),
        "word_window": Param(int, 192, "samples per page before its word bitmap restarts",
                             min=8, max=4096),
        "min_word_samples": Param(int, 8, "samples needed before a density is trusted",
                                  min=1, max=1 << 16),
        "hot_min": Param(float, 2.0, "minimum estimated accesses per interval to nominate",
                         min=0.0, max=1e9),
        "min_streak": Param(int, 1, "intervals in a row a page must be seen to be nominated",
                            min=1, max=64),
        "hysteresis": Param(float, 1.25, "a nominee must beat its victim by this factor",
                            min=1.0, max=1e6),
        "stream_run": Param(int, 4, "address-consecutive pages swept in order that make a "
                                    "stream (0 = no stream detection)", min=0, max=1 << 16),
        "stream_ahead": Param(float, 1.0, "promote this many run lengths of pages ahead of "
                                          "a detected stream (0 = off)", min=0.0, max=16.0),
        "rate_init_pct": Param(float, 50.0, "initial rate, % of the budget", min=0.0,
                               max=100.0),
        "rate_max_growth": Param(float, 16.0, "largest rate growth per interval (the rate "
                                             "grows by the promotions' benefit / break_even, "
                                             "at least x1.5)", min=1.5, max=64.0),
        "rate_min_pages": Param(int, 16, "lowest adaptive rate, pages per interval", min=0,
                                max=1 << 30),
        "break_even": Param(float, 1.0, "accesses a promoted page must get per interval to "
                                         "pay for its migration", min=0.0, max=1e9),
        "max_bw_share": Param(float, 0.2, "migration may use this share of the slow tier's "
                                          "bandwidth", min=0.0, max=1.0),
        "slow_bw_gbs": Param(float, 25.0, "slow tier bandwidth, GB/s", min=0.001,
                             max=1e4),
        "seed": Param(int, 1, "hash seed", min=0, max=2**32 - 1),
    }

    def __init__(self, config=None, where=None, **kw):
        super().__init__(config, where, **kw)
        p = self.p
        self.cms = CountMinSketch(p["depth"], p["width"], p["seed"])
        self._rng = np.random.default_rng(p["seed"])
        # the top-K table: sorted keys and aligned per-page state
        self.keys = np.empty(0, _U64)
        self.est = np.empty(0, np.float64)         # sketch estimate, current after observe
        self.bitmap = np.empty(0, _U64)
        self.nsamp = np.empty(0, np.int64)
        self.density = np.empty(0, np.float64)
        self.streak = np.empty(0, np.int64)        # consecutive intervals seen
        self.burst = np.zeros(0, bool)             # last seen in a stream, not the interval before
        self._inv = _inverse_table(p["word_window"])
        self.rate = None
        self._fast_pages = 0                       # fast-tier capacity seen by the last plan
        self.decay_now = self.p["decay"]
        self.duration = 0.0
        self.word_tracking = False
        self.last_promoted = np.empty(0, _U64)
        self._last_hits = 0.0
        self._ahead = np.empty(0, _U64)            # stride-predicted pages for the next plan
        self._ahead_score = np.empty(0, np.float64)
        self.benefit_hist: list[float] = []
        self.n = {"promoted": 0, "sparse_seen": 0, "nominated": 0, "streamed": 0,
                  "prefetched": 0}

    # -- Monitor ----------------------------------------------------------------------
    def observe(self, batch: AccessBatch) -> None:
        p = self.p
        self.duration = batch.duration
        d = self._decay(len(batch))
        self.cms.decay(d)
        self.est *= d                              # every counter scaled: so is every min
        self._ahead = np.empty(0, _U64)
        self._ahead_score = np.empty(0, np.float64)
        if len(batch) == 0:
            self._last_hits = 0.0
            self.streak[:] = 0
            return
        pages = batch.pages()
        # streams need program order: an aggregated (live) batch has none
        up, in_stream, heads, lengths = detect_streams(
            pages, p["stream_run"] if batch.ordered else 0)
        inv = np.searchsorted(up, pages)
        w = np.bincount(inv, weights=batch.weight, minlength=up.size)
        self.cms.add(up, w)
        # benefit of the last promotions: sampled accesses that hit them now
        if self.last_promoted.size:
            hit = np.isin(up, self.last_promoted, assume_unique=True)
            self._last_hits = float(w[hit].sum())
        else:
            self._last_hits = 0.0
        self._update_topk(up, in_stream)
        self.n["streamed"] += int(in_stream.sum())
        self.word_tracking = batch.sub_page
        if batch.sub_page:
            self._track_words(pages, batch.words())
        if heads.size and p["stream_ahead"] > 0:
            self._predict(up, in_stream, heads, lengths)

    def _decay(self, n_samples: int) -> float:
        """This interval's decay: ``decay``, raised so that the counters' memory (1 / (1 -
        decay) intervals) holds ``window_samples`` samples per fast-tier page, at most
        ``decay_max``. At sparse sampling a hot page is sampled less than once an interval,
        and a short memory ranks it below a warm page that happened to be sampled now. The
        fast tier's size is the one seen by the last plan (none yet: ``decay``)."""
        p = self.p
        if p["window_samples"] <= 0 or not self._fast_pages or n_samples == 0:
            return p["decay"]
        per_page = n_samples / self._fast_pages
        self.decay_now = float(min(max(p["decay"], 1.0 - per_page / p["window_samples"]),
                                   max(p["decay_max"], p["decay"])))
        return self.decay_now

    def _update_topk(self, up: np.ndarray, in_stream: np.ndarray) -> None:
        keys = self.keys
        pos = np.searchsorted(keys, up)
        known = pos < keys.size
        known[known] = keys[pos[known]] == up[known]
        new = up[~known]
        prev_streak = np.zeros(up.size, np.int64)
        prev_streak[known] = self.streak[pos[known]]
        if new.size:   # merge the new keys into the sorted table (no full sort)
            n_all = keys.size + new.size
            at_new = np.searchsorted(keys, new) + np.arange(new.size)
            at_old = np.ones(n_all, bool)
            at_old[at_new] = False

            def grow(a, fill):
                out = np.full(n_all, fill, dtype=a.dtype)
                out[at_old] = a
                return out
            keys = grow(keys, 0)
            keys[at_new] = new
            self.bitmap, self.nsamp = grow(self.bitmap, 0), grow(self.nsamp, 0)
            self.density, self.streak = grow(self.density, np.nan), grow(self.streak, 0)
            self.burst = grow(self.burst, False)
        self.keys = keys
        # rows of the batch's pages; seen pages extend their streak, the others restart
        rows = np.searchsorted(keys, up)
        seen = np.zeros(keys.size, bool)
        seen[rows] = True
        self.streak = np.where(seen, self.streak + 1, 0)
        self.streak[rows] = prev_streak + 1
        # a streamed page is a burst unless it was also seen the interval before
        self.burst[rows] = in_stream & (prev_streak == 0)
        self.est = self.cms.query(keys)
        K = self.p["top_k"]
        if keys.size > K:
            keep = np.sort(np.argpartition(-self.est, K - 1)[:K])
            for a in ("keys", "est", "bitmap", "nsamp", "density", "streak", "burst"):
                setattr(self, a, getattr(self, a)[keep])

    def _track_words(self, pages: np.ndarray, words: np.ndarray) -> None:
        pos = np.searchsorted(self.keys, pages)
        pos_c = np.minimum(pos, self.keys.size - 1)
        inside = self.keys[pos_c] == pages
        rows, bits = pos_c[inside], _U64(1) << words[inside].astype(_U64)
        if rows.size == 0:
            return
        np.bitwise_or.at(self.bitmap, rows, bits)
        touched, cnt = np.unique(rows, return_counts=True)
        self.nsamp[touched] += cnt
        # re-estimate the number of hot words of the pages sampled now, where trusted
        t = touched[self.nsamp[touched] >= self.p["min_word_samples"]]
        if t.size:
            S = np.minimum(self.nsamp[t], self.p["word_window"])
            self.density[t] = self._inv[S, _popcount64(self.bitmap[t])] / 64.0
        full = touched[self.nsamp[touched] >= self.p["word_window"]]
        self.bitmap[full] = 0
        self.nsamp[full] = 0

    def _predict(self, up, in_stream, heads, lengths) -> None:
        """Stride prediction: the pages just past each stream's head, scored with the median
        estimate of the stream's pages (what the sweep will give each of them)."""
        ahead = np.maximum(np.ceil(lengths * self.p["stream_ahead"]).astype(np.int64), 1)
        total = int(ahead.sum())
        which = np.repeat(np.arange(heads.size), ahead)
        step = np.arange(total) - np.repeat(np.cumsum(ahead) - ahead, ahead) + 1
        cand = heads[which] + step.astype(_U64)
        # per stream the median estimate of its pages (the stream's pages are contiguous in up)
        rows = np.searchsorted(self.keys, up[in_stream])
        rows_c = np.minimum(rows, self.keys.size - 1)
        e = np.where(self.keys[rows_c] == up[in_stream], self.est[rows_c], 0.0)
        s_end = np.searchsorted(up[in_stream], heads, side="right")
        s_start = s_end - lengths
        med = np.array([np.median(e[a:b]) for a, b in zip(s_start, s_end)])  # per stream
        score = med[which]
        cand, first = np.unique(cand, return_index=True)
        self._ahead, self._ahead_score = cand, score[first]

    # -- Nominator, Elector, Promoter -------------------------------------------------
    def _adapt_rate(self, budget: Budget) -> int:
        p = self.p
        if self.rate is None:
            self.rate = budget.pages * p["rate_init_pct"] / 100
        elif self.last_promoted.size:
            per_page = self._last_hits / self.last_promoted.size
            self.benefit_hist.append(per_page)
            # grow with the return on the last migrations (x1.5 .. x rate_max_growth), so
            # a hot set that moved is followed within a few intervals even from a low rate
            self.rate *= float(np.clip(per_page / max(p["break_even"], 1e-9), 1.5,
                                       p["rate_max_growth"])) \
                if per_page >= p["break_even"] else 0.5
        self.rate = float(min(max(self.rate, p["rate_min_pages"]), budget.pages))
        limit = budget.pages
        if self.duration > 0:
            bw_pages = p["max_bw_share"] * p["slow_bw_gbs"] * 1e9 * self.duration / 4096
            limit = min(limit, int(bw_pages))
        return int(min(self.rate, limit))

    def _victims(self, placement: Placement, need: int, tracked_fast_pos: np.ndarray,
                 tab_fast: np.ndarray, tab_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``need`` fast pages, coldest first, with their scores. Untracked fast pages
        (outside the top-K table: colder than every tracked page) are ranked by the sketch
        on a bounded random sample of them; tracked ones by their score."""
        untracked_mask = placement.tiers == FAST
        untracked_mask[tracked_fast_pos] = False
        n_u = int(np.count_nonzero(untracked_mask))
        u_rows = np.flatnonzero(untracked_mask)
        if n_u > _VICTIM_SAMPLE * need:
            u_rows = np.sort(u_rows[self._rng.choice(n_u, _VICTIM_SAMPLE * need,
                                                     replace=False)])
        untracked = placement.pages[u_rows]
        u_score = self.cms.query(untracked)
        order = np.argsort(u_score, kind="stable")[:need]
        t_order = np.argsort(tab_score, kind="stable")[:need]
        v = np.concatenate([untracked[order], tab_fast[t_order]])
        sc = np.concatenate([u_score[order], tab_score[t_order]])
        o = np.argsort(sc, kind="stable")[:need]
        return v[o], sc[o]

    def plan(self, placement: Placement, capacity: Capacity, budget: Budget) -> MigrationPlan:
        p = self.p
        self._fast_pages = capacity.fast_pages
        moves = self._adapt_rate(budget)
        if (self.keys.size == 0 and self._ahead.size == 0) or moves == 0:
            self.last_promoted = np.empty(0, _U64)
            return MigrationPlan()
        est = self.est
        dens = np.where(np.isnan(self.density) | (not self.word_tracking), 1.0, self.density)
        sparse = dens < p["density_threshold"]
        self.n["sparse_seen"] = int(sparse.sum())
        pos, known = placement.index(self.keys)     # one lookup of the table in the placement
        tiers = np.full(self.keys.size, 255, np.uint8)
        tiers[known] = placement.tiers[pos[known]]
        nominee = (tiers == SLOW) & (est >= p["hot_min"]) & (self.streak >= p["min_streak"]) \
            & (self.streak > 0) & ~self.burst
        if p["sparse"] == "skip":
            nominee &= ~sparse
        benefit = est * dens
        self.n["nominated"] += int(nominee.sum())
        want, score = self.keys[nominee], benefit[nominee]
        if self._ahead.size:       # stride-predicted pages of detected streams
            a_ok = (placement.tier_of(self._ahead) == SLOW) & ~np.isin(self._ahead, want)
            want = np.concatenate([want, self._ahead[a_ok]])
            score = np.concatenate([score, self._ahead_score[a_ok]])
        order = np.argsort(-score, kind="stable")
        want, score = want[order], score[order]
        # promotions into free fast memory first
        n_fast = placement.count(FAST)
        free = max(capacity.fast_pages - n_fast, 0)
        n_free = min(free, want.size, moves)
        promote, demote = [want[:n_free]], []
        rest, rest_score = want[n_free:], score[n_free:]
        k = min((moves - n_free) // 2, rest.size, n_fast)
        if k > 0:
            on_fast = tiers == FAST
            tab_score = np.where(self.burst, 0.0, benefit)[on_fast]
            victims, v_score = self._victims(placement, k, pos[on_fast], self.keys[on_fast],
                                             tab_score)
            k = min(k, victims.size)
            good = rest_score[:k] > p["hysteresis"] * v_score[:k]
            nk = k if good.all() else int(np.argmin(good))   # gains decrease: a prefix
            promote.append(rest[:nk])
            demote.append(victims[:nk])
        plan = MigrationPlan(np.concatenate(promote),
                             np.concatenate(demote) if demote else np.empty(0, _U64))
        if self._ahead.size:
            self.n["prefetched"] += int(np.isin(plan.promote, self._ahead).sum())
        self.last_promoted = plan.promote
        self.n["promoted"] += int(plan.promote.size)
        return plan

    def stats(self) -> dict[str, float]:
        return {"tracked_pages": float(self.keys.size), "sparse_pages": self.n["sparse_seen"],
                "promoted": self.n["promoted"], "rate_pages": float(self.rate or 0),
                "word_tracking": float(self.word_tracking),
                "streamed_pages": float(self.n["streamed"]),
                "prefetched": float(self.n["prefetched"]),
                "decay": float(self.decay_now)}

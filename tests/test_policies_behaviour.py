"""Each policy on small hand-made traces where the right answer is known, run in the simulator."""
import numpy as np
import pytest

from tiermem.sim import TierModel, simulate
from tiermem.trace import Trace
from tiermem.access import AccessBatch
from tiermem.policies import make_policy
from tiermem.policies.base import FAST, SLOW, Budget, Capacity, Placement

BASE = 0x7F000000


def make_trace(page_seq, word_seq) -> Trace:
    """A single-process trace over pages BASE + page_seq, with an init pass in address order."""
    page_seq = np.asarray(page_seq)
    n_pages = int(page_seq.max()) + 1
    idx = np.concatenate([np.arange(n_pages), page_seq]).astype(np.uint32)
    words = np.concatenate([np.zeros(n_pages), word_seq]).astype(np.uint8)
    return Trace(np.zeros(n_pages, np.int32), BASE + np.arange(n_pages, dtype=np.uint64), idx,
                 words, meta={"space": "vaddr", "sub_page": True}).validated()


def static_hot_trace(n_pages=1024, hot=range(512, 640), accesses=1_200_000, seed=3):
    """90% of accesses on a contiguous hot set in the upper half; the rest uniform."""
    rng = np.random.default_rng(seed)
    hot = np.asarray(hot)
    is_hot = rng.random(accesses) < 0.9
    pages = np.where(is_hot, hot[rng.integers(0, hot.size, accesses)],
                     rng.integers(0, n_pages, accesses))
    return make_trace(pages, rng.integers(0, 64, accesses)), BASE + hot.astype(np.uint64)


@pytest.mark.parametrize("policy", ["m5", "damon", "tpp", "oracle"])
def test_static_hot_set_ends_on_fast_tier(policy):
    tr, hot = static_hot_trace()
    # fast tier: 256 pages; first touch fills it with pages 0..255, none of them hot
    model = TierModel(fast_mb=1.0, budget_mb=0.5, epoch_accesses=50_000, sample_every=16)
    res = simulate(tr, make_policy(policy), model)
    first = res.epochs["fast_accesses"][0] / res.epochs["mem_accesses"][0]
    assert first < 0.35                       # the hot set started on the slow tier
    on_fast = res.final.tier_of(hot) == FAST
    assert on_fast.mean() >= 0.95, f"{policy}: only {on_fast.mean():.2f} of the hot set on fast"
    assert res.epochs["fast_accesses"][-1] / res.epochs["mem_accesses"][-1] > 0.85


def test_first_touch_never_migrates_and_keeps_first_pages():
    tr, hot = static_hot_trace()
    res = simulate(tr, make_policy("first-touch"), TierModel(fast_mb=1.0, epoch_accesses=50_000))
    assert res.promotions == res.demotions == 0
    assert (res.final.on(FAST) == BASE + np.arange(256, dtype=np.uint64)).all()


def sparse_dense_trace(n_dense=64, n_sparse=64, n_cold=384, accesses=1_000_000, seed=5):
    """Dense hot pages use all 64 words, sparse hot pages only 4 words; both get the SAME number
    of accesses per page, so only word density tells them apart."""
    rng = np.random.default_rng(seed)
    n = n_dense + n_sparse + n_cold
    perm = rng.permutation(n)
    dense, sparse = perm[:n_dense], perm[n_dense:n_dense + n_sparse]
    hot = rng.random(accesses) < 0.9
    which = rng.integers(0, n_dense + n_sparse, accesses)
    is_dense = which < n_dense
    hp = np.where(is_dense, dense[np.minimum(which, n_dense - 1)],
                  sparse[np.maximum(which - n_dense, 0)])
    hw = np.where(is_dense, rng.integers(0, 64, accesses), rng.integers(0, 4, accesses) * 16)
    pages = np.where(hot, hp, rng.integers(0, n, accesses))
    words = np.where(hot, hw, rng.integers(0, 64, accesses))
    return make_trace(pages, words), BASE + dense.astype(np.uint64), \
        BASE + sparse.astype(np.uint64)


def test_m5_promotes_dense_not_sparse_pages():
    tr, dense, sparse = sparse_dense_trace()
    # fast tier holds exactly the dense hot pages (64 pages = 0.25 MB)
    model = TierModel(fast_mb=0.25, budget_mb=0.25, epoch_accesses=50_000, sample_every=8)
    pol = make_policy("m5")
    res = simulate(tr, pol, model)
    assert (res.final.tier_of(dense) == FAST).mean() >= 0.9
    assert (res.final.tier_of(sparse) == FAST).sum() <= 2
    assert pol.stats()["word_tracking"] == 1.0
    assert pol.stats()["sparse_pages"] >= 0.9 * sparse.size


def test_m5_skip_mode_never_promotes_sparse_pages():
    tr, dense, sparse = sparse_dense_trace()
    model = TierModel(fast_mb=1.0, budget_mb=0.25, epoch_accesses=50_000, sample_every=8)
    pol = make_policy("m5", {"sparse": "skip"})
    res = simulate(tr, pol, model)
    promoted_ever = res.final.tier_of(sparse) == FAST
    # room for everything, yet no sparse page is promoted (some may sit there from first touch)
    first_touch_fast = sparse < BASE + 256
    assert not (promoted_ever & ~first_touch_fast).any()
    assert (res.final.tier_of(dense) == FAST).all()


def test_m5_without_word_addresses_degrades_to_page_counts():
    pol = make_policy("m5")
    b = AccessBatch.from_pages(np.arange(100, 200), weight=5.0, t_end=0.01)
    pol.observe(b)
    assert pol.stats()["word_tracking"] == 0.0
    pl = Placement(np.arange(100, 200), np.full(100, SLOW))
    plan = pol.plan(pl, Capacity(50), Budget(40))
    assert plan.promote.size > 0 and plan.pages <= 40


def test_tpp_rate_limit_and_two_fault_rule():
    pol = make_policy("tpp", {"promote_rate_mb_s": 4.0})     # 4 MB/s * 0.1 s = 102 pages
    pages = np.arange(1000, 1500)
    pl = Placement(pages, np.full(pages.size, SLOW))
    b = AccessBatch.from_pages(pages, t_start=0.0, t_end=0.1)
    pol.observe(b)
    assert pol.plan(pl, Capacity(1000), Budget(10_000)).pages == 0   # one fault is not enough
    pol.observe(AccessBatch.from_pages(pages, t_start=0.1, t_end=0.2))
    plan = pol.plan(pl, Capacity(1000), Budget(10_000))
    assert plan.promote.size == 102 and plan.demote.size == 0


def test_tpp_demotes_least_recently_used_under_watermark():
    pol = make_policy("tpp", {"demote_wmark_pct": 10.0})
    fast = np.arange(0, 100)
    pl = Placement(fast, np.full(100, FAST))
    pol.observe(AccessBatch.from_pages(fast[50:], t_end=0.1))          # 50..99 recently used
    plan = pol.plan(pl, Capacity(100), Budget(50))
    assert plan.demote.size == 10
    assert (plan.demote < 50).all()


def test_oracle_is_an_upper_bound_on_fast_ratio():
    tr, _ = static_hot_trace(accesses=600_000)
    model = TierModel(fast_mb=1.0, budget_mb=0.5, epoch_accesses=50_000)
    ratios = {p: simulate(tr, make_policy(p), model).fast_ratio
              for p in ("oracle", "m5", "damon", "tpp", "first-touch", "interleave")}
    assert ratios["oracle"] >= max(ratios.values()) - 1e-9


def test_damon_regions_adapt_and_stay_bounded():
    tr, _ = static_hot_trace(accesses=400_000)
    pol = make_policy("damon", {"max_regions": 50, "min_regions": 5})
    simulate(tr, pol, TierModel(fast_mb=1.0, epoch_accesses=50_000))
    st = pol.stats()
    assert 5 <= st["regions"] <= 50 and st["aggregations"] > 5
    # the hot range [512, 640) is told apart: regions inside it have more accesses
    mid = (pol.start + pol.end) / 2 - BASE
    inside = (mid >= 512) & (mid < 640)
    assert inside.any() and pol.nr[inside].mean() > 2 * pol.nr[~inside].mean()


def _live_batches(n, hot_w, cold_w, cold_frac, seed=0):
    """What a live sampler gives: aggregated per page, in address order (ordered=False). 8
    ranges of 1024 pages; range 3 has every page at hot_w, the others cold_frac of their pages
    at cold_w (weights in the sampler's unit: nr_accesses, fault counts, writes)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        pages, w = [], []
        for reg in range(8):
            pg = np.arange(reg * 1024, (reg + 1) * 1024)
            if reg != 3:
                pg = pg[rng.random(1024) < cold_frac]
            pages.append(pg)
            w.append(np.full(pg.size, hot_w if reg == 3 else cold_w))
        b = AccessBatch.from_pages(BASE // 4096 + np.concatenate(pages), pid=1)
        yield AccessBatch(b.pid, b.addr, np.concatenate(w), ordered=False)


@pytest.mark.parametrize("hot_w,cold_w,cold_frac", [(20, 1, 0.2),    # DAMON nr_accesses
                                                    (3, 1, 0.05),    # hint-fault counts
                                                    (1, 1, 0.1)])    # soft-dirty writes
def test_damon_promotes_the_hot_range_of_aggregated_live_batches(hot_w, cold_w, cold_frac):
    """Live batches carry no time inside the interval; the policy must not slice them by
    position (it did, and promoted nothing live: each region got its accesses in one slice)."""
    pol = make_policy("damon")
    for b in _live_batches(10, hot_w, cold_w, cold_frac):
        assert not b.ordered
        pol.observe(b)
    pages = (BASE // 4096 + np.arange(8 * 1024)).astype(np.uint64)
    plan = pol.plan(Placement(pages, np.full(pages.size, SLOW, np.int8)), Capacity(2048),
                    Budget(4096))
    rng_of = (plan.promote - np.uint64(BASE // 4096)) // np.uint64(1024)
    assert (rng_of == 3).sum() >= 900                 # most of the hot range
    assert (rng_of != 3).sum() <= 0.05 * 7 * 1024     # little of the cold ones


def test_batch_order_flag_is_kept():
    b = AccessBatch.from_pages(np.arange(10), t_start=0, t_end=1)
    assert not b.ordered
    o = AccessBatch(b.pid, b.addr, b.weight, t_start=1, t_end=2, ordered=True)
    assert o.select(o.weight > 0).ordered and o.page_aligned().ordered
    assert not AccessBatch.concat([o, b]).ordered
    later = AccessBatch(o.pid, o.addr, o.weight, t_start=2, t_end=3, ordered=True)
    assert AccessBatch.concat([o, later]).ordered
    assert not AccessBatch.concat([later, o]).ordered   # not in time order


def test_weighted_interleave_places_in_ratio():
    pol = make_policy("weighted-interleave", {"fast_weight": 3, "slow_weight": 1})
    t = pol.place_new(np.arange(400, dtype=np.uint64), Placement.empty(), Capacity(10_000))
    assert (t == FAST).sum() == 300
    t = make_policy("interleave").place_new(np.arange(10, dtype=np.uint64), Placement.empty(),
                                            Capacity(3))
    assert (t == FAST).sum() == 3

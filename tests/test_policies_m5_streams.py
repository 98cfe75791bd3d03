"""m5 internals with known answers: the stream detector, streamed ranges not promoted, the
stride prefetch, the lazy sketch decay, and the rate following a moved hot set."""
import numpy as np

from tiermem import synth
from tiermem.sim import TierModel, simulate
from tiermem.trace import Trace
from tiermem.policies import make_policy
from tiermem.policies.base import FAST
from tiermem.policies.m5 import CountMinSketch, detect_streams

BASE = 0x7F000000


def test_detect_streams_finds_a_sweep_among_random_accesses():
    rng = np.random.default_rng(1)
    sweep = np.repeat(np.arange(1000, 1010, dtype=np.uint64), 8)       # 10 pages, 8 each
    rand = rng.integers(0, 500, sweep.size).astype(np.uint64)
    pages = np.empty(2 * sweep.size, np.uint64)
    pages[0::2], pages[1::2] = sweep, rand                              # interleaved in time
    up, stream, heads, lengths = detect_streams(pages, 4)
    assert set(up[stream].tolist()) == set(range(1000, 1010))
    assert heads.tolist() == [1009] and lengths.tolist() == [10]
    # random pages alone: no stream; the same pages sorted by address (no time order): none
    assert not detect_streams(rng.integers(0, 64, 4000).astype(np.uint64), 4)[1].any()
    assert not detect_streams(np.sort(pages), 4)[1].any()
    # pages swept in reverse time order are not a forward stream
    assert not detect_streams(sweep[::-1].copy(), 4)[1].any()


def sweep_trace(n_pages=2048, hot=np.arange(100, 228), sweep=(1024, 1536), rounds=3,
                accesses=600_000, seed=2):
    """Random accesses to a hot set, with a one-pass sweep over ``sweep`` pages (64 accesses a
    page, in address order) inserted ``rounds`` times; each sweep's pages are never reused."""
    rng = np.random.default_rng(seed)
    pages = hot[rng.integers(0, hot.size, accesses)]
    words = rng.integers(0, 64, accesses)
    parts_p, parts_w = [], []
    lo, hi = sweep
    per = (hi - lo) // rounds
    cut = np.linspace(0, accesses, rounds + 1).astype(int)
    for r in range(rounds):
        s = np.repeat(np.arange(lo + r * per, lo + (r + 1) * per), 64)
        mix = np.empty(2 * s.size, np.int64)       # sweep interleaved with hot accesses
        mix[0::2] = s
        mid = (cut[r] + cut[r + 1]) // 2          # the sweep starts mid-segment
        mix[1::2] = pages[mid:mid + s.size]
        parts_p += [pages[cut[r]:mid], mix, pages[mid + s.size:cut[r + 1]]]
        parts_w += [words[cut[r]:mid], np.tile(np.arange(64), 2 * s.size // 64),
                    words[mid + s.size:cut[r + 1]]]
    seq = np.concatenate(parts_p)
    idx = np.concatenate([np.arange(n_pages), seq]).astype(np.uint32)
    w = np.concatenate([np.zeros(n_pages), np.concatenate(parts_w)]).astype(np.uint8)
    tr = Trace(np.zeros(n_pages, np.int32), BASE + np.arange(n_pages, dtype=np.uint64), idx, w,
               meta={"space": "vaddr", "sub_page": True}).validated()
    return tr, BASE + np.arange(lo, hi, dtype=np.uint64)


def test_streamed_range_is_not_promoted_unless_detection_is_off():
    tr, swept = sweep_trace()
    # fast tier 512 pages: first touch fills it with pages 0..511 (the hot set included)
    model = TierModel(fast_mb=2.0, budget_mb=1.0, epoch_accesses=20_000, sample_every=8)
    res_on = simulate(tr, make_policy("m5", {"stream_ahead": 0.0}), model)
    res_off = simulate(tr, make_policy("m5", {"stream_run": 0, "stream_ahead": 0.0}), model)
    # without detection the swept pages look hot after their burst and are promoted
    # (epoch 0 is left out: both promote the same single-sample init-pass pages there)
    later_on = res_on.epochs["promotions"][1:].sum()
    later_off = res_off.epochs["promotions"][1:].sum()
    # (80 of the 512 swept pages end on the fast tier without detection, 3 with it)
    assert later_off >= 50 and (res_off.final.tier_of(swept) == FAST).sum() >= 50
    assert later_on <= 0.1 * later_off
    assert (res_on.final.tier_of(swept) == FAST).sum() <= 5
    # the same fast ratio, without paying for the useless migrations (simulated time)
    assert res_on.fast_ratio >= res_off.fast_ratio - 0.005
    assert res_on.time_s < res_off.time_s


def test_stride_prefetch_puts_the_sweep_ahead_on_the_fast_tier():
    tr, swept = sweep_trace(hot=np.arange(100, 164))
    model = TierModel(fast_mb=2.0, budget_mb=1.0, epoch_accesses=20_000, sample_every=8)
    pol = make_policy("m5", {"stream_ahead": 1.0})
    res = simulate(tr, pol, model)
    res0 = simulate(tr, make_policy("m5", {"stream_ahead": 0.0}), model)
    assert pol.stats()["prefetched"] >= 100 and pol.stats()["streamed_pages"] > 0
    assert res.fast_ratio > res0.fast_ratio + 0.015    # sweep: ~5% of accesses


def test_lazy_decay_matches_eager_decay_and_renormalises():
    cms = CountMinSketch(4, 1024, seed=3)
    keys = np.arange(50, dtype=np.uint64) * 7919
    cms.add(keys, np.full(50, 100.0))
    cms.decay(0.5)
    assert np.allclose(cms.query(keys), 50.0) or (cms.query(keys) >= 50.0).all()
    ref = cms.c.copy()
    assert np.allclose(ref.sum(), 4 * 50 * 50.0)
    for _ in range(200):                       # far past the renormalisation point
        cms.decay(0.5)
    assert cms.scale >= 1e-12
    c = cms.c
    assert ((c == 0) | (np.abs(c) >= np.finfo(np.float32).tiny)).all()   # no subnormals
    cms.add(keys[:1], np.array([10.0]))
    assert abs(cms.query(keys[:1])[0] - 10.0) < 1e-3


def test_m5_follows_a_moved_hot_set_quickly():
    n = 1_200_000
    tr = synth.hotset(pages=4096, accesses=n, period=n // 2, hot_frac=0.05, seed=4)
    model = TierModel(fast_mb=4.0, budget_mb=1.0, epoch_accesses=50_000, sample_every=32)
    res = simulate(tr, make_policy("m5"), model)
    e = res.epochs
    ratio = e["fast_accesses"] / e["mem_accesses"]
    move = int(np.searchsorted(np.cumsum(e["accesses"]), 4096 + n // 2))   # epoch of the move
    # within 6 intervals of the move the new hot set is back on the fast tier
    assert ratio[move + 6:].mean() > 0.85, ratio[move:].round(2)

"""m5's decay matched to the sampling density: known answers for the decay it picks, and the
effect it is for (a hot set sampled less than once a page per interval kept on the fast tier
better than with the fixed decay)."""
import numpy as np

from tiermem import synth
from tiermem.sim import TierModel, simulate
from tiermem.access import AccessBatch
from tiermem.policies import make_policy
from tiermem.policies.base import Budget, Capacity, Placement, SLOW


def _batch(n):
    pages = (np.arange(n, dtype=np.uint64) % 512 + 0x1000) << np.uint64(12)
    return AccessBatch(np.ones(n, np.int32), pages, np.full(n, 64, np.float32), False,
                       "vaddr", 0.0, 0.01)


def _decay_after(policy, fast_pages, n_samples):
    pl = Placement(np.arange(0x1000, 0x1200, dtype=np.uint64), np.full(512, SLOW, np.uint8))
    policy.observe(_batch(100))
    policy.plan(pl, Capacity(fast_pages), Budget(64))      # the policy learns the capacity
    policy.observe(_batch(n_samples))
    return policy.stats()["decay"]


def test_decay_follows_samples_per_fast_page():
    # 400 samples over 1000 fast pages, 4 samples wanted: 1 - 0.4 / 4 = 0.9
    assert abs(_decay_after(make_policy("m5"), 1000, 400) - 0.9) < 1e-9
    # 200 over 1000: 0.95, capped at decay_max 0.9
    assert abs(_decay_after(make_policy("m5"), 1000, 200) - 0.9) < 1e-9
    # dense sampling (10 per fast page): the configured decay
    assert _decay_after(make_policy("m5"), 100, 1000) == 0.5
    # off: the fixed decay
    assert _decay_after(make_policy("m5", {"window_samples": 0}), 1000, 400) == 0.5
    assert abs(_decay_after(make_policy("m5", {"decay_max": 0.8}), 1000, 400) - 0.8) < 1e-9


def test_long_memory_keeps_a_sparsely_sampled_hot_set():
    tr = synth.sparse(pages=8192, accesses=3_000_000)
    model = TierModel(fast_mb=8192 * 4096 / 2**20 / 4)
    fixed = simulate(tr, make_policy("m5", {"window_samples": 0}), model).fast_ratio
    matched = simulate(tr, make_policy("m5"), model).fast_ratio
    assert matched > fixed + 0.005

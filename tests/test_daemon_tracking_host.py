"""tiermemd's placement tracking on this host's kernel: pages a sampler reports that the last
scan did not see (memory filled after it) are looked up with a move_pages query of just those
pages (tracking.add_sampled), so they are tiered in the next loop, not at the next scan."""
import mmap
import os

import numpy as np

from tiermem import native
from tiermem.policies.base import FAST, Placement
from tiermemd import tracking


def test_add_sampled_adds_present_anonymous_pages_only():
    n = 64
    buf = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    a = np.frombuffer(buf, np.uint8)
    base = a.ctypes.data >> 12
    a[::2 * 4096] = 1                                   # every other page present
    pages = base + np.arange(n, dtype=np.uint64)
    before, _ = tracking.scan(os.getpid(), [0], [])
    pl0 = Placement(before.pages[(before.pages < base) | (before.pages >= base + n)],
                    before.tiers[(before.pages < base) | (before.pages >= base + n)],
                    assume_sorted=True)               # as if scanned before the fill
    assert not np.isin(pages, pl0.pages).any()
    # a file page of this process (its own executable's text) must not be added
    exe = next(v for v in __import__("tiermem.procmaps", fromlist=["x"]).read_vmas(
        os.getpid(), with_rss=False) if v.kind not in tracking.KINDS)
    outside = np.array([exe.start >> 12], np.uint64)
    ask = np.union1d(pages, outside)
    pl, missed = tracking.add_sampled(os.getpid(), pl0, ask, [0], [])
    added = pl.pages[np.isin(pl.pages, pages)]
    assert (added == pages[::2]).all()                  # exactly the present ones
    assert (pl.tier_of(added) == FAST).all()
    assert set(missed.tolist()) == set(pages[1::2].tolist()) | {int(outside[0])}
    assert len(pl) == len(pl0) + n // 2 and (np.diff(pl.pages.astype(np.int64)) > 0).all()
    del a
    buf.close()

"""Per-process view the daemon keeps: where each present page is (fast or slow tier).

A full scan reads the process's VMAs, its present pages (pagemap) and their nodes
(move_pages query), all as numpy arrays; between scans the placement is updated from what
the mover reports, so a loop costs one scan every ``rescan_every`` intervals. Only private
anonymous memory (heap, stack, anonymous mappings) is tracked: file and shared pages belong
to other processes too and move_pages(MPOL_MF_MOVE) would not move them.
"""
from __future__ import annotations

import numpy as np

from tiermem import native
from tiermem.access import PAGE_SHIFT
from tiermem.errors import TiermemError
from tiermem.placement import present_pages, query_nodes
from tiermem.policies.base import FAST, SLOW, Placement
from tiermem.procmaps import read_vmas

KINDS = ("heap", "stack", "anon")
if native.PAGE_SIZE != 1 << PAGE_SHIFT:   # policies reason in 4 KiB pages
    raise TiermemError(f"tiermemd needs 4 KiB base pages, this host has {native.PAGE_SIZE}")


def scan(pid: int, fast_nodes, slow_nodes) -> tuple[Placement, int]:
    """(placement of the present private anonymous pages on the fast/slow nodes, number of
    present pages on other nodes)."""
    parts = []
    for v in read_vmas(pid, with_rss=False):     # maps, not smaps: smaps walks page tables
        if v.kind not in KINDS or v.perms[3] == "s" or v.perms[:3] == "---":
            continue
        parts.append(present_pages(pid, v.start, v.end))
    addrs = np.concatenate(parts) if parts else np.empty(0, np.uint64)
    st = query_nodes(pid, addrs) if addrs.size else np.empty(0, np.int32)
    fast = np.isin(st, np.asarray(fast_nodes, dtype=np.int32))
    slow = np.isin(st, np.asarray(slow_nodes, dtype=np.int32))
    keep = fast | slow
    other = int(np.count_nonzero((st >= 0) & ~keep))
    pages = addrs[keep] >> np.uint64(PAGE_SHIFT)
    tiers = np.where(fast[keep], FAST, SLOW).astype(np.uint8)
    return Placement(pages, tiers, assume_sorted=True), other


def update(pl: Placement, moved_pages: np.ndarray, tier: int,
           gone_pages: np.ndarray) -> Placement:
    """The placement after the mover moved ``moved_pages`` to ``tier`` and found
    ``gone_pages`` unmapped (page numbers)."""
    t = pl.tiers.copy()
    if moved_pages.size:
        pos, known = pl.index(moved_pages)
        t[pos[known]] = tier
    pages = pl.pages
    if gone_pages.size:
        pos, known = pl.index(gone_pages)
        keep = np.ones(pages.size, bool)
        keep[pos[known]] = False
        pages, t = pages[keep], t[keep]
    return Placement(pages, t, assume_sorted=True)

"""Per-process view the daemon keeps: where each present page is (fast or slow tier).

A full scan reads the process's VMAs, its present pages (pagemap) and their nodes
(move_pages query), all as numpy arrays; between scans the placement is updated from what
the mover reports, so a loop costs one scan every ``rescan_every`` intervals. Pages the
sampler reports that the placement does not know yet (a process that was still filling its
memory at the last scan) are looked up at once with ``add_sampled``: a move_pages query of
just those pages, so new memory is tiered in the next loop, not at the next scan. Only private
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


def _anon_vmas(pid: int):
    return [v for v in read_vmas(pid, with_rss=False)
            if v.kind in KINDS and v.perms[3] != "s" and v.perms[:3] != "---"]


def scan(pid: int, fast_nodes, slow_nodes) -> tuple[Placement, int]:
    """(placement of the present private anonymous pages on the fast/slow nodes, number of
    present pages on other nodes)."""
    parts = []
    for v in _anon_vmas(pid):                    # maps, not smaps: smaps walks page tables
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


def add_sampled(pid: int, pl: Placement, pages: np.ndarray, fast_nodes, slow_nodes,
                limit: int = 1 << 16) -> tuple[Placement, np.ndarray]:
    """(the placement with those of ``pages`` (sorted unique page numbers it does not know)
    that are present private anonymous pages on a fast/slow node added, the pages looked up
    and not added: not present, not anonymous or elsewhere). At most ``limit`` pages are
    looked up per call."""
    pages = pages[:limit]
    if pages.size == 0:
        return pl, pages
    vmas = _anon_vmas(pid)
    if not vmas:
        return pl, pages
    starts = np.array([v.start for v in vmas], np.uint64) >> np.uint64(PAGE_SHIFT)
    ends = np.array([v.end for v in vmas], np.uint64) >> np.uint64(PAGE_SHIFT)
    i = np.searchsorted(starts, pages, side="right") - 1
    inside = (i >= 0) & (pages < ends[np.maximum(i, 0)])
    cand = pages[inside]
    st = query_nodes(pid, cand << np.uint64(PAGE_SHIFT)) if cand.size else \
        np.empty(0, np.int32)
    fast = np.isin(st, np.asarray(fast_nodes, dtype=np.int32))
    slow = np.isin(st, np.asarray(slow_nodes, dtype=np.int32))
    keep = fast | slow
    if not keep.any():
        return pl, pages
    allp = np.concatenate([pl.pages, cand[keep]])
    allt = np.concatenate([pl.tiers, np.where(fast[keep], FAST, SLOW).astype(np.uint8)])
    o = np.argsort(allp, kind="stable")
    added = np.zeros(pages.size, bool)
    added[np.flatnonzero(inside)[keep]] = True
    return Placement(allp[o], allt[o], assume_sorted=True), pages[~added]

"""Where a process's pages are (per node, per VMA) and moving them between nodes.

Present pages come from pagemap, their node from move_pages status queries, and moves use
move_pages in batches; all page work is numpy arrays through tiermem.native.
"""
from __future__ import annotations

import errno
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from tiermem import native
from tiermem.errors import TiermemError
from tiermem.procmaps import Vma, process_exists, read_vmas
from tiermem.topology import read_topology

PAGE = native.PAGE_SIZE
CHUNK_PAGES = 1 << 16          # pagemap / move_pages batch (256 MiB of 4 KiB pages)


def _gone(pid: int, what: str) -> TiermemError:
    return TiermemError(f"process {pid} exited {what}")


def present_pages(pid: int, start: int, end: int) -> np.ndarray:
    """Addresses of the pages in [start, end) that are present in RAM (not swapped)."""
    out = []
    for a in range(start, end, CHUNK_PAGES * PAGE):
        n = min(CHUNK_PAGES, (end - a) // PAGE)
        try:
            ent = native.pagemap_read(pid, a, n)
        except OSError as e:
            if e.errno in (errno.ESRCH, errno.ENOENT):
                raise _gone(pid, "while reading its pagemap") from None
            if e.errno == errno.EPERM or e.errno == errno.EACCES:
                raise TiermemError(f"not allowed to read /proc/{pid}/pagemap: run as root")
            raise TiermemError(f"pagemap of PID {pid}: {e.strerror}") from None
        idx = np.nonzero(ent & np.uint64(native.PM_PRESENT))[0]
        if len(idx):
            out.append(np.uint64(a) + idx.astype(np.uint64) * np.uint64(PAGE))
    return np.concatenate(out) if out else np.empty(0, dtype=np.uint64)


def query_nodes(pid: int, pages: np.ndarray) -> np.ndarray:
    try:
        parts = [native.query_nodes(pid, pages[i:i + CHUNK_PAGES])
                 for i in range(0, len(pages), CHUNK_PAGES)]
    except OSError as e:
        if e.errno == errno.ESRCH:
            raise _gone(pid, "while its pages were queried") from None
        if e.errno == errno.EPERM:
            raise TiermemError(f"not allowed to query pages of PID {pid} "
                               f"(needs CAP_SYS_NICE): run as root") from None
        raise TiermemError(f"move_pages query on PID {pid}: {e.strerror}") from None
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)


@dataclass
class VmaPlacement:
    vma: Vma
    pages_per_node: dict[int, int]
    other: dict[str, int] = field(default_factory=dict)   # errno name -> pages


def numastat(pid: int) -> list[VmaPlacement]:
    """Per-VMA count of present pages on each node (VMAs with no resident pages skipped)."""
    out = []
    for v in read_vmas(pid):
        if v.rss_kb == 0 or v.path == "[vsyscall]":
            continue
        pages = present_pages(pid, v.start, v.end)
        if len(pages) == 0:
            continue
        st = query_nodes(pid, pages)
        ok = st >= 0
        nodes, counts = np.unique(st[ok], return_counts=True)
        bad_codes, bad_counts = np.unique(-st[~ok], return_counts=True)
        out.append(VmaPlacement(
            v, {int(n): int(c) for n, c in zip(nodes, counts)},
            {errno.errorcode.get(int(e), str(e)): int(c) for e, c in zip(bad_codes, bad_counts)}))
    return out


def totals(placements: list[VmaPlacement]) -> dict[str, dict[int, int]]:
    """Pages per node grouped like numastat -p: heap, stack, anon, shmem, file, special."""
    agg: dict[str, Counter] = {}
    for p in placements:
        c = agg.setdefault(p.vma.kind, Counter())
        c.update(p.pages_per_node)
    return {k: dict(v) for k, v in agg.items()}


def parse_range(text: str) -> tuple[int, int]:
    """'0x7f00-0x7f80' (hex or decimal, either side) -> (start, end), page-aligned outward."""
    try:
        a, b = text.split("-", 1)
        start, end = int(a, 0), int(b, 0)
    except ValueError:
        raise TiermemError(f"bad range {text!r}: expected START-END, e.g. "
                           f"0x7f0000000000-0x7f0040000000") from None
    if end <= start:
        raise TiermemError(f"bad range {text!r}: end must be above start")
    return start & ~(PAGE - 1), (end + PAGE - 1) & ~(PAGE - 1)


@dataclass
class MoveResult:
    pid: int
    to_node: int
    requested: int = 0            # pages selected to move
    already: int = 0              # pages already on the target node
    moved: int = 0
    failed: dict[str, int] = field(default_factory=dict)   # errno name -> pages
    seconds: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.moved * PAGE / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"pid": self.pid, "to_node": self.to_node, "pages_requested": self.requested,
                "pages_already_on_node": self.already, "pages_moved": self.moved,
                "pages_failed": self.failed, "seconds": round(self.seconds, 6),
                "mb_per_s": round(self.mb_per_s, 1), "page_size": PAGE}


def select_pages(pid: int, rng: tuple[int, int] | None) -> np.ndarray:
    vmas = [v for v in read_vmas(pid) if v.rss_kb != 0 and v.path != "[vsyscall]"]
    if rng:
        lo, hi = rng
        hits = [v for v in vmas if v.start < hi and v.end > lo]
        if not hits and not any(v.start < hi and v.end > lo for v in read_vmas(pid, False)):
            raise TiermemError(f"range {lo:#x}-{hi:#x} is outside every mapping of PID {pid}")
        spans = [(max(v.start, lo), min(v.end, hi)) for v in hits]
    else:
        spans = [(v.start, v.end) for v in vmas]
    parts = [present_pages(pid, a, b) for a, b in spans]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)


def move(pid: int, to_node: int, rng: tuple[int, int] | None = None,
         max_mb: float | None = None, batch_pages: int = 4096, progress=None) -> MoveResult:
    """Move the present pages of pid (in rng, up to max_mb) to to_node with move_pages."""
    topo = read_topology()
    node = topo.node(to_node)
    if not node.has_memory:
        raise TiermemError(f"node {to_node} has no memory")
    if not process_exists(pid):
        raise TiermemError(f"no process with PID {pid}")
    pages = select_pages(pid, rng)
    res = MoveResult(pid, to_node)
    st = query_nodes(pid, pages)
    res.already = int(np.count_nonzero(st == to_node))
    pages = pages[(st >= 0) & (st != to_node)]
    if max_mb is not None:
        if max_mb <= 0:
            raise TiermemError(f"--max-mb must be positive, got {max_mb}")
        pages = pages[: int(max_mb * 1e6 // PAGE) if max_mb * 1e6 >= PAGE else 1]
    res.requested = len(pages)
    fails: Counter = Counter()
    t0 = native.now_ns()
    for i in range(0, len(pages), batch_pages):
        chunk = pages[i:i + batch_pages]
        try:
            status = native.move_pages(pid, chunk, to_node, native.MPOL_MF_MOVE)
        except OSError as e:
            if e.errno == errno.ENOMEM:
                # The target node is full: this batch and the rest cannot move; stop here.
                fails["ENOMEM"] += len(pages) - i
                break
            res.seconds = (native.now_ns() - t0) / 1e9
            res.failed = dict(fails)
            if e.errno == errno.ESRCH:
                raise _gone(pid, f"during the move ({res.moved} pages moved before)") from None
            if e.errno == errno.EPERM:
                raise TiermemError(f"not allowed to move pages of PID {pid} "
                                   f"(needs CAP_SYS_NICE): run as root") from None
            if e.errno == errno.ENODEV:
                raise TiermemError(f"node {to_node} is not online") from None
            raise TiermemError(f"move_pages on PID {pid}: {e.strerror}") from None
        res.moved += int(np.count_nonzero(status == to_node))
        bad = status[status < 0]
        if len(bad):
            codes, counts = np.unique(-bad, return_counts=True)
            for c, n in zip(codes, counts):
                fails[errno.errorcode.get(int(c), str(c))] += int(n)
        if progress:
            progress(min(i + batch_pages, len(pages)), len(pages))
    res.seconds = (native.now_ns() - t0) / 1e9
    res.failed = dict(fails)
    return res


def is_root() -> bool:
    return os.geteuid() == 0

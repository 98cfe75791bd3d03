"""The access batch: what every sampler produces and every policy consumes.

An AccessBatch is a set of sampled memory accesses over one time interval, as numpy arrays:

- ``pid``     int32   process of each sample (0 when unknown, e.g. physical-address sources)
- ``addr``    uint64  byte address of each sample. Page-granularity sources (DAMON, idle page,
                      hint faults) give page-aligned addresses; sources that know the 64-byte
                      word (a trace, a CXL device monitor, PEBS) give the real byte address and
                      set ``sub_page=True``.
- ``weight``  float32 number of accesses the sample stands for (1 / sampling rate), >= 0
- ``is_write`` bool or None: per-sample write flag when the source knows it
- ``ordered`` True when the samples are a time-ordered stream (trace replay, the simulator's
              sampled trace); False (the default) when they are aggregated over the interval
              (every live sampler: one entry per page or word, in address order). Policies
              that model time inside an interval (damon's sampling intervals) need to know.

and scalars ``sub_page`` (low 12 bits of addr carry a real word offset), ``space``
('vaddr' or 'paddr') and the interval ``t_start`` .. ``t_end`` in seconds.

The same type flows from the live samplers (tiermem.samplers) and from trace replay in the
simulator (tiermem.sim) into the same policy objects (tiermem.policies).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tiermem.errors import TiermemError

PAGE_SHIFT = 12            # policies and traces reason in 4 KiB base pages
PAGE_SIZE = 1 << PAGE_SHIFT
WORD_SHIFT = 6             # 64-byte words (cache lines)
WORDS_PER_PAGE = PAGE_SIZE >> WORD_SHIFT   # 64: one bit each in a uint64 bitmap
SPACES = ("vaddr", "paddr")


@dataclass(frozen=True)
class AccessBatch:
    pid: np.ndarray
    addr: np.ndarray
    weight: np.ndarray
    sub_page: bool = False
    space: str = "vaddr"
    t_start: float = 0.0
    t_end: float = 0.0
    is_write: np.ndarray | None = None
    ordered: bool = False

    def __post_init__(self):
        n = None
        for name, dtype in (("pid", np.int32), ("addr", np.uint64), ("weight", np.float32)):
            raw = getattr(self, name)
            a = np.asarray(raw)
            if a.ndim != 1:
                raise TiermemError(f"access batch: {name} must be a 1-D array, got shape {a.shape}")
            if a.size and a.dtype.kind not in "iuf" + ("b" if name == "weight" else ""):
                raise TiermemError(f"access batch: {name} must be numeric, got dtype {a.dtype}")
            if name == "addr" and a.size and a.dtype.kind == "i" and (a < 0).any():
                raise TiermemError("access batch: addr has negative values")
            if name == "addr" and a.size and a.dtype.kind == "f":
                raise TiermemError("access batch: addr must be an integer array, got floats")
            a = np.ascontiguousarray(a, dtype=dtype)
            if n is None:
                n = a.size
            elif a.size != n:
                raise TiermemError(f"access batch: {name} has {a.size} entries, pid has {n}")
            object.__setattr__(self, name, a)
        if self.weight.size and not (np.isfinite(self.weight).all() and (self.weight >= 0).all()):
            raise TiermemError("access batch: weight must be finite and >= 0")
        if self.is_write is not None:
            w = np.ascontiguousarray(self.is_write, dtype=bool)
            if w.shape != (n,):
                raise TiermemError(f"access batch: is_write has shape {w.shape}, expected ({n},)")
            object.__setattr__(self, "is_write", w)
        if self.space not in SPACES:
            raise TiermemError(f"access batch: space must be one of {SPACES}, got {self.space!r}")
        object.__setattr__(self, "sub_page", bool(self.sub_page))
        object.__setattr__(self, "ordered", bool(self.ordered))
        ts, te = float(self.t_start), float(self.t_end)
        if not (np.isfinite(ts) and np.isfinite(te)) or te < ts:
            raise TiermemError(f"access batch: bad interval t_start={ts} t_end={te} "
                               "(need finite t_start <= t_end, seconds)")
        object.__setattr__(self, "t_start", ts)
        object.__setattr__(self, "t_end", te)
        if not self.sub_page and n and (self.addr & np.uint64(PAGE_SIZE - 1)).any():
            raise TiermemError("access batch: sub_page=False but some addresses are not "
                               "page-aligned (align them, or set sub_page=True)")

    # --- helpers -------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.addr.size)

    @property
    def duration(self) -> float:
        """Seconds covered by the batch."""
        return self.t_end - self.t_start

    @property
    def accesses(self) -> float:
        """Number of accesses the batch stands for (sum of weights)."""
        return float(self.weight.sum(dtype=np.float64))

    def pages(self) -> np.ndarray:
        """Page number (addr >> 12) of each sample, uint64."""
        return self.addr >> np.uint64(PAGE_SHIFT)

    def words(self) -> np.ndarray:
        """64-byte word index inside its page (0..63) of each sample, uint8.

        Only meaningful with sub_page=True; raises otherwise so a policy cannot silently use
        offsets that are all zero."""
        if not self.sub_page:
            raise TiermemError("access batch has no word addresses (sub_page=False)")
        return ((self.addr >> np.uint64(WORD_SHIFT)) & np.uint64(WORDS_PER_PAGE - 1)).astype(np.uint8)

    def select(self, mask: np.ndarray) -> "AccessBatch":
        """The samples where mask (bool array or index array) is set, same interval."""
        return AccessBatch(self.pid[mask], self.addr[mask], self.weight[mask], self.sub_page,
                           self.space, self.t_start, self.t_end,
                           None if self.is_write is None else self.is_write[mask], self.ordered)

    def for_pid(self, pid: int) -> "AccessBatch":
        return self.select(self.pid == pid)

    def page_aligned(self) -> "AccessBatch":
        """The same samples at page granularity (sub_page=False)."""
        mask = ~np.uint64(PAGE_SIZE - 1)
        return AccessBatch(self.pid, self.addr & mask, self.weight, False, self.space,
                           self.t_start, self.t_end, self.is_write, self.ordered)

    @classmethod
    def empty(cls, space: str = "vaddr", sub_page: bool = False, t_start: float = 0.0,
              t_end: float | None = None) -> "AccessBatch":
        return cls(np.empty(0, np.int32), np.empty(0, np.uint64), np.empty(0, np.float32),
                   sub_page, space, t_start, t_start if t_end is None else t_end)

    @classmethod
    def from_pages(cls, pages, weight=1.0, pid: int = 0, space: str = "vaddr",
                   t_start: float = 0.0, t_end: float = 0.0) -> "AccessBatch":
        """A page-granularity batch from page numbers (not addresses)."""
        p = np.asarray(pages, dtype=np.uint64)
        w = np.broadcast_to(np.asarray(weight, dtype=np.float32), p.shape)
        return cls(np.full(p.size, pid, np.int32), p << np.uint64(PAGE_SHIFT), w, False, space,
                   t_start, t_end)

    @staticmethod
    def concat(batches) -> "AccessBatch":
        """One batch from several of the same space; sub_page only if all have it; the interval
        spans them all; is_write kept only if every batch has it; ordered only if every batch
        is and they are given in time order."""
        batches = list(batches)
        if not batches:
            raise TiermemError("AccessBatch.concat: no batches")
        spaces = {b.space for b in batches}
        if len(spaces) != 1:
            raise TiermemError(f"AccessBatch.concat: mixed address spaces {sorted(spaces)}")
        sub = all(b.sub_page for b in batches)
        addr = np.concatenate([b.addr for b in batches])
        if not sub:
            addr &= ~np.uint64(PAGE_SIZE - 1)
        wr = None
        if all(b.is_write is not None for b in batches):
            wr = np.concatenate([b.is_write for b in batches])
        return AccessBatch(np.concatenate([b.pid for b in batches]), addr,
                           np.concatenate([b.weight for b in batches]), sub, spaces.pop(),
                           min(b.t_start for b in batches), max(b.t_end for b in batches), wr,
                           all(b.ordered for b in batches) and
                           all(a.t_end <= b.t_start for a, b in zip(batches, batches[1:])))

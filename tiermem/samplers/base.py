"""The sampler interface: start on a target, read access batches, report own CPU cost, stop.

A sampler turns one kernel signal into tiermem.access.AccessBatch objects. Every sampler:
  * start(target)  -- begins sampling (kernel state is created here and nowhere else);
  * read()         -- the accesses seen since the previous read, as one AccessBatch;
  * cpu_seconds()  -- CPU time spent on sampling so far: this thread's time inside the
                      sampler plus kernel-side work where it is measurable (kdamond threads,
                      BPF program run time);
  * stop()         -- leaves nothing running in the kernel; safe to call twice;
  * is a context manager (stop() on exit, also on errors);
  * available()    -- classmethod: (True, '') or (False, the precise reason).

Internally a sampler produces Spans: address ranges with a per-page weight (DAMON regions,
single pages, or 64-byte words). read_spans() gives them as they are (compact; what
`tiermem record` stores); read() expands them to the page/word AccessBatch policies use.
"""
from __future__ import annotations

import abc
import os
import time
from dataclasses import dataclass, field

import numpy as np

from tiermem.access import PAGE_SHIFT, PAGE_SIZE, AccessBatch
from tiermem.errors import TiermemError

# read() refuses to expand more pages than this in one batch (16 GiB of 4 KiB pages).
MAX_EXPAND_PAGES = 1 << 22


@dataclass
class Spans:
    """Accessed address ranges over [t_start, t_end]: [addr, addr+length) of process pid
    (0 for physical addresses); weight = accesses counted for each 4 KiB page the range
    covers (for a range shorter than a page: for that range). sub_page: the ranges are
    64-byte words (or other sub-page pieces) with real offsets."""
    pid: np.ndarray        # int32
    addr: np.ndarray       # uint64
    length: np.ndarray     # uint64 bytes
    weight: np.ndarray     # float32
    sub_page: bool = False
    space: str = "vaddr"
    t_start: float = 0.0
    t_end: float = 0.0

    def __post_init__(self):
        self.pid = np.ascontiguousarray(self.pid, np.int32)
        self.addr = np.ascontiguousarray(self.addr, np.uint64)
        self.length = np.ascontiguousarray(self.length, np.uint64)
        self.weight = np.ascontiguousarray(self.weight, np.float32)
        n = self.addr.size
        if not (self.pid.size == self.length.size == self.weight.size == n):
            raise TiermemError("spans: pid/addr/length/weight differ in length")

    def __len__(self) -> int:
        return int(self.addr.size)

    @classmethod
    def empty(cls, space="vaddr", t_start=0.0, t_end=0.0, sub_page=False) -> "Spans":
        z = np.empty(0, np.uint64)
        return cls(np.empty(0, np.int32), z, z, np.empty(0, np.float32), sub_page, space,
                   t_start, t_end)

    def total_pages(self) -> int:
        first = self.addr >> np.uint64(PAGE_SHIFT)
        last = (self.addr + np.maximum(self.length, 1) - 1) >> np.uint64(PAGE_SHIFT)
        return int((last - first + 1).sum())

    def to_batch(self) -> AccessBatch:
        """Page-granularity AccessBatch (every page a span covers gets its weight), or, for
        sub-page spans, one sample per span at its real address."""
        if self.sub_page:
            return AccessBatch(self.pid, self.addr, self.weight, True, self.space,
                               self.t_start, self.t_end)
        first = self.addr >> np.uint64(PAGE_SHIFT)
        last = (self.addr + np.maximum(self.length, 1) - 1) >> np.uint64(PAGE_SHIFT)
        counts = (last - first + 1).astype(np.int64)
        total = int(counts.sum())
        if total > MAX_EXPAND_PAGES:
            raise TiermemError(f"{total} pages in one batch exceed {MAX_EXPAND_PAGES}: "
                               "read more often or sample a smaller range")
        idx = np.repeat(np.arange(counts.size), counts)
        starts = np.cumsum(counts) - counts
        off = (np.arange(total, dtype=np.int64) - starts[idx]).astype(np.uint64)
        pages = first[idx] + off
        return AccessBatch(self.pid[idx], pages << np.uint64(PAGE_SHIFT), self.weight[idx],
                           False, self.space, self.t_start, self.t_end)

    @classmethod
    def from_batch(cls, b: AccessBatch) -> "Spans":
        length = np.full(len(b), 64 if b.sub_page else PAGE_SIZE, np.uint64)
        return cls(b.pid, b.addr, length, b.weight, b.sub_page, b.space, b.t_start, b.t_end)


@dataclass
class Target:
    """What to sample: process ids (virtual addresses), or physical ranges [start, end) in
    bytes (for kernel sources whose scope is physical memory, e.g. DAMON paddr)."""
    pids: list[int] = field(default_factory=list)
    phys_ranges: list[tuple[int, int]] = field(default_factory=list)

    def check_pids(self) -> None:
        for p in self.pids:
            if not isinstance(p, int) or p <= 0:
                raise TiermemError(f"bad pid {p!r}")
            if not os.path.exists(f"/proc/{p}"):
                raise TiermemError(f"no process with pid {p}")


class Sampler(abc.ABC):
    """Base class; subclasses implement _start, _read_spans, _stop and may add kernel CPU
    time in _kernel_cpu_seconds."""

    name = "base"
    space = "vaddr"

    def __init__(self):
        self._cpu = 0.0          # this thread's CPU seconds spent inside the sampler
        self.setup_cpu = 0.0
        self._started = False
        self._t_last = 0.0
        self.target: Target | None = None

    # -- public API ----------------------------------------------------------------------
    @classmethod
    def available(cls) -> tuple[bool, str]:
        return True, ""

    def start(self, target: Target) -> "Sampler":
        if self._started:
            raise TiermemError(f"sampler {self.name} already started")
        ok, why = self.available()
        if not ok:
            raise TiermemError(f"sampler {self.name} not available: {why}")
        self.target = target
        c0 = time.thread_time()
        try:
            self._start(target)
        except BaseException:
            self._stop()
            raise
        finally:
            self._cpu += time.thread_time() - c0
        self._started = True
        self._t_last = time.monotonic()
        self.setup_cpu = self.cpu_seconds()   # one-off start cost (e.g. compiling BPF)
        return self

    def read(self) -> AccessBatch:
        """Accesses since the previous read, as pages (or words, for sub-page sources)."""
        return self.read_spans().to_batch()

    def read_spans(self) -> Spans:
        if not self._started:
            raise TiermemError(f"sampler {self.name} is not started")
        c0 = time.thread_time()
        t0, t1 = self._t_last, time.monotonic()
        try:
            b = self._read_spans(t0, t1)
        finally:
            self._cpu += time.thread_time() - c0
        self._t_last = t1
        return b

    def cpu_seconds(self) -> float:
        return self._cpu + self._kernel_cpu_seconds()

    def thread_cpu_seconds(self) -> float:
        """The part of cpu_seconds() spent in this process's thread (reading results)."""
        return self._cpu

    def stop(self) -> None:
        if not self._started:
            return
        c0 = time.thread_time()
        try:
            self._stop()
        finally:
            self._cpu += time.thread_time() - c0
            self._started = False

    def prog_ids(self) -> list[int]:
        """Kernel ids of the BPF programs this sampler has loaded now (for leak checks)."""
        return []

    def metadata(self) -> dict:
        """Parameters worth recording with the samples (intervals, modes)."""
        return {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- for subclasses ------------------------------------------------------------------
    @abc.abstractmethod
    def _start(self, target: Target) -> None:
        """Create the kernel state; on an exception _stop() is called to undo it."""

    @abc.abstractmethod
    def _read_spans(self, t0: float, t1: float) -> Spans:
        """Accesses in [t0, t1] (monotonic seconds)."""

    @abc.abstractmethod
    def _stop(self) -> None:
        """Remove every kernel object _start made; must tolerate a partial _start."""

    def _kernel_cpu_seconds(self) -> float:
        return 0.0

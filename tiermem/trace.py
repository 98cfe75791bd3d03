"""The tiermem access-trace file format (version 1): load, validate, save atomically.

A trace is a numpy ``.npz`` archive with these arrays (N accesses, P distinct pages):

==============  ========  ==========================================================
``meta``        str       JSON object: ``format`` = "tiermem-trace", ``version`` = 1,
                          ``space`` ('vaddr'|'paddr'), ``sub_page`` (bool), ``source``,
                          ``sample_every`` (1 in N accesses kept), free-form extras
``page_pid``    int32[P]  process of each distinct page
``page_num``    uint64[P] page number (byte address >> 12); (pid, page) sorted, unique
``page_idx``    uint32[N] per access: index into the page table, in program order
``word``        uint8[N]  per access: 64-byte word inside the page (0..63); only with
                          sub_page (absent for page-granularity sources)
``is_write``    bool[N]   optional
``weight``      float32[N] optional: accesses each record stands for (default 1)
``epoch``       uint32[N] optional, non-decreasing: batch boundaries of replayed sampler
                          records (the simulator then uses these as its epochs)
==============  ========  ==========================================================

Storing the address as (page index, word) keeps traces small and lets the simulator count
per page with ``np.bincount`` (linear time) instead of sorting addresses every epoch. The
byte address of access i is ``page_num[page_idx[i]] << 12 | word[i] << 6``.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np

from tiermem.access import PAGE_SHIFT, WORD_SHIFT, AccessBatch
from tiermem.errors import TiermemError
from tiermem.npzfile import read_meta, save_atomic

FORMAT = "tiermem-trace"
VERSION = 1
PID_SHIFT = 44   # simulator page key = (pid rank << 44) | page number (pages < 2**44 on x86-64)


@dataclass
class Trace:
    page_pid: np.ndarray
    page_num: np.ndarray
    page_idx: np.ndarray
    word: np.ndarray | None = None
    is_write: np.ndarray | None = None
    weight: np.ndarray | None = None
    epoch: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    # --- construction --------------------------------------------------------------------
    @classmethod
    def from_addresses(cls, addr, pid=None, is_write=None, sub_page: bool = True,
                       space: str = "vaddr", weight=None, epoch=None,
                       **meta) -> "Trace":
        """Build a trace from byte addresses (one np.unique over (pid, page))."""
        addr = np.ascontiguousarray(addr, dtype=np.uint64)
        pid = np.zeros(addr.size, np.int32) if pid is None else \
            np.ascontiguousarray(np.broadcast_to(pid, addr.shape), dtype=np.int32)
        pages = addr >> np.uint64(PAGE_SHIFT)
        if pages.size and pages.max() >= (1 << PID_SHIFT):
            raise TiermemError("trace: page numbers must be below 2**44")
        upid, pid_rank = np.unique(pid, return_inverse=True)
        key = (pid_rank.astype(np.uint64) << np.uint64(PID_SHIFT)) | pages
        ukey, inv = np.unique(key, return_inverse=True)
        page_pid = upid[(ukey >> np.uint64(PID_SHIFT)).astype(np.int64)].astype(np.int32)
        page_num = ukey & np.uint64((1 << PID_SHIFT) - 1)
        word = ((addr >> np.uint64(WORD_SHIFT)) & np.uint64(63)).astype(np.uint8) \
            if sub_page else None
        m = {"space": space, "sub_page": bool(sub_page), "source": "addresses",
             "sample_every": 1}
        m.update(meta)
        return cls(page_pid, page_num, inv.astype(np.uint32).ravel(), word,
                   None if is_write is None else np.asarray(is_write, bool),
                   None if weight is None else np.asarray(weight, np.float32),
                   None if epoch is None else np.asarray(epoch, np.uint32), m).validated()

    # --- properties ----------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.page_idx.size)

    @property
    def n_pages(self) -> int:
        return int(self.page_num.size)

    @property
    def sub_page(self) -> bool:
        return self.word is not None

    @property
    def space(self) -> str:
        return self.meta.get("space", "vaddr")

    def page_keys(self) -> np.ndarray:
        """Sorted uint64 page keys the simulator hands to policies: the page number itself for
        single-process traces, (pid rank << 44) | page otherwise."""
        _, rank = np.unique(self.page_pid, return_inverse=True)
        return (rank.astype(np.uint64) << np.uint64(PID_SHIFT)) | self.page_num

    def addresses(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Byte addresses of accesses lo..hi."""
        idx = self.page_idx[lo:hi]
        a = self.page_num[idx] << np.uint64(PAGE_SHIFT)
        if self.word is not None:
            a |= self.word[lo:hi].astype(np.uint64) << np.uint64(WORD_SHIFT)
        return a

    def batch(self, lo: int = 0, hi: int | None = None, t_start=0.0, t_end=0.0) -> AccessBatch:
        """Accesses lo..hi as an AccessBatch (the sampler-record view of a trace)."""
        idx = self.page_idx[lo:hi]
        w = np.ones(idx.size, np.float32) if self.weight is None else self.weight[lo:hi]
        return AccessBatch(self.page_pid[idx], self.addresses(lo, hi), w, self.sub_page,
                           self.space, t_start, t_end,
                           None if self.is_write is None else self.is_write[lo:hi], ordered=True)

    # --- validation ----------------------------------------------------------------------
    def validated(self, where: str = "trace") -> "Trace":
        n = self.page_idx.size
        p = self.page_num.size
        if self.page_idx.ndim != 1 or self.page_num.ndim != 1 or self.page_pid.shape != (p,):
            raise TiermemError(f"{where}: page_pid/page_num/page_idx must be 1-D, "
                               "page_pid and page_num the same length")
        if n == 0:
            raise TiermemError(f"{where}: no accesses")
        if p == 0 or int(self.page_idx.max()) >= p:
            raise TiermemError(f"{where}: page_idx refers past the page table ({p} pages)")
        if p > 1:
            key_hi = self.page_pid.astype(np.int64)
            same = key_hi[1:] == key_hi[:-1]
            bad = (key_hi[1:] < key_hi[:-1]) | (same & (self.page_num[1:] <= self.page_num[:-1]))
            if bad.any():
                raise TiermemError(f"{where}: page table not sorted by (pid, page) or has "
                                   "duplicates")
        for name in ("word", "is_write", "weight", "epoch"):
            a = getattr(self, name)
            if a is not None and a.shape != (n,):
                raise TiermemError(f"{where}: {name} has {a.size} entries, expected {n}")
        if self.word is not None and int(self.word.max()) > 63:
            raise TiermemError(f"{where}: word offsets must be 0..63")
        if self.weight is not None and not (np.isfinite(self.weight).all()
                                            and (self.weight >= 0).all()):
            raise TiermemError(f"{where}: weights must be finite and >= 0")
        if self.epoch is not None and (np.diff(self.epoch.astype(np.int64)) < 0).any():
            raise TiermemError(f"{where}: epoch must be non-decreasing")
        if self.meta.get("space", "vaddr") not in ("vaddr", "paddr"):
            raise TiermemError(f"{where}: meta.space must be vaddr or paddr")
        return self

    # --- files ---------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write atomically (temporary file in the same directory, then rename)."""
        meta = dict(self.meta, format=FORMAT, version=VERSION, sub_page=self.sub_page,
                    accesses=len(self), pages=self.n_pages)
        arrays = {"meta": np.array(json.dumps(meta)), "page_pid": self.page_pid,
                  "page_num": self.page_num, "page_idx": self.page_idx}
        for name in ("word", "is_write", "weight", "epoch"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        save_atomic(path, arrays, "trace")


def load(path: str) -> Trace:
    """Read and validate a trace; any problem is one TiermemError naming the file."""
    where = f"trace {path}"
    if not os.path.isfile(path):
        raise TiermemError(f"{where}: no such file")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise TiermemError(f"{where}: not a tiermem trace (.npz): {e}") from None
    with z:
        files = set(z.files)
        missing = {"meta", "page_pid", "page_num", "page_idx"} - files
        if missing:
            raise TiermemError(f"{where}: missing arrays {', '.join(sorted(missing))}")
        meta = read_meta(z, where, FORMAT, VERSION, "trace")
        want = {"page_pid": np.int32, "page_num": np.uint64, "page_idx": np.uint32,
                "word": np.uint8, "is_write": np.bool_, "weight": np.float32,
                "epoch": np.uint32}
        arr = {}
        try:
            for name, dt in want.items():
                if name in files:
                    a = z[name]
                    if a.dtype != dt:
                        raise TiermemError(f"{where}: {name} has dtype {a.dtype}, expected "
                                           f"{np.dtype(dt)}")
                    arr[name] = a
        except (ValueError, zipfile.BadZipFile, EOFError, OSError) as e:
            raise TiermemError(f"{where}: corrupt array data: {e}") from None
    t = Trace(arr["page_pid"], arr["page_num"], arr["page_idx"], arr.get("word"),
              arr.get("is_write"), arr.get("weight"), arr.get("epoch"), meta)
    if bool(meta.get("sub_page")) != (t.word is not None):
        raise TiermemError(f"{where}: meta.sub_page disagrees with the presence of 'word'")
    return t.validated(where)

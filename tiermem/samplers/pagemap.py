"""pagemap sampler: which pages of a process are present, swapped, or written (soft-dirty).

Modes:
  * 'soft-dirty' -- pages written since the previous read: clear the soft-dirty bits
    (/proc/PID/clear_refs <- 4) at start and after every read, and read them back from
    pagemap. Needs CONFIG_MEM_SOFT_DIRTY (the 6.12 guest has it, the 6.18 host does not);
    available() probes it for real on a page of our own.
  * 'present'    -- pages resident now (weight 1 each): residency, for working-set size.
  * 'swapped'    -- pages swapped out now.

Where the kernel has the PAGEMAP_SCAN ioctl (Linux 6.7) the pages are found with it (one
call returns ranges of matching pages); otherwise /proc/PID/pagemap entries are read and
decoded with tiermem.native.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import struct

import numpy as np

from tiermem import kfs, native, procmaps
from tiermem.errors import TiermemError
from tiermem.samplers.base import Sampler, Spans, Target

# PAGEMAP_SCAN (include/uapi/linux/fs.h)
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_SOFT_DIRTY = 1 << 7
_PM_SCAN_ARG = struct.Struct("<12Q")
PAGEMAP_SCAN = (3 << 30) | (_PM_SCAN_ARG.size << 16) | (ord("f") << 8) | 16
_VEC_LEN = 4096
MAX_VMA = 1 << 40             # skip reserved-but-unused VMAs larger than 1 TiB

MODES = ("soft-dirty", "present", "swapped")


def pagemap_scan(pid: int, start: int, end: int, category_mask: int,
                 vec_len: int = _VEC_LEN) -> tuple[np.ndarray, np.ndarray]:
    """Ranges [start, end) of pages in [start, end) having every category in category_mask,
    via the PAGEMAP_SCAN ioctl. OSError (ENOTTY/EINVAL) where the kernel lacks it."""
    vec = np.zeros((vec_len, 3), np.uint64)
    starts, ends = [], []
    pos = start
    while pos < end:
        arg = bytearray(_PM_SCAN_ARG.pack(_PM_SCAN_ARG.size, 0, pos, end, 0, vec.ctypes.data,
                                          vec_len, 0, 0, category_mask, 0, category_mask))
        n = kfs.ioctl(f"/proc/{pid}/pagemap", PAGEMAP_SCAN, arg)
        walk_end = _PM_SCAN_ARG.unpack(bytes(arg))[4]
        if n:
            starts.append(vec[:n, 0].copy())
            ends.append(vec[:n, 1].copy())
        if walk_end <= pos:
            break
        pos = walk_end
    if not starts:
        z = np.empty(0, np.uint64)
        return z, z
    return np.concatenate(starts), np.concatenate(ends)


_probe_cache: dict[str, tuple[bool, str]] = {}


def _probe_soft_dirty() -> tuple[bool, str]:
    """Write a page of ours, clear soft-dirty, check the bit is clear, write, check set."""
    if "sd" in _probe_cache:
        return _probe_cache["sd"]
    m = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        cbuf = ctypes.c_char.from_buffer(m)
        addr = ctypes.addressof(cbuf)
        del cbuf
        m[0:1] = b"x"
        me = os.getpid()
        kfs.write(f"/proc/{me}/clear_refs", 4)
        before = native.pagemap_read(me, addr, 1)[0] & np.uint64(native.PM_SOFT_DIRTY)
        m[0:1] = b"y"
        after = native.pagemap_read(me, addr, 1)[0] & np.uint64(native.PM_SOFT_DIRTY)
        ok = bool(after) and not bool(before)
    except (OSError, TiermemError) as e:
        ok, why = False, f"soft-dirty probe failed: {e}"
        _probe_cache["sd"] = (ok, why)
        return ok, why
    finally:
        m.close()
    why = "" if ok else ("soft-dirty bits not supported by this kernel (CONFIG_MEM_SOFT_DIRTY "
                         f"off in {os.uname().release}: the bit never clears and sets)")
    _probe_cache["sd"] = (ok, why)
    return ok, why


def has_pagemap_scan() -> bool:
    if "scan" not in _probe_cache:
        try:
            me = os.getpid()
            pagemap_scan(me, 0, native.PAGE_SIZE, PAGE_IS_PRESENT, vec_len=1)
            _probe_cache["scan"] = (True, "")
        except OSError as e:
            _probe_cache["scan"] = (False, os.strerror(e.errno or 0))
    return _probe_cache["scan"][0]


class PagemapSampler(Sampler):
    name = "pagemap"

    def __init__(self, mode: str = "soft-dirty", use_scan: bool | None = None):
        super().__init__()
        if mode not in MODES:
            raise TiermemError(f"pagemap mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.use_scan = use_scan

    @classmethod
    def available(cls) -> tuple[bool, str]:
        if not os.path.exists("/proc/self/pagemap"):
            return False, "/proc/self/pagemap missing (kernel without CONFIG_PROC_PAGE_MONITOR)"
        return True, ""

    def _start(self, target: Target) -> None:
        if not target.pids:
            raise TiermemError("pagemap sampler needs target pids")
        target.check_pids()
        if self.mode == "soft-dirty":
            ok, why = _probe_soft_dirty()
            if not ok:
                raise TiermemError(f"pagemap soft-dirty mode not available: {why}")
        if self.use_scan is None:
            self.use_scan = has_pagemap_scan()
        if self.mode == "soft-dirty":
            for p in target.pids:
                self._clear(p)

    def _clear(self, pid: int) -> None:
        try:
            kfs.write(f"/proc/{pid}/clear_refs", 4)
        except TiermemError:
            if not procmaps.process_exists(pid):
                raise TiermemError(f"process {pid} exited") from None
            raise

    def _vmas(self, pid: int):
        return [v for v in procmaps.read_vmas(pid, with_rss=False)
                if v.kind in ("anon", "heap", "stack", "shmem") and v.size <= MAX_VMA]

    def _pages(self, pid: int) -> tuple[np.ndarray, np.ndarray]:
        """(start, length) of ranges of matching pages of pid."""
        cat = {"soft-dirty": PAGE_IS_SOFT_DIRTY | PAGE_IS_PRESENT, "present": PAGE_IS_PRESENT,
               "swapped": PAGE_IS_SWAPPED}[self.mode]
        st, ln = [], []
        for v in self._vmas(pid):
            if self.use_scan:
                try:
                    s, e = pagemap_scan(pid, v.start, v.end, cat)
                except OSError as ex:
                    if not procmaps.process_exists(pid):
                        raise TiermemError(f"process {pid} exited") from None
                    raise TiermemError(f"PAGEMAP_SCAN on pid {pid}: {ex.strerror}") from None
                st.append(s)
                ln.append(e - s)
                continue
            n = v.size // native.PAGE_SIZE
            try:
                ent = native.pagemap_read(pid, v.start, n)
            except OSError as ex:
                if not procmaps.process_exists(pid):
                    raise TiermemError(f"process {pid} exited") from None
                raise TiermemError(f"pagemap of pid {pid}: {ex.strerror}") from None
            d = native.pagemap_decode(ent)
            sel = {"soft-dirty": d["soft_dirty"] & d["present"], "present": d["present"],
                   "swapped": d["swapped"]}[self.mode]
            idx = np.nonzero(sel)[0].astype(np.uint64)
            st.append(np.uint64(v.start) + idx * np.uint64(native.PAGE_SIZE))
            ln.append(np.full(idx.size, native.PAGE_SIZE, np.uint64))
        if not st:
            z = np.empty(0, np.uint64)
            return z, z
        return np.concatenate(st), np.concatenate(ln)

    def _read_spans(self, t0, t1) -> Spans:
        pids, starts, lens = [], [], []
        for p in self.target.pids:
            s, ln = self._pages(p)
            if self.mode == "soft-dirty":
                self._clear(p)
            pids.append(np.full(s.size, p, np.int32))
            starts.append(s)
            lens.append(ln)
        s = np.concatenate(starts) if starts else np.empty(0, np.uint64)
        return Spans(np.concatenate(pids) if pids else np.empty(0, np.int32), s,
                     np.concatenate(lens) if lens else np.empty(0, np.uint64),
                     np.ones(s.size, np.float32), False, "vaddr", t0, t1)

    def _stop(self) -> None:
        # clear_refs leaves no kernel object behind; nothing to undo.
        pass

    def metadata(self) -> dict:
        return {"mode": self.mode, "method": "PAGEMAP_SCAN" if self.use_scan else "pagemap"}

"""Idle-page tracking sampler (/sys/kernel/mm/page_idle/bitmap with pagemap PFNs).

At start and after each read, the target's present pages are marked idle (their bits set in
the bitmap). At read, pages whose idle bit the kernel cleared were accessed in between.
The bitmap is indexed by PFN: 64-bit word PFN // 64, bit PFN % 64, read and written 8 bytes
at a time at 8-byte-aligned offsets; writing a 1 bit marks a page idle, a 0 bit changes
nothing. Needs root (PFNs) and CONFIG_IDLE_PAGE_TRACKING; neither kernel of this project
(host 6.18, guest 6.12) has it, and available() says so.
"""
from __future__ import annotations

import os

import numpy as np

from tiermem import kfs, native, procmaps
from tiermem.errors import TiermemError
from tiermem.samplers.base import Sampler, Spans, Target

BITMAP = "/sys/kernel/mm/page_idle/bitmap"
MERGE_GAP_WORDS = 64          # read/write across gaps up to this many words in one call
MAX_VMA = 1 << 40


# --- bitmap arithmetic (pure, unit-tested) -------------------------------------------------

def pfn_words(pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bitmap words that hold these PFNs (sorted, unique) and, for each, the mask of their
    bits."""
    pfns = np.asarray(pfns, np.uint64)
    if pfns.size == 0:
        return np.empty(0, np.uint64), np.empty(0, np.uint64)
    w = pfns >> np.uint64(6)
    bits = np.left_shift(np.uint64(1), pfns & np.uint64(63))
    order = np.argsort(w, kind="stable")
    w, bits = w[order], bits[order]
    first = np.ones(w.size, bool)
    first[1:] = w[1:] != w[:-1]
    starts = np.nonzero(first)[0]
    return w[starts], np.bitwise_or.reduceat(bits, starts)


def word_runs(words: np.ndarray, gap: int = MERGE_GAP_WORDS) -> list[tuple[int, int]]:
    """(first word, number of words) chunks covering sorted words, merging gaps <= gap."""
    words = np.asarray(words, np.uint64)
    if words.size == 0:
        return []
    brk = np.nonzero(np.diff(words.astype(np.int64)) > gap + 1)[0]
    starts = np.concatenate([[0], brk + 1])
    ends = np.concatenate([brk, [words.size - 1]])
    return [(int(words[s]), int(words[e] - words[s]) + 1) for s, e in zip(starts, ends)]


def chunk_bytes(first: int, count: int, words: np.ndarray, masks: np.ndarray) -> bytes:
    """The bytes to write for words first..first+count-1: masks where given, 0 elsewhere."""
    buf = np.zeros(count, np.uint64)
    sel = (words >= np.uint64(first)) & (words < np.uint64(first + count))
    buf[(words[sel] - np.uint64(first)).astype(np.int64)] = masks[sel]
    return buf.astype("<u8").tobytes()


def idle_bits(pfns: np.ndarray, words: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each PFN, whether its idle bit is set, given bitmap words (sorted) and their
    values."""
    pfns = np.asarray(pfns, np.uint64)
    w = pfns >> np.uint64(6)
    i = np.searchsorted(words, w)
    i = np.minimum(i, max(words.size - 1, 0))
    if words.size == 0 or not (words[i] == w).all():
        raise TiermemError("idle bitmap: a PFN's word was not read")
    return ((values[i] >> (pfns & np.uint64(63))) & np.uint64(1)).astype(bool)


# --- kernel side -------------------------------------------------------------------------

def mark_idle(pfns: np.ndarray) -> None:
    words, masks = pfn_words(pfns)
    for first, count in word_runs(words):
        kfs.pwrite(BITMAP, first * 8, chunk_bytes(first, count, words, masks))


def read_idle(pfns: np.ndarray) -> np.ndarray:
    words, _ = pfn_words(pfns)
    vals = np.zeros(words.size, np.uint64)
    for first, count in word_runs(words):
        raw = np.frombuffer(kfs.pread(BITMAP, first * 8, count * 8), "<u8")
        sel = (words >= np.uint64(first)) & (words < np.uint64(first + count))
        vals[sel] = raw[(words[sel] - np.uint64(first)).astype(np.int64)]
    return idle_bits(pfns, words, vals)


class IdleSampler(Sampler):
    name = "idle"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        if not kfs.exists(BITMAP):
            return False, (f"idle page tracking not in this kernel ({os.uname().release}): "
                           f"{BITMAP} missing (CONFIG_IDLE_PAGE_TRACKING not set)")
        if os.geteuid() != 0:
            return False, "idle page tracking needs root (page frame numbers from pagemap)"
        return True, ""

    def _present(self, pid: int) -> tuple[np.ndarray, np.ndarray]:
        """(virtual addresses, PFNs) of pid's present anonymous/heap/stack pages."""
        va, pf = [], []
        for v in procmaps.read_vmas(pid, with_rss=False):
            if v.kind not in ("anon", "heap", "stack", "shmem") or v.size > MAX_VMA:
                continue
            try:
                d = native.pagemap_decode(native.pagemap_read(pid, v.start, v.size // native.PAGE_SIZE))
            except OSError as e:
                if not procmaps.process_exists(pid):
                    raise TiermemError(f"process {pid} exited") from None
                raise TiermemError(f"pagemap of pid {pid}: {e.strerror}") from None
            idx = np.nonzero(d["present"] & (d["pfn"] != 0))[0]
            va.append(np.uint64(v.start) + idx.astype(np.uint64) * np.uint64(native.PAGE_SIZE))
            pf.append(d["pfn"][idx])
        if not va:
            z = np.empty(0, np.uint64)
            return z, z
        return np.concatenate(va), np.concatenate(pf)

    def _start(self, target: Target) -> None:
        if not target.pids:
            raise TiermemError("idle sampler needs target pids")
        target.check_pids()
        for p in target.pids:
            mark_idle(self._present(p)[1])

    def _read_spans(self, t0, t1) -> Spans:
        pids, addrs = [], []
        for p in self.target.pids:
            va, pfn = self._present(p)
            accessed = ~read_idle(pfn) if pfn.size else np.zeros(0, bool)
            addrs.append(va[accessed])
            pids.append(np.full(int(accessed.sum()), p, np.int32))
            mark_idle(pfn)
        a = np.concatenate(addrs) if addrs else np.empty(0, np.uint64)
        return Spans(np.concatenate(pids) if pids else np.empty(0, np.int32), a,
                     np.full(a.size, native.PAGE_SIZE, np.uint64), np.ones(a.size, np.float32),
                     False, "vaddr", t0, t1)

    def _stop(self) -> None:
        # Idle bits are per-page flags with no owner; nothing to remove.
        pass

"""Which pages a checkpoint stores (cxlfork.state.memory.present_runs: PAGEMAP_SCAN, or the
pagemap read on kernels without it) against /proc/self/pagemap read entry by entry."""
import mmap
import os

import numpy as np

from cxlfork.state.memory import present_runs
from tiermem.native import PM_FILE, PM_PRESENT, PM_SWAP, pagemap_read

PAGE = 4096


def _by_pagemap(start: int, end: int, file_ok: bool) -> list[list[int]]:
    pm = pagemap_read(os.getpid(), start, (end - start) // PAGE)
    take = (pm & np.uint64(PM_PRESENT | PM_SWAP)) != 0
    if not file_ok:
        take &= (pm & np.uint64(PM_FILE)) == 0
    edges = np.diff(np.concatenate(([0], take.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [[start + int(a) * PAGE, int(b - a), 0] for a, b in zip(starts, ends)]


def test_touched_pattern_is_found_exactly():
    n = 4096
    m = mmap.mmap(-1, n * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf = np.frombuffer(m, dtype=np.uint8)
    addr = buf.ctypes.data
    m.madvise(mmap.MADV_NOHUGEPAGE)
    touched = [i for i in range(n) if i % 7 in (0, 1, 2) or 1000 <= i < 1500]
    for i in touched:
        buf[i * PAGE] = 1
    want = []
    for i in touched:
        if want and want[-1][0] + want[-1][1] * PAGE == addr + i * PAGE:
            want[-1][1] += 1
        else:
            want.append([addr + i * PAGE, 1, 0])
    pm = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        got = present_runs(pm, addr, addr + n * PAGE, True)
    finally:
        os.close(pm)
    del buf
    m.close()
    assert got == want


def test_same_runs_as_pagemap_for_every_mapping():
    keep = np.ones(3 << 18)                       # some anonymous memory in use
    pm = os.open("/proc/self/pagemap", os.O_RDONLY)
    checked = 0
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
        for line in lines:
            if "[vsyscall]" in line:
                continue
            s, e = (int(x, 16) for x in line.split()[0].split("-"))
            for file_ok in (True, False):
                # this test's own allocations may change the heap between the two reads:
                # the same answer in one of 3 tries
                tries = [(present_runs(pm, s, e, file_ok), _by_pagemap(s, e, file_ok))
                         for _ in range(3)]
                assert any(a == b for a, b in tries), (line, tries[0])
                checked += 1
    finally:
        os.close(pm)
    assert checked > 20 and keep[0] == 1

"""The page dump of a checkpoint: every stored run (of the VMAs and of the shmem objects, see
cxlfork.state.memory) gets its place in the page file, then the file is filled per 64 MiB
segment by worker threads in C (GIL released): process_vm_readv (or pread of /proc/PID/mem
for unreadable mappings, of the object's fd for shmem/memfd) straight into a mapping of the
page file (stores with 2 MiB folios) or into a cache-sized buffer then pwritten, hashed.
Returns the page file's content hash (image.HASH_ALG).

Huge-page placement (`layout(align=True)`, the default for page files of a store): a stored
run of a (not growsdown) anonymous mapping that holds a whole 2 MiB-aligned virtual block is
placed at a file offset congruent to its address modulo 2 MiB. On a tmpfs with huge pages
(`huge=within_size`, the default store) the page file is filled in 2 MiB folios, and a clone's
MAP_PRIVATE mapping of such a run can then map each aligned block read-only with one PMD
(plan.build prefaults them: docs/cxlfork.md, "Huge store pages"). The gaps before aligned
runs (under 2 MiB each) are holes: never written, they hash as zeros; each lies in 2 MiB
folios that hold data too, so even the fallocated file of the direct dump (which zero-fills
them) spends no memory on them alone."""
from __future__ import annotations

import errno
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from cxlfork import image as image_mod
from cxlfork.errors import CxlforkError
from cxlfork.native import ffi, lib
from cxlfork.state.memory import data_ranges

PAGE = 4096
HUGE_PAGES = (2 << 20) // PAGE          # pages per PMD-mapped block (x86-64)


def huge_alignable(v: dict, r: list) -> bool:
    """A run worth placing for PMD mappings: of an anonymous (not growsdown) mapping, holding
    a whole 2 MiB-aligned virtual block."""
    if v["kind"] != "anon" or v["growsdown"]:
        return False
    first = -(-(r[0] // PAGE) // HUGE_PAGES) * HUGE_PAGES
    return first + HUGE_PAGES <= r[0] // PAGE + r[1]


def layout(state: dict, align: bool = True) -> int:
    """Give each run its place in the page file; returns the number of pages (the page file's
    size: runs and the holes before huge-aligned runs, see the module docstring)."""
    p = 0
    for v in state["vmas"]:
        for r in v["runs"]:
            if align and huge_alignable(v, r):
                p += (r[0] // PAGE - p) % HUGE_PAGES
            r[2] = p
            p += r[1]
    objs = state["_objs"]
    for o in objs.by_ino.values():
        o["runs"] = [[off, n, 0] for off, n in data_ranges(objs.fds[o["id"]], o["size"])]
        for r in o["runs"]:
            r[2] = p
            p += r[1]
    return p


def segment_tasks(state: dict, memfd: int) -> list[list[tuple[int, list, list, int]]]:
    """Per 64 MiB segment of the page file, the groups of runs to copy: (source fd or -1 for
    process_vm_readv, addresses, byte lengths, page-file offset of the first); a hole before
    a huge-aligned run is a group with source None (hashed as zeros, not written)."""
    seg_pages = image_mod.SEGMENT // PAGE
    jobs = []                        # (source, address, pages, first store page), file order
    for v in state["vmas"]:
        src = -1 if v["prot"] & 1 else memfd
        jobs += [(src, r[0], r[1], r[2]) for r in v["runs"]]
    for o in state["_objs"].by_ino.values():
        ofd = state["_objs"].fds[o["id"]]
        jobs += [(ofd, r[0], r[1], r[2]) for r in o["runs"]]
    holes, p = [], 0
    for src, addr, n, sp in jobs:
        if sp > p:
            holes.append((None, 0, sp - p, p))
        p = sp + n
    jobs = sorted(jobs + holes, key=lambda j: j[3])
    segs: list[list] = []
    ends: list[int] = []             # per segment: the file page after its last group
    for src, addr, n, sp in jobs:
        while n:                     # split runs at segment boundaries
            k = sp // seg_pages
            take = min(n, (k + 1) * seg_pages - sp)
            while len(segs) <= k:
                segs.append([])
                ends.append(-1)
            g = segs[k]
            if g and g[-1][0] == src and src is not None and ends[k] == sp:
                g[-1][1].append(addr)
                g[-1][2].append(take * PAGE)
            else:
                g.append((src, [addr], [take * PAGE], sp * PAGE))
            ends[k] = sp + take
            addr, n, sp = addr + take * PAGE, n - take, sp + take
    return segs


def write_pages(state: dict, tmp_path: str, node: int, progress=None,
                out: tuple[int, int] | None = None) -> str:
    """Fill the page file; returns the content hash (hex, image.HASH_ALG).

    The file's shared memory policy is bound to the store node first (mbind on a mapping of
    it). Then each 64 MiB segment is dumped by a worker thread in C (the GIL is released):
    batches of runs are read (process_vm_readv, or pread of /proc/PID/mem or of a shmem
    object) and hashed while in cache. Where the store gives 2 MiB folios (huge=within_size,
    as cxlfork mounts it) the file is allocated (fallocate) and the batches are read straight
    into that mapping: one copy, a fault per 2 MiB (about 20% less CPU than below, measured).
    Elsewhere they go through a cache-sized bounce buffer and are pwritten: full-page writes
    into tmpfs allocate without zeroing first, where a mapping would fault per 4 KiB page.

    out=(fd, base): write into the open file fd at byte offset base instead (the pool's slab,
    cxlfork.poolstore; no new file, no mbind); tmp_path and node are then unused.
    """
    npages = layout(state, align=out is None)     # the pool's slab: packed, as before
    size = npages * PAGE
    base = out[1] if out else 0
    fd = out[0] if out else os.open(tmp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                    0o600)
    try:
        if size == 0:
            return image_mod.combine_segment_hashes([])
        mm = buf = None
        if out is None:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            buf = ffi.from_buffer(mm)
            e = lib.cx_mbind_shared(ffi.cast("char *", buf), size, node)
            if e < 0 and e != -errno.ENOSYS:
                del buf
                mm.close()
                raise CxlforkError(f"mbind of the page file to node {node}: "
                                   f"{os.strerror(-e)}")
            if huge_folios(tmp_path):
                os.posix_fallocate(fd, 0, size)       # a full store fails here, not by a fault
            else:
                del buf
                mm.close()
                mm = buf = None
        try:
            return _dump(state, fd, base, buf, size, progress)
        finally:
            if mm is not None:
                del buf
                mm.close()
    finally:
        if out is None:
            os.close(fd)


def huge_folios(path: str) -> bool:
    """Whether the tmpfs holding path gives its files 2 MiB folios (huge=within_size or
    always): then the dump reads straight into a mapping of the page file (a fault per
    2 MiB, one copy) instead of through a bounce buffer and pwrite (two copies; the better
    way with 4 KiB pages, a fault each)."""
    from cxlfork.store import mount_of
    opts = mount_of(os.path.dirname(path))[2].split(",")
    return "huge=within_size" in opts or "huge=always" in opts


def _dump(state: dict, fd: int, base: int, mapped, size: int, progress) -> str:
    """Each segment by a worker thread; into mapped (the page file's mapping) when given,
    else pwritten to fd at base onwards."""
    pid = state["process"]["pid"]
    memfd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    lock = threading.Lock()
    done = [0]

    def dump(groups) -> int:
        h = ffi.new("cx_hash_t *")
        lib.cx_hash_init(h)
        bounce = ffi.new("char[]", lib.CX_DUMP_BATCH) if mapped is None else ffi.NULL
        zeros = None
        for src, addrs, lens, off in groups:
            if src is None:                   # a hole: zeros in the content hash, not written
                zeros = zeros or ffi.new("char[]", HUGE_PAGES * PAGE)
                for left in range(lens[0], 0, -HUGE_PAGES * PAGE):
                    lib.cx_hash_update(h, zeros, min(left, HUGE_PAGES * PAGE))
                if progress:
                    with lock:
                        done[0] += lens[0]
                        progress(done[0], size)
                continue
            dst = ffi.cast("char *", mapped) + off if mapped is not None else bounce
            r = lib.cx_dump_runs(pid, src, len(addrs), ffi.new("uint64_t[]", addrs),
                                 ffi.new("uint64_t[]", lens), dst, h,
                                 -1 if mapped is not None else fd, base + off)
            if r < 0:
                raise CxlforkError(f"reading the memory of PID {pid} into the page "
                                   f"file: {os.strerror(-r)}")
            if progress:
                with lock:
                    done[0] += r
                    progress(done[0], size)
        return lib.cx_hash_final(h)

    ex = ThreadPoolExecutor(image_mod.workers())
    try:
        hashes = list(ex.map(dump, segment_tasks(state, memfd)))
    finally:
        ex.shutdown(wait=True, cancel_futures=True)    # no worker uses fd after this
        os.close(memfd)
    return image_mod.combine_segment_hashes(hashes)

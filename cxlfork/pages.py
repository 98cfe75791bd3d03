"""The page dump of a checkpoint: every stored run (of the VMAs and of the shmem objects, see
cxlfork.state.memory) gets its place in the page file, then the file is filled per 64 MiB
segment by worker threads in C (GIL released): process_vm_readv (or pread of /proc/PID/mem
for unreadable mappings, of the object's fd for shmem/memfd) straight into a mapping of the
page file (stores with 2 MiB folios) or into a cache-sized buffer then pwritten, hashed.
Returns the page file's content hash (image.HASH_ALG)."""
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


def layout(state: dict) -> int:
    """Give each run its place in the page file; returns the number of pages."""
    p = 0
    for v in state["vmas"]:
        for r in v["runs"]:
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
    process_vm_readv, addresses, byte lengths, page-file offset of the first)."""
    seg_pages = image_mod.SEGMENT // PAGE
    jobs = []                        # (source, address, pages, first store page), file order
    for v in state["vmas"]:
        src = -1 if v["prot"] & 1 else memfd
        jobs += [(src, r[0], r[1], r[2]) for r in v["runs"]]
    for o in state["_objs"].by_ino.values():
        ofd = state["_objs"].fds[o["id"]]
        jobs += [(ofd, r[0], r[1], r[2]) for r in o["runs"]]
    segs: list[list] = []
    for src, addr, n, sp in jobs:
        while n:                     # split runs at segment boundaries
            k = sp // seg_pages
            take = min(n, (k + 1) * seg_pages - sp)
            while len(segs) <= k:
                segs.append([])
            g = segs[k]
            if g and g[-1][0] == src:
                g[-1][1].append(addr)
                g[-1][2].append(take * PAGE)
            else:
                g.append((src, [addr], [take * PAGE], sp * PAGE))
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
    npages = layout(state)
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
        for src, addrs, lens, off in groups:
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

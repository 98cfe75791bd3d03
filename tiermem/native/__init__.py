"""Python face of the C helpers: numpy arrays in and out, errors as TiermemError/OSError.

Every function here is a thin wrapper over tiermem._native (built by cffi at pip install);
no per-page Python loops.
"""
from __future__ import annotations

import errno as _errno
import os

import numpy as np

from tiermem.errors import TiermemError

try:
    from tiermem._native import ffi, lib
except ImportError as e:  # pragma: no cover - only when the package was not built
    raise TiermemError(
        "tiermem's C helpers are not built (tiermem._native missing): run "
        "'pip install -e .' (needs a C compiler) or 'make setup'") from e

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PAGE_SHIFT = PAGE_SIZE.bit_length() - 1

# mempolicy modes and flags (linux/mempolicy.h)
MPOL_DEFAULT, MPOL_PREFERRED, MPOL_BIND, MPOL_INTERLEAVE, MPOL_LOCAL = 0, 1, 2, 3, 4
MPOL_PREFERRED_MANY, MPOL_WEIGHTED_INTERLEAVE = 5, 6
MPOL_F_NODE, MPOL_F_ADDR = 1 << 0, 1 << 1
MPOL_MF_STRICT, MPOL_MF_MOVE, MPOL_MF_MOVE_ALL = 1 << 0, 1 << 1, 1 << 2
MAX_NODES = 1024
_MASK_WORDS = MAX_NODES // 64

# pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)
PM_PFN_MASK = (1 << 55) - 1
PM_SOFT_DIRTY = 1 << 55
PM_EXCLUSIVE = 1 << 56
PM_UFFD_WP = 1 << 57
PM_FILE = 1 << 61
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def _u64(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.uint64)


def nodemask(nodes) -> "ffi.CData":
    """A kernel nodemask (unsigned long[]) with the given node ids set."""
    mask = ffi.new(f"unsigned long[{_MASK_WORDS}]")
    for n in nodes:
        if not 0 <= n < MAX_NODES:
            raise ValueError(f"node {n} out of range 0..{MAX_NODES - 1}")
        mask[n // 64] |= 1 << (n % 64)
    return mask


_UNSET = np.iinfo(np.int32).min          # status the kernel did not write


def move_pages(pid: int, pages, nodes=None, flags: int = MPOL_MF_MOVE) -> np.ndarray:
    """move_pages(2) on page-aligned addresses; nodes=None only queries.

    Returns the per-page status array (node id, or -errno such as -EFAULT/-ENOENT/-EBUSY).
    Raises OSError for a call-level failure (ESRCH, EPERM, ENODEV, ...).
    """
    pages = _u64(pages)
    status = np.full(len(pages), _UNSET, dtype=np.int32)
    if len(pages) == 0:
        return status
    if nodes is None:
        nodes_p = ffi.NULL
    else:
        nodes = np.ascontiguousarray(np.broadcast_to(nodes, pages.shape), dtype=np.int32)
        nodes_p = ffi.cast("int *", nodes.ctypes.data)
    r = lib.tm_move_pages(pid, len(pages), ffi.cast("uint64_t *", pages.ctypes.data), nodes_p,
                          ffi.cast("int *", status.ctypes.data), flags if nodes is not None else 0)
    if r < 0:
        raise OSError(-r, f"move_pages(pid {pid}): {os.strerror(-r)}")
    if r > 0:
        # migrate_pages() failed for r pages after isolating them (a page pinned, e.g. by
        # vmsplice or io_uring, or whose references kept changing): the kernel then returns
        # their number and stores no status for the pages of that batch at all. Ask where
        # they are: those on their destination moved, the others were refused (-EBUSY).
        unset = np.flatnonzero(status == _UNSET)
        if unset.size:
            where = move_pages(pid, pages[unset], None)
            want = nodes[unset]
            status[unset] = np.where((where == want) | (where < 0), where, -_errno.EBUSY)
    return status


def query_nodes(pid: int, pages) -> np.ndarray:
    """The node each page is on (or -errno: -ENOENT not present, -EFAULT not mapped)."""
    return move_pages(pid, pages, None)


def migrate_pages(pid: int, from_nodes, to_nodes) -> int:
    """migrate_pages(2): returns the number of pages that could not be moved."""
    return _check(lib.tm_migrate_pages(pid, MAX_NODES + 1, nodemask(from_nodes),
                                       nodemask(to_nodes)), f"migrate_pages(pid {pid})")


def mbind(addr: int, length: int, mode: int, nodes=(), flags: int = 0) -> None:
    _check(lib.tm_mbind(addr, length, mode, nodemask(nodes), MAX_NODES + 1, flags), "mbind")


def set_mempolicy(mode: int, nodes=()) -> None:
    _check(lib.tm_set_mempolicy(mode, nodemask(nodes), MAX_NODES + 1), "set_mempolicy")


def get_mempolicy(addr: int = 0, flags: int = 0) -> tuple[int, list[int]]:
    """(mode, nodes) of the calling thread, or of the VMA at addr with MPOL_F_ADDR."""
    mode = ffi.new("int *")
    mask = ffi.new(f"unsigned long[{_MASK_WORDS}]")
    _check(lib.tm_get_mempolicy(mode, mask, MAX_NODES, addr, flags), "get_mempolicy")
    nodes = [w * 64 + b for w in range(_MASK_WORDS) for b in range(64) if mask[w] >> b & 1]
    return mode[0], nodes


def process_vm_read(pid: int, addr: int, length: int) -> bytes:
    buf = ffi.new(f"char[{length}]")
    n = _check(lib.tm_process_vm_readv(pid, buf, addr, length), f"process_vm_readv(pid {pid})")
    return ffi.buffer(buf, n)[:]


def process_vm_write(pid: int, addr: int, data: bytes) -> int:
    return _check(lib.tm_process_vm_writev(pid, ffi.from_buffer(data), addr, len(data)),
                  f"process_vm_writev(pid {pid})")


def pagemap_read(pid: int, vaddr: int, npages: int) -> np.ndarray:
    """Raw 64-bit pagemap entries for npages pages from vaddr (PFNs read as 0 unless
    CAP_SYS_ADMIN)."""
    out = np.zeros(npages, dtype=np.uint64)
    if npages == 0:
        return out
    n = lib.tm_pagemap_read(pid, vaddr, npages, ffi.cast("uint64_t *", out.ctypes.data))
    if n < 0:
        raise OSError(-n, f"pagemap of pid {pid}: {os.strerror(-n)}")
    return out[:n]


def pagemap_decode(entries: np.ndarray) -> dict[str, np.ndarray]:
    """Vectorised decode of pagemap entries into boolean/int arrays."""
    e = _u64(entries)
    present = (e & np.uint64(PM_PRESENT)) != 0
    swapped = (e & np.uint64(PM_SWAP)) != 0
    return {
        "present": present,
        "swapped": swapped,
        "file": (e & np.uint64(PM_FILE)) != 0,
        "exclusive": (e & np.uint64(PM_EXCLUSIVE)) != 0,
        "soft_dirty": (e & np.uint64(PM_SOFT_DIRTY)) != 0,
        "uffd_wp": (e & np.uint64(PM_UFFD_WP)) != 0,
        "pfn": np.where(present, e & np.uint64(PM_PFN_MASK), np.uint64(0)),
    }


class NodeBuffer:
    """Memory bound to one node (mmap + mbind + touch), for the microbenchmarks."""

    def __init__(self, size: int, node: int, hugepages: bool = False):
        self.size = size
        self.ptr = lib.tm_alloc_on_node(size, node, 1 if hugepages else 0)
        if self.ptr == ffi.NULL:
            e = ffi.errno
            raise OSError(e, f"cannot allocate {size >> 20} MiB on node {node}: "
                             f"{os.strerror(e)}")

    def close(self):
        if self.ptr != ffi.NULL:
            lib.tm_free(self.ptr, self.size)
            self.ptr = ffi.NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def address(self) -> int:
        return int(ffi.cast("uintptr_t", self.ptr))


def latency_ns(buf: NodeBuffer, loads: int = 2_000_000, seed: int = 1) -> float:
    r = lib.tm_latency_chase(buf.ptr, buf.size, loads, seed)
    if r < 0:
        raise OSError(_errno.ENOMEM, "latency test: buffer too small or out of memory")
    return r


def read_bandwidth(buf: NodeBuffer, passes: int = 3) -> float:
    """Bytes per second of a streaming read over buf."""
    return lib.tm_bandwidth_read(buf.ptr, buf.size, passes)


def memcpy_rate(dst: NodeBuffer, src: NodeBuffer, passes: int = 3) -> float:
    return lib.tm_memcpy_rate(dst.ptr, src.ptr, min(dst.size, src.size), passes)


def now_ns() -> int:
    return lib.tm_now_ns()

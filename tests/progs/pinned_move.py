"""Guest program (2 nodes): the kernel refuses to migrate pages a pipe holds (vmsplice).

64 pages are placed on node 1; 16 of them (every 4th) are vmspliced into a pipe, which
takes a reference on each page, so migrate_pages() fails for them (the kernel then returns
their number from move_pages(2) and stores no status for the batch). Moved to node 0 through
tiermem.native.move_pages and the NumaMover, then again after the pipe is drained.
Prints one JSON object."""
import ctypes
import fcntl
import json
import mmap
import os
import select

import numpy as np

from tiermem import native
from tiermem.movers import make_mover

N, PIN_EVERY = 64, 4
F_SETPIPE_SZ = 1031


class IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def main():
    libc = ctypes.CDLL(None, use_errno=True)
    size = N * native.PAGE_SIZE
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arr = np.frombuffer(buf, dtype=np.uint8)
    addr = arr.ctypes.data
    native.mbind(addr, size, native.MPOL_BIND, [1])
    arr[:] = 7
    native.mbind(addr, size, native.MPOL_DEFAULT)
    pages = addr + np.arange(N, dtype=np.uint64) * np.uint64(native.PAGE_SIZE)
    out = {"before": np.unique(native.query_nodes(0, pages)).tolist()}
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
    pinned = np.arange(0, N, PIN_EVERY)
    for i in pinned:
        iov = IOVec(int(pages[i]), native.PAGE_SIZE)
        n = libc.vmsplice(w, ctypes.byref(iov), 1, 0)
        if n != native.PAGE_SIZE:
            raise SystemExit(f"vmsplice: {os.strerror(ctypes.get_errno())}")
    st = native.move_pages(0, pages, 0)
    out["status_pinned"] = np.unique(st[pinned]).tolist()
    out["status_free"] = np.unique(np.delete(st, pinned)).tolist()
    out["where_after"] = np.unique(native.query_nodes(0, pages[pinned])).tolist()
    # the same through the daemon's mover: pages back to node 1 first, then promoted
    native.move_pages(0, pages, 1)
    mover = make_mover("numa", rate_bps=1e12, batch_pages=4096)
    o = mover.move(os.getpid(), pages, 0)
    out["mover"] = {"moved": o.n_moved, "failed": o.failed, "node_full": o.node_full}
    while select.select([r], [], [], 0)[0]:                  # drain: the pins go away
        os.read(r, 1 << 20)
    o = mover.move(os.getpid(), pages[pinned], 0)
    out["mover_after_drain"] = {"moved": o.n_moved, "failed": o.failed}
    out["data_ok"] = bool((arr == 7).all())
    print(json.dumps(out))


if __name__ == "__main__":
    main()

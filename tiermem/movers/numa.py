"""The NUMA mover: move_pages(2) in batches within a rate budget, honouring per-page status.

Per page, the kernel answers with the node the page is now on or -errno:
  * node == destination      moved
  * -EBUSY, -EACCES, -EIO... left where it is, counted; the policy may try again later
  * -EFAULT, -ENOENT         the page is no longer mapped/present: reported as gone
  * -ENOMEM                  the destination node is full: the rest of this request is not
                             attempted (it would fail the same way) and ``node_full`` is set;
                             a call that fails as a whole with ENOMEM is treated the same
A call-level ESRCH means the process exited: TargetGone is raised with the count moved so
far. Each call covers at most ``batch_pages`` pages; between calls the mover sleeps as long
as needed to stay within ``rate_bps``.
"""
from __future__ import annotations

import errno
import time

import numpy as np

from tiermem import native
from tiermem.errors import TiermemError
from tiermem.movers.base import MoveOutcome, Mover, TargetGone

PAGE = native.PAGE_SIZE


def errno_name(code: int) -> str:
    return errno.errorcode.get(int(code), f"E{int(code)}")


class NumaMover(Mover):
    name = "numa"

    def __init__(self, rate_bps: float, batch_pages: int, sleep=time.sleep):
        super().__init__(rate_bps, batch_pages)
        self._sleep = sleep

    def move(self, pid: int, addrs: np.ndarray, node: int) -> MoveOutcome:
        addrs = np.ascontiguousarray(addrs, dtype=np.uint64)
        out = MoveOutcome(node=node, requested=int(addrs.size))
        moved, gone = [], []
        t0 = time.monotonic()
        done_pages = 0
        for i in range(0, addrs.size, self.batch_pages):
            chunk = addrs[i:i + self.batch_pages]
            # pace: the pages moved so far may not take less time than the rate allows
            due = t0 + done_pages * PAGE / self.rate_bps
            wait = due - time.monotonic()
            if wait > 0:
                self._sleep(wait)
            try:
                status = native.move_pages(pid, chunk, node, native.MPOL_MF_MOVE)
            except OSError as e:
                out.seconds = time.monotonic() - t0
                if e.errno == errno.ESRCH:
                    raise TargetGone(f"process {pid} exited during a move "
                                     f"({sum(m.size for m in moved)} pages moved before)") \
                        from None
                if e.errno == errno.EPERM:
                    raise TiermemError(f"not allowed to move pages of PID {pid} "
                                       "(needs CAP_SYS_NICE): run as root") from None
                if e.errno == errno.ENOMEM:
                    # the kernel may fail the whole call when the destination node has no
                    # room (rather than per page): the same answer as per-page ENOMEM
                    out.add_failures({"ENOMEM": int(chunk.size)})
                    out.node_full = True
                    break
                if e.errno == errno.ENODEV:
                    raise TiermemError(f"node {node} is not online") from None
                raise TiermemError(f"move_pages on PID {pid}: {e.strerror}") from None
            out.batches += 1
            done_pages += chunk.size
            ok = status == node
            moved.append(chunk[ok])
            bad = status < 0
            if bad.any():
                codes = -status[bad]
                g = (codes == errno.EFAULT) | (codes == errno.ENOENT)
                gone.append(chunk[bad][g])
                c, n = np.unique(codes, return_counts=True)
                out.add_failures({errno_name(a): int(b) for a, b in zip(c, n)})
                if (codes == errno.ENOMEM).any():
                    out.node_full = True
                    break
        out.moved = np.concatenate(moved) if moved else out.moved
        out.gone = np.concatenate(gone) if gone else out.gone
        out.seconds = time.monotonic() - t0
        return out

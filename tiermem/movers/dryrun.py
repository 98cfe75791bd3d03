"""The dry-run mover: checks each page with a move_pages *query* (no move) and reports what a
real move would have been asked to do. Used by ``tiermemd --dry-run``."""
from __future__ import annotations

import errno
import time

import numpy as np

from tiermem import native
from tiermem.movers.base import MoveOutcome, Mover, TargetGone


class DryRunMover(Mover):
    name = "dry-run"

    def move(self, pid: int, addrs: np.ndarray, node: int) -> MoveOutcome:
        addrs = np.ascontiguousarray(addrs, dtype=np.uint64)
        out = MoveOutcome(node=node, requested=int(addrs.size), dry_run=True)
        t0 = time.monotonic()
        try:
            st = native.query_nodes(pid, addrs)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise TargetGone(f"process {pid} exited") from None
            raise
        codes = -st[st < 0]
        out.gone = addrs[(st == -errno.EFAULT) | (st == -errno.ENOENT)]
        if codes.size:
            c, n = np.unique(codes, return_counts=True)
            out.failed = {errno.errorcode.get(int(a), str(a)): int(b) for a, b in zip(c, n)}
        out.batches = (addrs.size + self.batch_pages - 1) // self.batch_pages
        out.seconds = time.monotonic() - t0
        return out

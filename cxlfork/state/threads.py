"""The other threads of a process. Checkpoint: each one's registers (its TLS is its fs_base),
xstate, blocked mask, sigaltstack, rseq, robust list, clear-child-tid address and name, the
last ones injected in that thread through the main thread's scratch page. Restore: the
restorer clones them (plan OP_THREAD, each parks at THREAD_PARK); cxlfork waits until all are
parked, then after the main thread's hand-over installs each one's mask, xstate and
registers and detaches it."""
from __future__ import annotations

import os

from cxlfork import image as image_mod, plan as plan_mod, procfs
from cxlfork.errors import CxlforkError
from cxlfork.native import ffi, lib
from cxlfork.ptrace import REGS_SIZE, restart_adjusted
from cxlfork.state import registers


def collect_one(t, main) -> dict:
    """Thread t's record, injected through main's syscall instruction and scratch page."""
    t.syscall_ip, t.scratch = main.syscall_ip, main.scratch
    altstack = t.sigaltstack()
    tid_address = t.tid_address()
    head, rlen = t.robust_list()
    status = procfs.status(t.pid)           # SigBlk: psutil does not have it
    return {"tid": t.pid, "regs": restart_adjusted(t.regs, live=False),
            "xstate": image_mod.b64(t.xstate()), "rseq": t.rseq(),
            "robust_list": {"head": head, "len": rlen}, "tid_address": tid_address,
            "altstack": altstack, "blocked": int(status["SigBlk"], 16),
            "comm": status.get("Name", "").strip()}


def collect(tr) -> list[dict]:
    """Every other thread of the frozen process (tr: the main thread, in its window)."""
    return [collect_one(t, tr) for t in tr.threads]


def packed(m: dict) -> list[tuple[bytes, bytes, int]]:
    """(registers, xstate, blocked mask) of each other thread, in creation order."""
    return [(*registers.packed(t), t["blocked"]) for t in m.get("threads", [])]


def wait_parked(pid: int, n: int, gofd: int) -> tuple[list[int], int]:
    """Let the restorer create its n threads and wait until each is parked; sends the second
    go byte. Returns (their tids, 0 or -errno)."""
    tids = ffi.new("int[]", n)
    e = lib.cx_wait_threads(pid, n, tids, plan_mod.THREAD_PARK, gofd, 30000)
    return [t for t in tids if t > 0], e


def finish(tids: list[int], recs: list[tuple[bytes, bytes, int]], k: int) -> None:
    """Install each parked thread's mask, xstate and registers and detach it (clone k)."""
    for tid, (tregs, txs, tmask) in zip(tids, recs):
        e = lib.cx_finish(tid, tregs, REGS_SIZE, txs, len(txs), tmask, 0)
        if e < 0:
            raise CxlforkError(f"installing the registers of a thread of clone "
                               f"{k}: {os.strerror(-e)}")

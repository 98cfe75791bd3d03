"""A task's own CPU and kernel state: general registers (an interrupted syscall rewound to run
again), xstate (FPU/SSE/AVX), rseq registration, robust futex list, clear-child-tid address.
Read with ptrace at checkpoint; at restore the plan re-registers rseq, robust list and tid
address, and cxlfork installs xstate and registers at the hand-over stop."""
from __future__ import annotations

import base64

from cxlfork import image as image_mod
from cxlfork.ptrace import regs_pack, restart_adjusted


def collect(tr, tid_address: int) -> dict:
    """The main thread's fields of the manifest (tid_address: injected in its window)."""
    head, rlen = tr.robust_list()
    return {
        "regs": restart_adjusted(tr.regs, live=False),
        "regs_at_freeze": {"rip": tr.regs["rip"], "orig_rax": tr.regs["orig_rax"],
                           "rax": tr.regs["rax"]},
        "xstate": image_mod.b64(tr.xstate()),
        "rseq": tr.rseq(),
        "robust_list": {"head": head, "len": rlen},
        "tid_address": tid_address,
    }


def packed(rec: dict) -> tuple[bytes, bytes]:
    """(registers, xstate) of a task record, as cx_finish installs them."""
    return regs_pack(rec["regs"]), base64.b64decode(rec["xstate"])

"""Signals: dispositions (rt_sigaction injected into the frozen process for every caught or
ignored signal), the sigaltstack and the blocked mask. Restored by the plan (sigactions,
sigaltstack) and at the hand-over (the mask, PTRACE_SETSIGMASK). An image whose process
ignores SIGSEGV is refused at restore: the restorer hands over through a SIGSEGV stop."""
from __future__ import annotations

from cxlfork.errors import CxlforkError


def collect(tr, status: dict) -> dict:
    """tr: the frozen main thread, inside its injection window."""
    caught = int(status["SigCgt"], 16) | int(status["SigIgn"], 16)
    actions = [tr.sigaction(s) for s in range(1, 65)
               if caught >> (s - 1) & 1 and s not in (9, 19)]
    return {"actions": actions, "blocked": int(status["SigBlk"], 16),
            "altstack": tr.sigaltstack()}


def check_restorable(m: dict, image: str) -> None:
    if any(a["sig"] == 11 and a["handler"] == 1 for a in m["signals"]["actions"]):
        raise CxlforkError(f"image {image}: the process ignores SIGSEGV (SIG_IGN); "
                           "cxlfork's restorer hands over through a SIGSEGV stop, which "
                           "would reset that disposition: not supported")

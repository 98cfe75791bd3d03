"""signalfds: the signal mask (fdinfo `sigmask`) and the status flags (O_NONBLOCK; FD_CLOEXEC
is the fd table's). Restore (`reopen`, per clone): signalfd(-1, mask, flags).

A signalfd reads the process's pending signals, which live in the process, not in the fd: they
are carried by cxlfork.state.pending (a signal pending at the checkpoint is read from the
clone's signalfd as from the original's)."""
from __future__ import annotations

import os

from cxlfork import procfs
from cxlfork.errors import CxlforkError
from cxlfork.native import lib

KIND = "signalfd"
LINK = "anon_inode:[signalfd]"
SFD_CLOEXEC, SFD_NONBLOCK = os.O_CLOEXEC, os.O_NONBLOCK


def collect(pid: int, f: dict, rec: dict) -> None:
    n = f["fd"]
    mask = None
    for line in procfs.read_text(pid, f"fdinfo/{n}").splitlines():
        k, _, v = line.partition(":")
        if k.strip() == "sigmask":
            mask = int(v.strip(), 16)
    if mask is None:
        raise CxlforkError(f"signalfd fd {n} of PID {pid}: no sigmask in its fdinfo")
    rec.update(kind=KIND, mask=mask)


def check_fd(v, f: dict, w: str) -> None:
    v.int_in(f, "mask", 0, 2**64, w)


def reopen(f: dict, flags: int, opened: list[int]) -> int:
    s = lib.cx_signalfd_make(f["mask"], SFD_CLOEXEC | (flags & SFD_NONBLOCK))
    if s < 0:
        raise CxlforkError(f"fd {f['fd']}: recreating the signalfd: {os.strerror(-s)}")
    opened.append(s)
    return s

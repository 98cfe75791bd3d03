"""timerfds: clock, interval, time left, TFD_TIMER_ABSTIME/TFD_TIMER_CANCEL_ON_SET, status
flags and the expirations not yet read.

Checkpoint (`collect`): /proc/PID/fdinfo/N shows `clockid`, `ticks`, `settime flags`,
`it_value` (the time left) and `it_interval`. `ticks` there counts a periodic timer's first
expiration only: the kernel re-arms it (and adds the overruns) when it is read. So when ticks
is above 0 the pending count is read through a pidfd_getfd copy and put straight back with
TFD_IOC_SET_TICKS (the original reads the same count later; its timer is re-armed by that read
as its own read would have), and fdinfo is read again for the time left. An absolute timer
(TFD_TIMER_ABSTIME) is stored as its deadline on its clock, a relative one as the time left.

Restore (`reopen`, per clone): timerfd_create on the same clock (REALTIME, MONOTONIC,
BOOTTIME, REALTIME_ALARM, BOOTTIME_ALARM), armed with the time left (or at the same absolute
deadline, with the same settime flags) and the interval, and the pending expirations set with
TFD_IOC_SET_TICKS, so the clone's first read returns at least the count the original had.
Not visible in fdinfo, so not carried: a TFD_TIMER_CANCEL_ON_SET timer already cancelled by a
clock change (the clone's timer is armed again)."""
from __future__ import annotations

import os
import re
import time

from cxlfork import procfs
from cxlfork.errors import CxlforkError
from cxlfork.native import ffi, lib

KIND = "timerfd"
LINK = "anon_inode:[timerfd]"
CLOCKS = {0: "CLOCK_REALTIME", 1: "CLOCK_MONOTONIC", 7: "CLOCK_BOOTTIME",
          8: "CLOCK_REALTIME_ALARM", 9: "CLOCK_BOOTTIME_ALARM"}
BASE_CLOCK = {0: 0, 1: 1, 7: 7, 8: 0, 9: 7}     # what clock_gettime reads for each
TFD_TIMER_ABSTIME = 1
TFD_FLAGS = 1 | 2                               # ABSTIME, CANCEL_ON_SET
TFD_CLOEXEC, TFD_NONBLOCK = os.O_CLOEXEC, os.O_NONBLOCK
NS = 10**9
_PAIR = re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)")


def parse(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        k, v = k.strip(), v.strip()
        if k == "clockid":
            out["clock"] = int(v)
        elif k == "ticks":
            out["ticks"] = int(v)
        elif k == "settime flags":
            out["settime"] = int(v, 8)
        elif k in ("it_value", "it_interval"):
            m = _PAIR.match(v)
            out[k] = int(m[1]) * NS + int(m[2])
    return out


def collect(pid: int, f: dict, rec: dict) -> None:
    n = f["fd"]
    where = f"timerfd fd {n} of PID {pid}"
    t = parse(procfs.read_text(pid, f"fdinfo/{n}"))
    if t.get("clock") not in CLOCKS or len(t) != 5:
        raise CxlforkError(f"{where}: unexpected fdinfo {t}")
    ticks = t["ticks"]
    if ticks:
        dfd = lib.cx_pidfd_getfd(pid, n)
        if dfd < 0:
            raise CxlforkError(f"pidfd_getfd({where}): {os.strerror(-dfd)}")
        try:
            out = ffi.new("uint64_t *")
            e = lib.cx_timerfd_take_ticks(dfd, out)
            if e < 0:
                raise CxlforkError(f"reading the expirations of {where}: {os.strerror(-e)}")
            ticks = int(out[0])
        finally:
            os.close(dfd)
        t = parse(procfs.read_text(pid, f"fdinfo/{n}"))
    left = t["it_value"]
    rec.update(kind=KIND, clock=t["clock"], settime=t["settime"] & TFD_FLAGS,
               interval_ns=t["it_interval"], ticks=ticks, value_ns=left)
    if left and t["settime"] & TFD_TIMER_ABSTIME:
        rec["deadline_ns"] = time.clock_gettime_ns(BASE_CLOCK[t["clock"]]) + left


def check_fd(v, f: dict, w: str) -> None:
    if v.int_in(f, "clock", 0, 16, w) not in CLOCKS:
        v.fail(f"{w}.clock", f"clock {f['clock']} is not supported")
    v.int_in(f, "settime", 0, TFD_FLAGS + 1, w)
    for k in ("interval_ns", "value_ns", "ticks"):
        v.int_in(f, k, 0, 2**62, w)
    if "deadline_ns" in f:
        v.int_in(f, "deadline_ns", 0, 2**63, w)


def reopen(f: dict, flags: int, opened: list[int]) -> int:
    fl = TFD_CLOEXEC | (TFD_NONBLOCK if flags & os.O_NONBLOCK else 0)
    value = f["value_ns"]
    settime = f["settime"]
    if value and settime & TFD_TIMER_ABSTIME:
        value = f["deadline_ns"]         # the same deadline (passed already: fires at once)
    elif not value:
        settime = 0
    iv = f["interval_ns"]
    s = lib.cx_timerfd_make(f["clock"], fl, settime, iv // NS, iv % NS, value // NS,
                            value % NS, f["ticks"])
    if s < 0:
        raise CxlforkError(f"fd {f['fd']}: recreating the timerfd ({CLOCKS[f['clock']]}): "
                           f"{os.strerror(-s)}")
    opened.append(s)
    return s


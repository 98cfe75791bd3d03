"""epoll fds: the whole interest list.

Checkpoint (`collect`): /proc/PID/fdinfo/N of an epoll fd has one line per interest entry,
`tfd: FD events: HEX data: HEX pos: P ino: I sdev: D`; events carries the flags the entry was
added with (EPOLLET, EPOLLONESHOT, EPOLLEXCLUSIVE, EPOLLWAKEUP, and the EPOLLERR|EPOLLHUP the
kernel adds). An entry is keyed by (file, fd number) in the kernel, so it can only be
recreated if that file is still open at that number: each entry is checked with
kcmp(KCMP_EPOLL_TFD) against the process's fd TFD; an entry whose fd was closed (the file
kept open through a dup) or reused for another file since EPOLL_CTL_ADD is refused, naming the
epoll fd, the entry's fd and inode. An epoll fd inside another one is an ordinary target.

What fdinfo cannot show, and so is not carried: which entries were ready (the ready list);
each target is polled again when it is added at restore, so a level-triggered entry reports
as before, an edge-triggered (EPOLLET) entry whose target is ready reports that readiness once
more. An EPOLLONESHOT entry that had fired and was not re-armed (events shows only the
flags) must come back disabled, but every EPOLL_CTL_ADD arms it at least for EPOLLERR|EPOLLHUP:
the plan adds such entries first (OP_EPOLL_FIRED), armed for everything when the target polls
ready, and lets them fire inside the restorer (epoll_wait), which disables them as in the
original; one whose target is not ready for anything at restore stays armed for
EPOLLERR/EPOLLHUP only (it reports a later hang-up once, where the original would not).

Restore: a new epoll fd per clone (`reopen`); its entries are added by the restorer's plan
(cxlfork.plan OP_EPOLL_CTL) once the clone's fd table is laid out, so each is keyed by the
same fd numbers as in the original (EPOLL_CTL_MOD/DEL by the program keep working)."""
from __future__ import annotations

import errno
import fcntl
import os
import re
import select

from cxlfork import procfs
from cxlfork.errors import CxlforkError, Refused
from cxlfork.native import lib

KIND = "epoll"
LINK = "anon_inode:[eventpoll]"
_TFD = re.compile(r"^tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)\s+data:\s*([0-9a-f]+)\s+pos:\s*(-?\d+)"
                  r"\s+ino:\s*([0-9a-f]+)\s+sdev:\s*([0-9a-f]+)")


def parse(text: str) -> list[dict]:
    """The interest entries of an epoll fdinfo text."""
    out = []
    for line in text.splitlines():
        m = _TFD.match(line.strip())
        if m:
            out.append({"tfd": int(m[1]), "events": int(m[2], 16), "data": int(m[3], 16),
                        "ino": int(m[5], 16), "sdev": int(m[6], 16)})
    return out


def collect(pid: int, f: dict, rec: dict) -> None:
    n = f["fd"]
    entries = parse(procfs.read_text(pid, f"fdinfo/{n}"))
    seen: dict[int, int] = {}
    out = []
    for e in entries:
        toff = seen.get(e["tfd"], 0)
        seen[e["tfd"]] = toff + 1
        r = lib.cx_kcmp_epoll_tfd(pid, e["tfd"], n, e["tfd"], toff)
        if r < 0 and r not in (-errno.EBADF, -errno.ENOENT):
            raise CxlforkError(f"kcmp(KCMP_EPOLL_TFD) of epoll fd {n} of PID {pid}: "
                               f"{os.strerror(-r)}")
        if r != 0:
            raise Refused(f"epoll fd {n} of PID {pid}: its interest entry for fd {e['tfd']} "
                          f"(inode {e['ino']}) is a file no longer open at fd {e['tfd']} "
                          "(closed or reused since EPOLL_CTL_ADD); such an entry cannot be "
                          "recreated: not supported")
        out.append({"tfd": e["tfd"], "events": e["events"], "data": e["data"]})
    rec.update(kind=KIND, entries=out)


def check_fd(v, f: dict, w: str) -> None:
    """Validate an epoll fd record (v: image._V)."""
    for j, e in enumerate(v.get(f, "entries", list, w)):
        ww = f"{w}.entries[{j}]"
        v.int_in(e, "tfd", 0, 1 << 20, ww)
        v.int_in(e, "events", 0, 2**32, ww)
        v.int_in(e, "data", 0, 2**64, ww)


def check_targets(fds: list[dict], image: str, fail) -> None:
    """Every entry's target must be an fd of the image."""
    nums = {f["fd"] for f in fds}
    for i, f in enumerate(fds):
        if f["kind"] == KIND and f.get("dup_of") is None:
            for j, e in enumerate(f["entries"]):
                if e["tfd"] not in nums or e["tfd"] == f["fd"]:
                    fail(f"fds[{i}].entries[{j}].tfd", f"fd {e['tfd']} is not another fd "
                         "of the image")


def reopen(f: dict, flags: int, opened: list[int]) -> int:
    """A new, empty epoll fd (its entries come from the plan)."""
    ep = select.epoll()
    s = os.dup(ep.fileno())
    ep.close()
    opened.append(s)
    if flags & os.O_NONBLOCK:
        fcntl.fcntl(s, fcntl.F_SETFL, os.O_NONBLOCK)
    return s


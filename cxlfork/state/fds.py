"""The fd table. Checkpoint (`collect`): every fd of /proc/PID/fd with its fdinfo, FD_CLOEXEC
and status flags; dups (the same open file description, kcmp) point at the first fd; fds 0-2
are stdio (they come from `restore --stdio`); every other fd goes to the module of its kind
(files, pipes, sockets and inet, eventfds), and kinds without one are refused with the fd named
(epoll, signalfd, timerfd, inotify, pidfd, io_uring, userfaultfd...).

Restore (`clone_fds`): per clone, the source fd in this process of every fd of the image, and
its number in the clone; the spawn (or the ghost) lays them out."""
from __future__ import annotations

import os

from cxlfork import procfs
from cxlfork.errors import ImageError, Refused
from cxlfork.native import lib
from cxlfork.state import eventfds, files, inet, pipes, sockets

O_CLOEXEC = 0o2000000
O_CREAT_ETC = os.O_CREAT | os.O_TRUNC | os.O_EXCL | os.O_NOCTTY


def collect(pid: int, objs) -> list[dict]:
    """The fd records of PID (objs: memory.Objects, which memfd fds join)."""
    out: list[dict] = []
    pipe_recs: list[dict] = []
    socks: list[dict] = []
    by_link: dict[str, list[int]] = {}
    for f in procfs.fds(pid):
        n, link, flags = f["fd"], f["link"], f["flags"]
        rec = {"fd": n, "flags": flags & ~O_CLOEXEC, "cloexec": bool(flags & O_CLOEXEC),
               "link": link}
        if n <= 2:
            rec["kind"] = "stdio"
            out.append(rec)
            continue
        # a dup of an earlier fd (same open file description)?
        dup = next((m for m in by_link.get(link, []) if lib.cx_kcmp_file(pid, m, n) == 0), None)
        by_link.setdefault(link, []).append(n)
        if dup is not None:
            src = next(r for r in out if r["fd"] == dup)
            rec.update(kind=src["kind"], dup_of=dup)
            out.append(rec)
            continue
        if link.startswith("/"):
            files.collect(pid, f, rec, objs)
        elif link.startswith("pipe:["):
            pipes.collect(f, rec)
            pipe_recs.append(rec)
        elif link == "anon_inode:[eventfd]":
            eventfds.collect(f, rec)
        elif link.startswith("socket:"):
            sockets.collect(pid, f, rec)
            socks.append(rec)
        else:
            raise Refused(f"fd {n} is {link}; this kind of fd is not supported yet")
        out.append(rec)
    sockets.finish(socks)
    pipes.finish(pid, pipe_recs)
    return out


def clone_fds(m: dict, stdio, opened: list[int], objfds: dict[int, int],
              where: str = "in the clone's network namespace", paths=None
              ) -> tuple[list[int], list[int]]:
    """(source fds in this process, their numbers in the clone) for one clone of m; every fd
    made here is appended to opened (the caller closes them once the clone has its own).
    objfds: the clone's shmem objects (memory.make_objects). Inet and named unix sockets are
    made in the calling thread's network namespace (where: its name, for messages); unix
    sockets bound to a path are bound at temporary paths of paths (mountns.TempSockets)."""
    src, dst = [], []
    by_num: dict[int, int] = {}
    io = files.stdio_fds(stdio, opened)
    pipes_made: dict = {}
    socks = sockets.recreate_all(m, opened)
    for f in m["fds"]:
        n, kind = f["fd"], f["kind"]
        flags = f["flags"] & ~O_CREAT_ETC
        if f.get("dup_of") is not None:
            s = by_num[f["dup_of"]]
        elif kind == "stdio":
            s = io[n] if n <= 2 else io[2]
        elif kind in files.KINDS:
            s = files.reopen(f, flags, objfds, opened)
        elif kind == "pipe":
            s = pipes.reopen(f, flags, pipes_made, opened)
        elif kind == "socket":
            s = sockets.reopen(f, flags, socks)
        elif kind in ("inet", "unix"):
            s = inet.make(f, where) if kind == "inet" else sockets.make_unix(f, where, paths)
            opened.append(s)
            sockets.set_nonblock(s, flags)
        elif kind == "eventfd":
            s = eventfds.reopen(f, flags, opened)
        else:  # validate() admits no other kind
            raise ImageError(f"fd {n}: unknown kind {kind}")
        by_num[n] = s
        src.append(s)
        dst.append(n)
    return src, dst

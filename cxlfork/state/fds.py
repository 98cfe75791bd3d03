"""The fd table. Checkpoint (`collect`): every fd of /proc/PID/fd with its fdinfo, FD_CLOEXEC
and status flags; dups (the same open file description, kcmp) point at the first fd; fds 0-2
are stdio (they come from `restore --stdio`, cxlfork.state.stdio); every other fd goes to
the module of its kind
(files, pipes, sockets and inet, eventfds, epoll, timerfd, signalfd, inotify; named FIFOs
and deleted files through files), and kinds without one are refused with the fd named
(fanotify, pidfd, io_uring, userfaultfd...).

Restore (`clone_fds`): per clone, the source fd in this process of every fd of the image, and
its number in the clone; the spawn (or the ghost) lays them out."""
from __future__ import annotations

import os

from cxlfork import procfs
from cxlfork.errors import ImageError, Refused
from cxlfork.native import lib
from cxlfork.state import (deleted, epoll, eventfds, fifos, files, inet, inotify, pipes,
                           signalfd, sockets, stdio as stdio_mod, timerfd)

O_CLOEXEC = 0o2000000
O_CREAT_ETC = os.O_CREAT | os.O_TRUNC | os.O_EXCL | os.O_NOCTTY
# anonymous-inode fds of the event and timer kinds, by their /proc/PID/fd link
ANON = {m.LINK: m for m in (epoll, timerfd, signalfd, inotify)}
ANON_KINDS = {m.KIND: m for m in ANON.values()}


def collect(pid: int, objs, tree_pipes=()) -> list[dict]:
    """The fd records of PID (objs: memory.Objects, which memfd fds join; tree_pipes: inodes
    of pipes whose other end may be in another process of the tree checkpointed)."""
    out: list[dict] = []
    pipe_recs: list[dict] = []
    socks: list[dict] = []
    by_link: dict[str, list[int]] = {}
    for f in procfs.fds(pid):
        n, link, flags = f["fd"], f["link"], f["flags"]
        rec = {"fd": n, "flags": flags & ~O_CLOEXEC, "cloexec": bool(flags & O_CLOEXEC),
               "link": link}
        tree_pipe = link.startswith("pipe:[") and int(link[6:-1]) in tree_pipes
        if n <= 2 and not tree_pipe:     # a tree's pipe on 0-2 (a pipeline) stays a pipe
            rec["kind"] = "stdio"
            stdio_mod.collect(pid, f, rec, [r for r in out if r["kind"] == "stdio"])
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
        elif link in ANON:
            ANON[link].collect(pid, f, rec)
        elif link == "anon_inode:[fanotify]":
            raise Refused(f"fd {n} is a fanotify fd ({link}); fanotify marks cannot be read "
                          "back from outside the process: not supported")
        else:
            raise Refused(f"fd {n} is {link}; this kind of fd is not supported yet")
        out.append(rec)
    sockets.finish(socks)
    pipes.finish(pid, pipe_recs, tree_pipes)
    return out


def clone_fds(m: dict, stdio, opened: list[int], objfds: dict[int, int],
              where: str = "in the clone's network namespace", paths=None,
              pipes_made: dict | None = None, given: dict[int, int] | None = None
              ) -> tuple[list[int], list[int]]:
    """(source fds in this process, their numbers in the clone) for one clone of m; every fd
    made here is appended to opened (the caller closes them once the clone has its own).
    objfds: the clone's shmem objects (memory.make_objects). Inet and named unix sockets are
    made in the calling thread's network namespace (where: its name, for messages); unix
    sockets bound to a path are bound at temporary paths of paths (mountns.TempSockets). A
    process of a tree (cxlfork.tree): pipes_made, the tree's pipes so far (shared by its
    processes); given, {fd: source fd} for the fds that share an open file description with
    another process's."""
    src, dst = [], []
    by_num: dict[int, int] = {}
    io = files.stdio_fds(stdio, opened, m)
    pipes_made = {} if pipes_made is None else pipes_made
    given = given or {}
    socks = sockets.recreate_all(m, opened)
    holds: dict[str, int] = {}            # named FIFOs held open while the clone's are opened
    for f in m["fds"]:
        n, kind = f["fd"], f["kind"]
        flags = f["flags"] & ~O_CREAT_ETC
        if f.get("dup_of") is not None:
            s = by_num[f["dup_of"]]
        elif n in given:
            s = given[n]
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
        elif kind in ANON_KINDS:
            s = ANON_KINDS[kind].reopen(f, flags, opened)
        elif kind == fifos.KIND:
            s = fifos.reopen(f, flags, holds, opened)
        elif kind == deleted.KIND:
            s = deleted.reopen(f, flags, objfds, opened)
        else:  # validate() admits no other kind
            raise ImageError(f"fd {n}: unknown kind {kind}")
        by_num[n] = s
        src.append(s)
        dst.append(n)
    return src, dst

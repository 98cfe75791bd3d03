"""Named FIFOs (mkfifo paths the process opened).

A named FIFO is a rendezvous by path: every process that opens the path shares one kernel
pipe. A clone reopens the same path with the same access mode and status flags, so it shares
that FIFO with the original and with whatever else opened it, like any two processes that
opened it. Bytes buffered in the FIFO at checkpoint are not copied into the image: they stay
in the FIFO, for whoever reads them first; `checkpoint --kill` is refused while the FIFO holds
bytes (the original's death could be the FIFO's last close, which drops them).

Checkpoint (`collect`): the path (it must still name the FIFO the fd is open on) and the bytes
buffered (FIONREAD on a pidfd_getfd copy). A FIFO whose path was deleted is refused (see
cxlfork.state.deleted). Restore (`reopen`): the path must still be a FIFO; the open must not
block, so the clone's FIFOs are opened while cxlfork holds the FIFO open read-write (`hold`,
closed once the clone has its fds), each O_NONBLOCK, then given the original's O_NONBLOCK."""
from __future__ import annotations

import fcntl
import os
import stat as stat_mod
import struct
import termios

from cxlfork.errors import CxlforkError, Refused
from cxlfork.native import lib

KIND = "fifo"


def collect(pid: int, f: dict, rec: dict, st: os.stat_result) -> None:
    n, link = f["fd"], f["link"]
    try:
        st2 = os.stat(link)
    except OSError:
        st2 = None
    if st2 is None or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
        raise Refused(f"fd {n}: the named FIFO {link} was renamed or replaced since it was "
                      "opened")
    dfd = lib.cx_pidfd_getfd(pid, n)
    if dfd < 0:
        raise CxlforkError(f"pidfd_getfd(fd {n}) of PID {pid}: {os.strerror(-dfd)}")
    try:
        queued = struct.unpack("i", fcntl.ioctl(dfd, termios.FIONREAD, b"\0" * 4))[0]
    finally:
        os.close(dfd)
    rec.update(kind=KIND, path=link, buffered=queued)


def refuse_on_kill(fds: list[dict]) -> None:
    """checkpoint --kill: refuse while a named FIFO holds bytes (see the module text)."""
    for f in fds:
        if f["kind"] == KIND and f.get("buffered"):
            raise Refused(f"fd {f['fd']} is the named FIFO {f['path']} with {f['buffered']} "
                          "bytes buffered; they stay in the FIFO, not in the image, and "
                          "killing the process could drop them: checkpoint with "
                          "--leave-running, or once they are read")


def check_fd(v, f: dict, w: str) -> None:
    if not v.get(f, "path", str, w).startswith("/"):
        v.fail(f"{w}.path", "expected an absolute path")
    v.int_in(f, "buffered", 0, 1 << 31, w)


def reopen(f: dict, flags: int, holds: dict, opened: list[int]) -> int:
    """holds: this clone's read-write holds on FIFOs, by path (their fds are in opened)."""
    n, path = f["fd"], f["path"]
    try:
        st = os.stat(path)
    except OSError as e:
        raise CxlforkError(f"fd {n}: named FIFO {path}: {e.strerror}") from e
    if not stat_mod.S_ISFIFO(st.st_mode):
        raise CxlforkError(f"fd {n}: {path} is no longer a named FIFO")
    try:
        if path not in holds:
            holds[path] = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            opened.append(holds[path])
        s = os.open(path, (flags & ~os.O_NONBLOCK) | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise CxlforkError(f"fd {n}: cannot reopen the named FIFO {path}: {e.strerror}") from e
    opened.append(s)
    if not flags & os.O_NONBLOCK:
        fcntl.fcntl(s, fcntl.F_SETFL, fcntl.fcntl(s, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return s

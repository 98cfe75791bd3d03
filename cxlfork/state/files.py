"""Fds of files named by path (regular files at their offsets, directories, the character
devices of CHR_OK and terminals) and of memfds (an fd on one of the process's shmem objects,
see memory.Objects); named FIFOs and deleted files are handed to cxlfork.state.fifos and
cxlfork.state.deleted. Refused: files renamed or replaced since they were opened, other
devices. Restore: reopened by path (or on the clone's own memfd)
with the same status flags, at the same offset; stdio comes from `restore --stdio`."""
from __future__ import annotations

import os
import stat as stat_mod

from cxlfork.errors import CxlforkError, Refused
from cxlfork.state import deleted, fifos, stdio as stdio_mod

KINDS = ("file", "dir", "chr", "memfd")
CHR_OK = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty",
          "/dev/console")


def collect(pid: int, f: dict, rec: dict, objs) -> None:
    """Fill rec for fd f (procfs.fds) whose link is a path."""
    n, link = f["fd"], f["link"]
    if link.startswith("/memfd:"):
        # a fresh open file description: seeking ours must not move the process's offset
        try:
            dfd = os.open(f"/proc/{pid}/fd/{n}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise CxlforkError(f"cannot open fd {n} of PID {pid}: {e.strerror}") from e
        name = link[len("/memfd:"):].removesuffix(" (deleted)")
        o = objs.add(dfd, "memfd", name)
        rec.update(kind="memfd", object=o["id"], pos=f["pos"])
        return
    if link.endswith(" (deleted)"):
        deleted.collect(pid, f, rec, objs)
        return
    st = os.stat(f"/proc/{pid}/fd/{n}")
    if stat_mod.S_ISFIFO(st.st_mode):
        fifos.collect(pid, f, rec, st)
        return
    try:
        st2 = os.stat(link)
    except OSError:
        st2 = None
    if st2 is None or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
        raise Refused(f"fd {n}: {link} was renamed or replaced since it was opened")
    if stat_mod.S_ISREG(st.st_mode):
        rec.update(kind="file", path=link, pos=f["pos"])
    elif stat_mod.S_ISDIR(st.st_mode):
        rec.update(kind="dir", path=link, pos=f["pos"])
    elif stat_mod.S_ISCHR(st.st_mode) and (link in CHR_OK or link.startswith("/dev/pts/")
                                             or link.startswith("/dev/tty")):
        rec.update(kind="chr", path=link, pos=f["pos"])
    else:
        raise Refused(f"fd {n} is a device or special file ({link}); not supported")


def reopen(f: dict, flags: int, objfds: dict[int, int], opened: list[int]) -> int:
    """A new open file description for fd record f (kind in KINDS), at its offset."""
    n, kind = f["fd"], f["kind"]
    if kind == "memfd":
        s = os.open(f"/proc/self/fd/{objfds[f['object']]}", flags | os.O_CLOEXEC)
        opened.append(s)
        os.lseek(s, f["pos"], os.SEEK_SET)
        return s
    try:
        s = os.open(f["path"], flags | os.O_CLOEXEC)
    except OSError as e:
        raise CxlforkError(f"fd {n}: cannot reopen {f['path']}: {e.strerror}") from e
    opened.append(s)
    if f["pos"] and kind != "chr":
        os.lseek(s, f["pos"], os.SEEK_SET)
    return s


def stdio_fds(stdio, opened: list[int], m: dict | None = None) -> list[int]:
    """The clone's fds 0-2 for image m: auto, original (cxlfork.state.stdio), inherit (ours),
    null, FILE (output appended there), or three fds of the caller's."""
    if isinstance(stdio, (tuple, list)):          # library callers: three fds of their own
        return list(stdio)
    if m is not None:
        stdio = stdio_mod.resolve(stdio, m)
        if stdio == "original":
            return stdio_mod.original_fds(m, opened)
    elif stdio in ("auto", "original"):
        stdio = "inherit"
    if stdio == "inherit":
        return [0, 1, 2]
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    opened.append(null)
    if stdio == "null":
        return [null, null, null]
    out = os.open(stdio, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    opened.append(out)
    return [null, out, out]

"""Pipes with both ends inside the process (fds 0-2 excepted: they come from `restore
--stdio`). Checkpoint: each fd's pipe inode and end; the bytes buffered in the pipe are
copied with tee(2) from a pidfd_getfd copy, without consuming them. Refused: a pipe whose
other end is outside the process. Restore: one new pipe per inode, refilled."""
from __future__ import annotations

import base64
import fcntl
import os

from cxlfork import image as image_mod
from cxlfork.errors import CxlforkError, Refused
from cxlfork.native import lib

O_ACCMODE = 0o3
F_SETPIPE_SZ = 1031


def collect(f: dict, rec: dict) -> None:
    link = f["link"]
    rec.update(kind="pipe", pipe=int(link[6:-1]),
               end="r" if (f["flags"] & O_ACCMODE) == os.O_RDONLY else "w")


def finish(pid: int, recs: list[dict], tree_pipes=()) -> None:
    """Refuse pipes with an end outside (tree_pipes: inodes whose ends are all in the
    process tree checkpointed); store each pipe's buffered bytes on its reader."""
    by_ino: dict[int, list[dict]] = {}
    for r in recs:
        by_ino.setdefault(r["pipe"], []).append(r)
    for ino, ends in by_ino.items():
        kinds = {e["end"] for e in ends}
        if kinds != {"r", "w"} and ino in tree_pipes:
            kinds = {"r", "w"}
            if not any(e["end"] == "r" for e in ends):
                continue                # the reader's process carries the bytes
        if kinds != {"r", "w"}:
            raise Refused(f"fd {ends[0]['fd']} is pipe:[{ino}] whose other end is outside the "
                          "process (only fds 0-2 may be, they come from restore --stdio)")
        reader = next(e for e in ends if e["end"] == "r")
        reader["data"] = image_mod.b64(_pipe_data(pid, reader["fd"]))


def _pipe_data(pid: int, fd: int) -> bytes:
    """The bytes buffered in a pipe, copied with tee(2) without consuming them."""
    dfd = lib.cx_pidfd_getfd(pid, fd)
    if dfd < 0:
        raise CxlforkError(f"pidfd_getfd(fd {fd}) of PID {pid}: {os.strerror(-dfd)}")
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
        n = lib.cx_tee(dfd, w, 1 << 20)
        if n < 0:
            raise CxlforkError(f"tee of pipe fd {fd}: {os.strerror(-n)}")
        return os.read(r, n) if n else b""
    finally:
        for x in (r, w, dfd):
            os.close(x)


def reopen(f: dict, flags: int, made: dict, opened: list[int]) -> int:
    """The clone's fd for pipe record f; made: this clone's pipes so far, by inode. The first
    record of each end gets the new pipe's end itself; another open file description of the
    same end (not a dup: the process opened it again, e.g. through /proc/self/fd/N) gets a
    new one too, opened through /proc/self/fd, so each keeps its own O_NONBLOCK."""
    if f["pipe"] not in made:
        r, w = os.pipe2(os.O_CLOEXEC)
        opened += [r, w]
        made[f["pipe"]] = {"r": r, "w": w, "given": set()}
    pipe = made[f["pipe"]]
    end = f["end"]
    if end in pipe["given"]:
        s = os.open(f"/proc/self/fd/{pipe[end]}",
                    (os.O_RDONLY if end == "r" else os.O_WRONLY) | os.O_NONBLOCK | os.O_CLOEXEC)
        opened.append(s)
    else:
        s = pipe[end]
        pipe["given"].add(end)
    if end == "r" and f.get("data") and not pipe.get("filled"):
        pipe["filled"] = True           # once, also when several processes read it
        data = base64.b64decode(f["data"])
        fcntl.fcntl(pipe["w"], F_SETPIPE_SZ, max(len(data), 4096))
        os.write(pipe["w"], data)
    fl = fcntl.fcntl(s, fcntl.F_GETFL)
    fcntl.fcntl(s, fcntl.F_SETFL, (fl & ~os.O_NONBLOCK) | (flags & os.O_NONBLOCK))
    return s

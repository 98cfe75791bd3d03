"""Deleted-but-open regular files (`/path (deleted)` in /proc/PID/fd).

Checkpoint (`collect`): the file's contents go into the image as a shmem object (see
memory.Objects: its data ranges are stored in the page file like a memfd's, holes stay
holes), keyed by inode, so two open file descriptions of one deleted file share one object.
Restore: each clone gets its own memfd holding those contents (memory.make_objects, named
`cxlfork-deleted:PATH`, with the file's mode), and each fd is a new open file description of
it with the original's status flags (O_APPEND, access mode...) and offset. In the clone the fd
shows as `/memfd:cxlfork-deleted:PATH (deleted)` on tmpfs; its writes go to the clone's copy.
Mappings of a deleted regular file (e.g. shm_open + shm_unlink) join the same object
(`map_object`, called by cxlfork.state.memory), so the clone's mappings and fds of it share
its memfd as the original's shared the file. Refused, naming the fd: a deleted FIFO,
directory or device."""
from __future__ import annotations

import os
import stat as stat_mod

from cxlfork.errors import CxlforkError, Refused

KIND = "deleted"


def collect(pid: int, f: dict, rec: dict, objs) -> None:
    n, link = f["fd"], f["link"]
    path = link.removesuffix(" (deleted)")
    try:
        st = os.stat(f"/proc/{pid}/fd/{n}")
    except OSError as e:
        raise CxlforkError(f"fd {n} of PID {pid}: {e.strerror}") from e
    if not stat_mod.S_ISREG(st.st_mode):
        what = "named FIFO" if stat_mod.S_ISFIFO(st.st_mode) else \
            "directory" if stat_mod.S_ISDIR(st.st_mode) else "special file"
        raise Refused(f"fd {n} is a deleted {what} ({link}); not supported")
    try:     # a new open file description: reading it must not move the process's offset
        dfd = os.open(f"/proc/{pid}/fd/{n}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise CxlforkError(f"cannot open fd {n} of PID {pid} ({link}): {e.strerror}") from e
    o = objs.add(dfd, KIND, path)
    rec.update(kind=KIND, object=o["id"], pos=f["pos"])


def check_fd(v, f: dict, w: str, obj_ids) -> None:
    if v.int_in(f, "object", 0, 2**31, w) not in obj_ids:
        v.fail(f"{w}.object", "no such object")
    v.int_in(f, "pos", 0, 1 << 62, w)


def reopen(f: dict, flags: int, objfds: dict[int, int], opened: list[int]) -> int:
    # O_NOFOLLOW (shm_open sets it) would refuse the /proc/self/fd magic link
    s = os.open(f"/proc/self/fd/{objfds[f['object']]}",
                (flags & ~os.O_NOFOLLOW) | os.O_CLOEXEC)
    opened.append(s)
    os.lseek(s, f["pos"], os.SEEK_SET)
    return s


def map_object(pid: int, start: int, end: int, path: str, objs):
    """The object of a mapping of a deleted regular file (None if it is not one)."""
    mf = f"/proc/{pid}/map_files/{start:x}-{end:x}"
    try:
        if not stat_mod.S_ISREG(os.stat(mf).st_mode):
            return None
        fd = os.open(mf, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise CxlforkError(f"mapping {start:#x}-{end:#x} of {path}: {e.strerror}") from e
    return objs.add(fd, KIND, path.removesuffix(" (deleted)"))

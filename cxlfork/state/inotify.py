"""inotify fds: every watch, re-added by path under its old watch descriptor.

Checkpoint (`collect`): /proc/PID/fdinfo/N has one line per watch, `inotify wd:W ino:I
sdev:D mask:M ignored_mask:0 fhandle-bytes:B fhandle-type:T f_handle:HEX`; mask keeps
IN_ONESHOT and IN_EXCL_UNLINK (IN_DONT_FOLLOW/IN_ONLYDIR/IN_MASK_ADD only act when a watch is
added). The file handle is opened with open_by_handle_at (a mount of the process with that
device as the mount fd) and its path read back from /proc/self/fd; the path must name that
inode again. Refused, naming the fd and the watch: a watch whose file was deleted, has no
path that leads to it, or sits on a filesystem without file handles; events queued and not
yet read (FIONREAD > 0 on a pidfd_getfd copy: they cannot be put back into a new inotify
queue); watch descriptors above MAX_WD.

Restore (`reopen`, per clone): inotify_init1, then the watches in increasing wd order. The
kernel hands out wds in sequence (idr_alloc_cyclic from 1), so each gap below a wanted wd
is used up by a watch on a scratch directory, removed again, and the IN_IGNORED events
those removals queue are read off before the clone gets the fd. Each path must still name
the checkpointed inode (same device and inode), else the restore fails naming it. Not
carried (fdinfo does not show it): the kernel's "last wd" cursor, so a new watch in the clone
gets the highest restored wd + 1, where the original would skip the numbers of watches it
removed after its highest live one."""
from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import stat as stat_mod
import struct
import tempfile
import termios

from cxlfork import procfs
from cxlfork.errors import CxlforkError, Refused
from cxlfork.native import lib

KIND = "inotify"
LINK = "anon_inode:inotify"
MAX_WD = 1 << 16
IN_DONT_FOLLOW = 0x02000000
IN_CLOEXEC, IN_NONBLOCK = os.O_CLOEXEC, os.O_NONBLOCK
_LINE = re.compile(r"^inotify wd:([0-9a-f]+) ino:([0-9a-f]+) sdev:([0-9a-f]+) mask:([0-9a-f]+)"
                   r" ignored_mask:[0-9a-f]+(?: fhandle-bytes:([0-9a-f]+) fhandle-type:"
                   r"([0-9a-f]+) f_handle:([0-9a-f]*))?")


def parse(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if m:
            out.append({"wd": int(m[1], 16), "ino": int(m[2], 16), "sdev": int(m[3], 16),
                        "mask": int(m[4], 16),
                        "fh_type": int(m[6], 16) if m[6] else None,
                        "fh": bytes.fromhex(m[7]) if m[7] else b""})
    return out


def _mount_points(pid: int) -> dict[tuple[int, int], list[str]]:
    """(major, minor) -> mount points of the process (from its mountinfo)."""
    out: dict[tuple[int, int], list[str]] = {}
    for line in procfs.read_text(pid, "mountinfo").splitlines():
        parts = line.split()
        if len(parts) > 4:
            ma, _, mi = parts[2].partition(":")
            mp = parts[4].encode().decode("unicode_escape")
            out.setdefault((int(ma), int(mi)), []).append(mp)
    return out


def _resolve(pid: int, w: dict, mounts, where: str) -> dict:
    """{path, dev, ino, symlink} of watch w."""
    dev = (w["sdev"] >> 20, w["sdev"] & 0xFFFFF)
    if w["fh_type"] is None or not w["fh"]:
        raise Refused(f"{where}: its filesystem (device {dev[0]}:{dev[1]}) gives no file "
                      "handle, so the watched file cannot be found by path: not supported")
    for mp in mounts.get(dev, []):
        try:
            mfd = os.open(f"/proc/{pid}/root{mp}", os.O_RDONLY | os.O_CLOEXEC)   # not O_PATH
        except OSError:
            continue
        try:
            fd = lib.cx_open_by_handle(mfd, w["fh_type"], w["fh"], len(w["fh"]),
                                       os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW)
        finally:
            os.close(mfd)
        if fd == -errno.ESTALE:
            break
        if fd < 0:
            continue
        try:
            st = os.fstat(fd)
            path = os.readlink(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        link = stat_mod.S_ISLNK(st.st_mode)
        try:
            st2 = os.stat(path, follow_symlinks=not link)
        except OSError:
            st2 = None
        if st2 is None or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino) or \
                st.st_ino != w["ino"]:
            raise Refused(f"{where}: the watched inode {w['ino']} has no path that leads to "
                          f"it ({path}); deleted or not reachable: not supported")
        return {"path": path, "dev": st.st_dev, "ino": st.st_ino, "symlink": link}
    raise Refused(f"{where}: the watched inode {w['ino']} (device {dev[0]}:{dev[1]}) cannot "
                  "be opened by its file handle (deleted, or no mount of it): not supported")


def collect(pid: int, f: dict, rec: dict) -> None:
    n = f["fd"]
    dfd = lib.cx_pidfd_getfd(pid, n)
    if dfd < 0:
        raise CxlforkError(f"pidfd_getfd(inotify fd {n} of PID {pid}): {os.strerror(-dfd)}")
    try:
        queued = struct.unpack("i", fcntl.ioctl(dfd, termios.FIONREAD, b"\0" * 4))[0]
    finally:
        os.close(dfd)
    if queued:
        raise Refused(f"inotify fd {n} of PID {pid} has {queued} bytes of events not yet "
                      "read; queued events cannot be carried: not supported (checkpoint "
                      "once the process has read them)")
    mounts = None
    watches = []
    for w in sorted(parse(procfs.read_text(pid, f"fdinfo/{n}")), key=lambda w: w["wd"]):
        where = f"inotify fd {n} of PID {pid}, watch descriptor {w['wd']}"
        if w["wd"] > MAX_WD:
            raise Refused(f"{where}: above {MAX_WD}; recreating the same number would take "
                          "as many watches: not supported")
        if mounts is None:
            mounts = _mount_points(pid)
        r = _resolve(pid, w, mounts, where)
        watches.append({"wd": w["wd"], "mask": w["mask"], **r})
    rec.update(kind=KIND, watches=watches)


def check_fd(v, f: dict, w: str) -> None:
    prev = 0
    for j, x in enumerate(v.get(f, "watches", list, w)):
        ww = f"{w}.watches[{j}]"
        wd = v.int_in(x, "wd", 1, MAX_WD + 1, ww)
        if wd <= prev:
            v.fail(f"{ww}.wd", "watch descriptors must increase")
        prev = wd
        v.int_in(x, "mask", 0, 2**32, ww)
        if not v.get(x, "path", str, ww).startswith("/"):
            v.fail(f"{ww}.path", "expected an absolute path")
        v.int_in(x, "dev", 0, 2**64, ww)
        v.int_in(x, "ino", 0, 2**64, ww)
        v.get(x, "symlink", bool, ww)


def reopen(f: dict, flags: int, opened: list[int]) -> int:
    n = f["fd"]
    s = lib.cx_inotify_init(IN_CLOEXEC | IN_NONBLOCK)
    if s < 0:
        raise CxlforkError(f"fd {n}: inotify_init1: {os.strerror(-s)}")
    opened.append(s)
    scratch = None
    try:
        nxt = 1
        for w in f["watches"]:
            try:
                st = os.stat(w["path"], follow_symlinks=not w["symlink"])
            except OSError as e:
                raise CxlforkError(f"fd {n}: inotify watch {w['wd']} on {w['path']}: "
                                   f"{e.strerror}") from e
            if (st.st_dev, st.st_ino) != (w["dev"], w["ino"]):
                raise CxlforkError(f"fd {n}: inotify watch {w['wd']}: {w['path']} is not the "
                                   "file it was at the checkpoint (replaced since)")
            while nxt < w["wd"]:         # use up the numbers below it
                if scratch is None:
                    scratch = tempfile.mkdtemp(prefix="cxlfork-inotify-")
                g = lib.cx_inotify_add(s, scratch.encode(), 0x100)
                if g < 0 or lib.cx_inotify_rm(s, g) < 0:
                    raise CxlforkError(f"fd {n}: filling inotify watch numbers: "
                                       f"{os.strerror(-g if g < 0 else errno.EIO)}")
                nxt = g + 1
            mask = w["mask"] | (IN_DONT_FOLLOW if w["symlink"] else 0)
            wd = lib.cx_inotify_add(s, w["path"].encode(), mask)
            if wd != w["wd"]:
                raise CxlforkError(f"fd {n}: inotify watch on {w['path']}: got watch "
                                   f"descriptor {wd}, not {w['wd']}")
            nxt = wd + 1
        while True:                      # the IN_IGNORED events of the scratch removals
            try:
                if not os.read(s, 65536):
                    break
            except BlockingIOError:
                break
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if not flags & os.O_NONBLOCK:
        fcntl.fcntl(s, fcntl.F_SETFL, fcntl.fcntl(s, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return s

"""A clone's own mount namespace, for unix sockets bound to a path.

The path of a bound unix socket is one file, shared by the original and every clone, so a
clone's socket cannot be bound there in our mount namespace (the original's file is in the
way, and unlinking it would take it from the original). Each clone with such sockets gets a
mount namespace of its own (`PathSockets.make`), made in a short-lived thread (a mount
namespace can only be entered by a thread that shares its filesystem attributes with no
other thread: `unshare(CLONE_FS | CLONE_NEWNS)`), "/" made private (nothing propagates
back), and per directory DIR holding such paths: an fd of DIR is kept, a tmpfs is mounted
over DIR (in that namespace only), the clone's sockets are made and bound at their very
paths (so `getsockname` gives the original path), each new socket file is bind-mounted over
the original's file through the kept fd of the real DIR, and the tmpfs is detached. In the
clone (and for `nsenter -t PID -m`) DIR is the real directory except that those paths are
the clone's sockets; everywhere else they are the original's. Nothing is left in the
filesystem: the tmpfs lives as long as the sockets that are bound in it.

The restorer is spawned from another short-lived thread that setns()es into that mount
namespace (and the clone's network namespace), so the child inherits both; a ghost gets the
namespace's fd in its restore message and setns()es into it itself.
"""
from __future__ import annotations

import os
import socket
import threading

from cxlfork.errors import CxlforkError
from cxlfork.native import ffi, lib

CLONE_FS, CLONE_NEWNS, CLONE_NEWNET = 0x200, 0x20000, 0x40000000
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MNT_DETACH = 2
SO_PASSCRED = 16


def _check(e: int, what: str) -> None:
    if e < 0:
        raise CxlforkError(f"{what}: {os.strerror(-e)}")


def _in_thread(fn):
    """fn() run in a new thread (its result, or its exception raised here)."""
    out: dict = {}

    def work():
        try:
            out["result"] = fn()
        except BaseException as e:        # handed to the caller
            out["error"] = e

    t = threading.Thread(target=work, name="cxlfork-mountns")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["result"]


def needed(m: dict) -> bool:
    return any(f["kind"] == "unix" and "path" in f for f in m["fds"])


class PathSockets:
    """The path-bound unix sockets of one clone: `make` builds its mount namespace and the
    sockets (fds, by fd number, in `fds`); `spawn(fn)` runs fn in a thread inside it."""

    def __init__(self, m: dict):
        self.recs = [f for f in m["fds"] if f["kind"] == "unix" and f.get("dup_of") is None
                     and "path" in f]
        self.fds: dict[int, int] = {}
        self.mnt_fd = -1

    def make(self, netns_fd: int, opened: list[int]) -> None:
        """Make the mount namespace and the sockets (appended to opened, as is the
        namespace's fd)."""
        if not self.recs:
            return

        def work():
            _check(lib.cx_unshare(CLONE_FS | CLONE_NEWNS),
                   "cannot make a mount namespace for the clone: unshare(CLONE_NEWNS)")
            _check(lib.cx_mount(b"none", b"/", ffi.NULL, MS_REC | MS_PRIVATE),
                   "making / private in the clone's mount namespace")
            if netns_fd >= 0:
                _check(lib.cx_setns(netns_fd, CLONE_NEWNET),
                       "setns into the clone's network namespace")
            by_dir: dict[str, list[dict]] = {}
            for f in self.recs:
                by_dir.setdefault(os.path.dirname(f["path"]), []).append(f)
            for d, recs in by_dir.items():
                self._make_dir(d, recs, opened)
            fd = os.open("/proc/thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            opened.append(fd)
            return fd

        self.mnt_fd = _in_thread(work)

    def _make_dir(self, d: str, recs: list[dict], opened: list[int]) -> None:
        try:
            real = os.open(d, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise CxlforkError(f"fd {recs[0]['fd']}: the directory of its socket, {d}: "
                               f"{e.strerror}") from e
        try:
            _check(lib.cx_mount(b"tmpfs", d.encode(), b"tmpfs", 0),
                   f"mounting a tmpfs over {d} in the clone's mount namespace")
            try:
                for f in recs:
                    fd = socket.socket(socket.AF_UNIX, f["sotype"] | socket.SOCK_CLOEXEC).detach()
                    opened.append(fd)
                    self.fds[f["fd"]] = fd
                    s = socket.socket(fileno=fd)
                    try:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, f["sndbuf"] // 2)
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, f["rcvbuf"] // 2)
                        if f["passcred"]:
                            s.setsockopt(socket.SOL_SOCKET, SO_PASSCRED, 1)
                        s.bind(f["path"])
                        os.chmod(f["path"], f["mode"])
                        if f["state"] == "listen":
                            s.listen(f["backlog"])
                    except OSError as e:
                        raise CxlforkError(f"fd {f['fd']}: making the clone's socket at "
                                           f"{f['path']}: {e.strerror}") from e
                    finally:
                        s.detach()
                for f in recs:
                    target = f"/proc/thread-self/fd/{real}/{os.path.basename(f['path'])}"
                    e = lib.cx_mount(f["path"].encode(), target.encode(), ffi.NULL, MS_BIND)
                    if e < 0:
                        gone = " (the original's socket file is gone)" if -e == 2 else ""
                        raise CxlforkError(f"fd {f['fd']}: cannot put the clone's socket at "
                                           f"{f['path']} in its mount namespace: "
                                           f"{os.strerror(-e)}{gone}")
            finally:
                lib.cx_umount2(d.encode(), MNT_DETACH)
        finally:
            os.close(real)

    def spawn(self, fn, netns_fd: int = -1):
        """fn() run in a thread inside the clone's mount (and network) namespace."""
        def work():
            _check(lib.cx_unshare(CLONE_FS), "unshare(CLONE_FS)")
            _check(lib.cx_setns(self.mnt_fd, CLONE_NEWNS),
                   "setns into the clone's mount namespace")
            if netns_fd >= 0:
                _check(lib.cx_setns(netns_fd, CLONE_NEWNET),
                       "setns into the clone's network namespace")
            return fn()
        return _in_thread(work)

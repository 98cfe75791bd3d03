"""Network namespaces for HTTP instances: a child's own namespace with loopback up, and sockets
the porter opens inside an instance's namespace to reach its server on 127.0.0.1.

    new_netns_in_child()   in a forked child before exec (Popen's preexec_fn):
                           unshare(CLONE_NEWNET), then bring `lo` up (SIOCSIFFLAGS)
    socket_in(ns_fd)       a TCP socket created inside the namespace ns_fd refers to (an open
                           /proc/PID/ns/net): a short-lived thread setns()es into it and
                           creates the socket; a socket keeps its namespace for life, so the
                           caller connects and talks from any thread
    ns_inode(pid)          the inode of a process's network namespace (its identity)

Python 3.11 has no os.unshare / os.setns: both are called in libc through ctypes.
A namespace lives as long as a process, an open /proc/PID/ns/net or a socket holds it: an
instance's owner closes its fd and sockets after the kill, so nothing is left behind.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import threading

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1

_libc = ctypes.CDLL(None, use_errno=True)


def _check(r: int, what: str) -> None:
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def lo_up() -> None:
    """Set IFF_UP on `lo` of the calling thread's network namespace."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
    finally:
        s.close()


def new_netns_in_child() -> None:
    """In a child between fork and exec: a network namespace of its own with loopback up
    (raises OSError; Popen reports it as the child's failure)."""
    _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
    lo_up()


def setns(fd: int) -> None:
    _check(_libc.setns(fd, CLONE_NEWNET), "setns(CLONE_NEWNET)")


def socket_in(ns_fd: int) -> socket.socket:
    """A new TCP/IPv4 socket inside the network namespace of ns_fd."""
    box: dict = {}

    def make():
        try:
            setns(ns_fd)                       # this thread only; it ends right after
            box["sock"] = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as e:
            box["error"] = e

    t = threading.Thread(target=make, name="netns-socket", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["sock"]


def ns_inode(pid: int | str = "self") -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino

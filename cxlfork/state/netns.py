"""Network namespaces: the clone's own, made at restore, and the socket's, read at checkpoint.

A network namespace belongs to a thread, so cxlfork makes one per clone by `unshare
(CLONE_NEWNET)` in a thread (`NetNs.make`), brings its loopback up and gives it the addresses
the image's sockets were bound to (RTM_NEWADDR on `lo`); the restoring thread enters it
(`enter`, setns), creates the clone's sockets there (a socket belongs to the namespace of the
thread that makes it), spawns the restorer from there (the child inherits the thread's
namespace) and goes back (`leave`). A ghost (cxlfork.ghosts), spawned earlier in cxlfork's
namespace, gets the namespace's fd in its restore message and `setns`es into it before it
runs the plan; a warm pool makes each ghost's namespace when it spawns the ghost, off the
restore path. The
namespace lives as long as the clone (no bind mount is made: nothing outlives it).

At checkpoint, `socket_ns(fd)` is the namespace a socket was made in (SIOCGSKNS), and
`inside(fd)` runs sock_diag queries there. For users of clones: `of(pid)` names a clone's
namespace, `connect(pid, address)` gives a socket connected inside it.
"""
from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import socket
import struct

from cxlfork.errors import CxlforkError
from cxlfork.native import lib

CLONE_NEWNET = 0x40000000
SIOCGSKNS = 0x894C
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
IFF_UP = 0x1
RTM_NEWADDR, NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL = 20, 1, 4, 0x400, 0x200
IFA_ADDRESS, IFA_LOCAL, IFA_F_NODAD = 1, 2, 0x02
NETLINK_ROUTE = 0


def ns_ino(fd_or_path) -> int:
    return os.stat(fd_or_path).st_ino


def of(pid: int) -> str:
    """The namespace of PID as the kernel names it (`net:[INODE]`)."""
    return os.readlink(f"/proc/{pid}/ns/net")


def socket_ns(sockfd: int) -> int:
    """An fd of the network namespace socket sockfd was made in (the caller closes it)."""
    return fcntl.ioctl(sockfd, SIOCGSKNS)


def _setns(fd: int, what: str) -> None:
    e = lib.cx_setns(fd, CLONE_NEWNET)
    if e < 0:
        raise CxlforkError(f"setns into {what}: {os.strerror(-e)}")


@contextlib.contextmanager
def inside(nsfd: int):
    """Run the body with the calling thread in network namespace nsfd, then go back."""
    if ns_ino(nsfd) == ns_ino("/proc/thread-self/ns/net"):
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(nsfd, "the socket's network namespace")
        try:
            yield
        finally:
            _setns(home, "cxlfork's own network namespace")
    finally:
        os.close(home)


def connect(pid: int, address, family: int = socket.AF_INET,
            timeout: float | None = None) -> socket.socket:
    """A TCP socket connected to address in PID's network namespace (e.g. a clone's
    listener: `connect(pid, ("127.0.0.1", 8000))`). It is made and connected there by the
    calling thread, which then goes back; the socket stays in that namespace and can be used
    from any thread."""
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with inside(fd):
            s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.settimeout(timeout)
                s.connect(address)
            except BaseException:
                s.close()
                raise
        return s
    finally:
        os.close(fd)


def _lo_up() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        req = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack_from("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))
    finally:
        s.close()


def _add_addr(family: int, addr: str) -> None:
    """Give lo (ifindex 1 in a new namespace) the address addr (/32 or /128, no DAD)."""
    raw = socket.inet_pton(family, addr)
    plen = 32 if family == socket.AF_INET else 128
    attrs = b""
    for typ in (IFA_LOCAL, IFA_ADDRESS):
        attrs += struct.pack("<HH", 4 + len(raw), typ) + raw
    body = struct.pack("<BBBBI", family, plen, IFA_F_NODAD, 0, 1) + attrs
    msg = struct.pack("<IHHII", 16 + len(body), RTM_NEWADDR,
                      NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, 1, 0) + body
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        s.send(msg)
        ans = s.recv(4096)
    finally:
        s.close()
    err = -struct.unpack_from("<i", ans, 16)[0] if len(ans) >= 20 else 0
    if err and err != 17:                    # EEXIST: 127.0.0.1, ::1 are there already
        raise CxlforkError(f"adding address {addr} to the clone's loopback: "
                           f"{os.strerror(err)}")


def local_addrs(m: dict) -> list[tuple[int, str]]:
    """The specific (not wildcard, not loopback) addresses the image's inet sockets were
    bound to: the clone's namespace gets them on its loopback."""
    out = []
    for f in m["fds"]:
        if f["kind"] == "inet" and f.get("dup_of") is None and f["state"] != "reset":
            a = ipaddress.ip_address(f["addr"])
            if a.version == 6 and a.ipv4_mapped is not None:     # ::ffff:a.b.c.d
                a = a.ipv4_mapped
            if a.is_unspecified or a.is_loopback:
                continue
            fam = socket.AF_INET if a.version == 4 else socket.AF_INET6
            if (fam, str(a)) not in out:
                out.append((fam, str(a)))
    return out


def needed(m: dict) -> bool:
    """Does a clone of m get a network namespace of its own (inet or named unix sockets)?"""
    return any(f["kind"] in ("inet", "unix") for f in m["fds"])


class NetNs:
    """A new network namespace for one clone (`make`): `fd` holds it. `enter()` puts the
    calling thread in it until `leave()`; `close()` leaves and drops our reference (the
    clone keeps its own)."""

    def __init__(self, fd: int):
        self.fd, self.home = fd, -1

    @classmethod
    def make(cls, m: dict) -> "NetNs":
        """A namespace with lo up and m's bound addresses on it; the calling thread is back
        in its own namespace when this returns."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        e = lib.cx_unshare(CLONE_NEWNET)
        if e < 0:
            os.close(home)
            hint = {1: " (needs CAP_SYS_ADMIN; --netns host restores into this namespace "
                       "instead)",
                    28: " (too many network namespaces: user.max_net_namespaces)"}
            raise CxlforkError(f"cannot make a network namespace for the clone: "
                               f"unshare(CLONE_NEWNET): {os.strerror(-e)}{hint.get(-e, '')}")
        self = cls(-1)
        self.home = home
        try:
            self.fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            _lo_up()
            for family, addr in local_addrs(m):
                _add_addr(family, addr)
        except OSError as e:
            self.close()
            raise CxlforkError(f"setting up the clone's network namespace: {e.strerror}") from e
        except BaseException:
            self.close()
            raise
        self.leave()
        return self

    def enter(self) -> None:
        if self.home < 0:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(self.fd, "the clone's network namespace")
            except BaseException:
                os.close(home)
                raise
            self.home = home

    def leave(self) -> None:
        if self.home >= 0:
            _setns(self.home, "cxlfork's own network namespace")
            os.close(self.home)
            self.home = -1

    def close(self) -> None:
        self.leave()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

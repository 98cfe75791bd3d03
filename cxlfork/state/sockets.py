"""Sockets: AF_UNIX socketpairs with both ends inside the process, checkpointed and recreated;
other unix sockets (listening or bound to an abstract name, unbound, connections to outside);
inet sockets are handed to cxlfork.state.inet.

Checkpoint (`collect`, then `finish` over all of them): a copy of the socket is taken with pidfd_getfd; its domain, type and
name (getsockopt/getsockname) and its peer, shutdown state and queue (NETLINK_SOCK_DIAG,
UNIX_DIAG_PEER/SHUTDOWN) are read; the bytes or datagrams queued for reading are peeked
without being consumed (SO_PEEK_OFF from 0, MSG_PEEK until EAGAIN; SO_PEEK_OFF is put back
to -1); shut-down bits (UNIX_DIAG_SHUTDOWN) are kept. A listening or bound unix socket with
an abstract name (kind unix) keeps its name, backlog (UNIX_DIAG_RQLEN) and SO_PASSCRED: the
clone's own network namespace (abstract names are per namespace) lets it bind the same name.
A connected end whose peer is outside the process (or closed) is a connection the clone
cannot own: kind unix, state reset. One bound to a path keeps its path and the socket file's
mode (the clone gets it in a mount namespace of its own, cxlfork.state.mountns). Refused,
with the fd named: other domains, a path whose socket file is gone, SO_PEEK_OFF, SO_PASSCRED on a
connected socket, fds or credentials in flight (SCM_RIGHTS/SCM_CREDENTIALS), empty
datagrams. Restore (`recreate_all`, `reopen`, `make_unix`): socketpair(2) of the same type,
buffer sizes, then each end's queue is sent from the other end (stream: the bytes;
datagram/seqpacket: message by message), then the shutdowns.
"""
from __future__ import annotations

import base64
import errno
import fcntl
import os
import socket
import stat
import struct

from cxlfork import image as image_mod
from cxlfork.errors import CxlforkError, Refused
from cxlfork.native import lib
from cxlfork.state import inet, netns

NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY = 4, 20
UDIAG_SHOW_PEER, UDIAG_SHOW_RQLEN = 0x4, 0x10
UNIX_DIAG_PEER, UNIX_DIAG_RQLEN, UNIX_DIAG_SHUTDOWN = 2, 4, 6
SO_PEEK_OFF, SO_PASSCRED, SO_DOMAIN, SO_ACCEPTCONN = 42, 16, 39, 30
TYPES = {socket.SOCK_STREAM: "SOCK_STREAM", socket.SOCK_DGRAM: "SOCK_DGRAM",
         socket.SOCK_SEQPACKET: "SOCK_SEQPACKET"}
MAX_QUEUE = 64 << 20          # bytes peeked per end at most


def _diag(ino: int) -> dict:
    """peer inode (0: none) and shutdown bits of the unix socket with inode ino."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                      NETLINK_SOCK_DIAG)
    try:
        req = struct.pack("<BBHIIIII", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, ino,
                          UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN, 0xFFFFFFFF, 0xFFFFFFFF)
        s.send(struct.pack("<IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY, 1, 1, 0) + req)
        d = s.recv(65536)
    finally:
        s.close()
    ln, typ = struct.unpack_from("<IH", d)
    if typ != SOCK_DIAG_BY_FAMILY or ln < 32:
        raise CxlforkError(f"sock_diag of unix socket {ino}: no answer (type {typ})")
    out = {"peer": 0, "shutdown": 0, "backlog": 0}
    off = 16 + 16                           # nlmsghdr + unix_diag_msg
    while off + 4 <= ln:
        alen, atyp = struct.unpack_from("<HH", d, off)
        if alen < 4:
            break
        if atyp == UNIX_DIAG_PEER:
            out["peer"] = struct.unpack_from("<I", d, off + 4)[0]
        elif atyp == UNIX_DIAG_RQLEN and alen >= 12:   # listening: wqueue is the backlog
            out["backlog"] = struct.unpack_from("<I", d, off + 8)[0]
        elif atyp == UNIX_DIAG_SHUTDOWN:
            out["shutdown"] = d[off + 4]
        off += (alen + 3) & ~3
    return out


def _peek_all(s: socket.socket, fd: int, stream: bool, rcv_shut: bool = False) -> list[bytes]:
    """Everything queued for reading on s, without consuming it (rcv_shut: s is shut down
    for reading, so an empty read is its end, not an empty datagram)."""
    msgs: list[bytes] = []
    total = 0
    cspace = socket.CMSG_SPACE(4 * 64) + socket.CMSG_SPACE(12)
    # a datagram is at most the sender's buffer (it had to fit there): one buffer that size
    size = 1 << 16 if stream else max(1 << 16, 2 * s.getsockopt(socket.SOL_SOCKET,
                                                                  socket.SO_SNDBUF),
                                      2 * s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    try:
        while True:
            try:
                data, anc, flags, _ = s.recvmsg(size, cspace,
                                                socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            if anc:
                for level, typ, payload in anc:
                    if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                        for k in range(len(payload) // 4):
                            os.close(struct.unpack_from("<i", payload, 4 * k)[0])
                raise Refused(f"fd {fd}: a socketpair with file descriptors or credentials "
                              "in flight (SCM_RIGHTS/SCM_CREDENTIALS); not supported")
            if flags & socket.MSG_TRUNC and not stream:
                raise Refused(f"fd {fd}: a datagram of more than {size} bytes queued on a "
                              "socketpair; not supported")
            if not data:
                if stream or rcv_shut:
                    break
                raise Refused(f"fd {fd}: a socketpair with an empty datagram queued; "
                              "not supported")
            total += len(data)
            if total > MAX_QUEUE:
                raise Refused(f"fd {fd}: more than {MAX_QUEUE >> 20} MiB queued on a "
                              "socketpair; not supported")
            msgs.append(data)
    finally:
        s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, -1)
    return [b"".join(msgs)] if stream and msgs else msgs


def _unix_kind(s: socket.socket, pid: int, fd: int, link: str, typ: int, d: dict) -> dict:
    """The record of a unix socket that is not a socketpair end: listening or bound to an
    abstract name (kind unix, state listen/bound), or unbound and unconnected (unbound).
    A name in the filesystem is refused."""
    name = s.getsockname()
    path = name if isinstance(name, str) and name else None
    mode = None
    if path is not None:
        try:
            st = os.stat(f"/proc/{pid}/root{path}" if path.startswith("/") else path)
        except OSError:
            st = None
        if not path.startswith("/") or st is None or not stat.S_ISSOCK(st.st_mode):
            raise Refused(f"fd {fd} is a unix socket bound to the path {path} ({link}), which "
                          "is not an absolute path to a socket file any more (a clone's socket "
                          "is mounted over that file); not supported")
        mode = stat.S_IMODE(st.st_mode)
        name = b""
    listening = bool(s.getsockopt(socket.SOL_SOCKET, SO_ACCEPTCONN))
    rec = {"kind": "unix", "sotype": typ, "name": image_mod.b64(name[1:] if name else b""),
           "state": "listen" if listening else ("bound" if name or path else "unbound"),
           "backlog": d["backlog"] if listening else 0,
           "passcred": bool(s.getsockopt(socket.SOL_SOCKET, SO_PASSCRED)),
           "sndbuf": s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
           "rcvbuf": s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)}
    if path is not None:
        rec.update(path=path, mode=mode)
    return rec


def _collect_socket(pid: int, dfd: int, fd: int, link: str) -> dict:
    """The socket at fd of the target (dfd: our copy, closed here): the fields of its fd
    record: a socketpair end (kind socket; its peer must be found among the process's fds
    by the caller, `peer` inode), another unix socket (kind unix) or an inet one (kind inet)."""
    s = socket.socket(fileno=dfd)
    try:
        dom = s.getsockopt(socket.SOL_SOCKET, SO_DOMAIN)
        typ = s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        if dom in (socket.AF_INET, socket.AF_INET6):
            return inet.collect(s, fd, link, dom, typ)
        if dom != socket.AF_UNIX:
            name = {socket.AF_NETLINK: "AF_NETLINK", socket.AF_PACKET: "AF_PACKET"
                    }.get(dom, f"domain {dom}")
            raise Refused(f"fd {fd} is an {name} socket ({link}); only unix and inet (TCP, "
                          "UDP) sockets are supported")
        if typ not in TYPES:
            raise Refused(f"fd {fd} is a unix socket of type {typ} ({link}); not supported")
        ino = os.fstat(s.fileno()).st_ino
        nsfd = netns.socket_ns(s.fileno())
        try:
            with netns.inside(nsfd):
                d = _diag(ino)
        finally:
            os.close(nsfd)
        if s.getsockopt(socket.SOL_SOCKET, SO_ACCEPTCONN) or not d["peer"]:
            return _unix_kind(s, pid, fd, link, typ, d)
        if s.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF) != -1:
            raise Refused(f"fd {fd}: a socketpair with SO_PEEK_OFF set ({link}); not supported")
        if s.getsockopt(socket.SOL_SOCKET, SO_PASSCRED):
            raise Refused(f"fd {fd}: a connected unix socket with SO_PASSCRED ({link}); "
                          "not supported")
        queue = _peek_all(s, fd, typ == socket.SOCK_STREAM, bool(d["shutdown"] & 1))
        return {"kind": "socket", "sotype": typ, "ino": ino, "peer": d["peer"],
                "shutdown": d["shutdown"],
                "sndbuf": s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
                "rcvbuf": s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), "queue": queue}
    finally:
        s.close()


def pair_up(recs: list[dict]) -> None:
    """Give the socketpair records of one process their pair id (the lower inode) and end (0
    for the lower inode). An end whose peer is outside the process is a connection the clone
    cannot own: it becomes kind unix, state reset (its queue is left to the original)."""
    by_ino = {r["ino"]: r for r in recs if r["kind"] == "socket"}
    for r in list(by_ino.values()):
        if r["peer"] not in by_ino:
            typ = r["sotype"]
            for k in list(r):
                if k not in ("fd", "flags", "cloexec", "link"):
                    del r[k]
            r.update(kind="unix", sotype=typ, state="reset", name="", backlog=0,
                     passcred=False, sndbuf=0, rcvbuf=0)
            continue
        r["pair"] = min(r["ino"], r["peer"])
        r["end"] = 0 if r["ino"] < r["peer"] else 1


def recreate(sotype: int, ends: tuple[dict, dict]) -> tuple[int, int]:
    """A new socketpair for two fd records (end 0, end 1): buffer sizes set, each end's queue
    sent from the other end. Returns the two fds (close-on-exec, blocking)."""
    a, b = socket.socketpair(socket.AF_UNIX, sotype | socket.SOCK_CLOEXEC)
    try:
        socks = (a, b)
        for s, rec in zip(socks, ends):
            # the kernel doubles what is set: half of what getsockopt reported
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rec["sndbuf"] // 2)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rec["rcvbuf"] // 2)
        for k, rec in enumerate(ends):
            src = socks[1 - k]
            src.setblocking(False)
            for msg in rec["queue"]:
                try:
                    n = src.send(msg)
                except BlockingIOError:
                    n = -1
                if n != len(msg):
                    raise CxlforkError(f"fd {rec['fd']}: its queued socketpair data "
                                       f"({sum(map(len, rec['queue']))} bytes) does not fit "
                                       "into a new socketpair")
            src.setblocking(True)
        # shut-down ends: after the queues are in (a stream pair propagates each shutdown
        # to the peer, so the union of both ends' calls gives the checkpointed bits back)
        for s, rec in zip(socks, ends):
            if rec.get("shutdown", 0) & 3:
                s.shutdown((rec["shutdown"] & 3) - 1)   # RCV 1 -> SHUT_RD 0, SEND 2 -> WR 1
        return a.detach(), b.detach()
    except OSError as e:
        raise CxlforkError(f"recreating a socketpair: {os.strerror(e.errno or errno.EIO)}") from e
    finally:
        a.close()
        b.close()


def collect(pid: int, f: dict, rec: dict) -> None:
    """Fill rec for socket fd f (procfs.fds) of PID; refuses what is not a socketpair end."""
    n = f["fd"]
    dfd = lib.cx_pidfd_getfd(pid, n)
    if dfd < 0:
        raise CxlforkError(f"pidfd_getfd(fd {n}) of PID {pid}: {os.strerror(-dfd)}")
    rec.update(_collect_socket(pid, dfd, n, f["link"]))


def finish(recs: list[dict]) -> None:
    """Pair up the socket records of one process; their queues into base64."""
    pair_up(recs)
    for r in recs:
        if r["kind"] != "socket":
            continue
        r["queue"] = [image_mod.b64(q) for q in r["queue"]]
        del r["ino"], r["peer"]


def recreate_all(m: dict, opened: list[int]) -> dict[int, tuple[int, int]]:
    """A new socketpair, queues refilled, for each pair of the image: {pair: (end 0, end 1)}."""
    ends: dict[int, list] = {}
    for f in m["fds"]:
        if f["kind"] == "socket" and f.get("dup_of") is None:
            rec = dict(f, queue=[base64.b64decode(q) for q in f["queue"]])
            ends.setdefault(f["pair"], [None, None])[f["end"]] = rec
    out = {}
    for pair, (e0, e1) in ends.items():
        out[pair] = recreate(e0["sotype"], (e0, e1))
        opened += out[pair]
    return out


def make_unix(f: dict, where: str, paths=None) -> int:
    """A new socket for unix record f (listen/bound: same abstract name, in the calling
    thread's network namespace; a path: the one paths (mountns.PathSockets) made; unbound;
    reset: a socketpair end whose peer has gone with data unread, so a stream end reads
    ECONNRESET, then EOF); close-on-exec, blocking."""
    typ = f["sotype"]
    if "path" in f:             # made in the clone's mount namespace (cxlfork.state.mountns)
        return os.dup(paths.fds[f["fd"]])
    if f["state"] == "reset":
        a, b = socket.socketpair(socket.AF_UNIX, typ | socket.SOCK_CLOEXEC)
        try:
            if typ != socket.SOCK_DGRAM:
                b.send(b"x")        # unread by a when it closes: b gets ECONNRESET
        finally:
            a.close()
        return b.detach()
    s = socket.socket(socket.AF_UNIX, typ | socket.SOCK_CLOEXEC)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, f["sndbuf"] // 2)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, f["rcvbuf"] // 2)
        if f["passcred"]:
            s.setsockopt(socket.SOL_SOCKET, SO_PASSCRED, 1)
        if f["state"] in ("listen", "bound"):
            name = b"\0" + base64.b64decode(f["name"])
            try:
                s.bind(name)
            except OSError as e:
                shown = name[1:].decode(errors="backslashreplace")
                raise CxlforkError(f"fd {f['fd']}: cannot bind the abstract unix socket "
                                   f"@{shown} {where}: {e.strerror}") from e
        if f["state"] == "listen":
            s.listen(f["backlog"])
        return s.detach()
    except OSError as e:
        raise CxlforkError(f"fd {f['fd']}: recreating a unix socket: {e.strerror}") from e
    finally:
        s.close()


def set_nonblock(s: int, flags: int) -> int:
    fl = fcntl.fcntl(s, fcntl.F_GETFL)
    fcntl.fcntl(s, fcntl.F_SETFL, (fl & ~os.O_NONBLOCK) | (flags & os.O_NONBLOCK))
    return s


def reopen(f: dict, flags: int, socks: dict[int, tuple[int, int]]) -> int:
    """The clone's fd for socket record f, with its O_NONBLOCK."""
    return set_nonblock(socks[f["pair"]][f["end"]], flags)

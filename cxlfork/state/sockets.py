"""Sockets: AF_UNIX socketpairs with both ends inside the process, checkpointed and recreated.

Checkpoint (`collect`, then `finish` over all of them): a copy of the socket is taken with pidfd_getfd; its domain, type and
name (getsockopt/getsockname) and its peer, shutdown state and queue (NETLINK_SOCK_DIAG,
UNIX_DIAG_PEER/SHUTDOWN) are read; the bytes or datagrams queued for reading are peeked
without being consumed (SO_PEEK_OFF from 0, MSG_PEEK until EAGAIN; SO_PEEK_OFF is put back
to -1). Refused, with the fd named: other domains, named or listening unix sockets, a pair
whose other end is outside the process or closed, a shut-down end, SO_PEEK_OFF or
SO_PASSCRED in use, fds or credentials in flight (SCM_RIGHTS/SCM_CREDENTIALS), empty
datagrams. Restore (`recreate_all`, `reopen`): socketpair(2) of the same type, buffer sizes, then each end's
queue is sent from the other end (stream: the bytes; datagram/seqpacket: message by message).
"""
from __future__ import annotations

import base64
import errno
import fcntl
import os
import socket
import struct

from cxlfork import image as image_mod
from cxlfork.errors import CxlforkError, Refused
from cxlfork.native import lib

NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY = 4, 20
UDIAG_SHOW_PEER, UDIAG_SHOW_RQLEN = 0x4, 0x10
UNIX_DIAG_PEER, UNIX_DIAG_SHUTDOWN = 2, 6
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
    out = {"peer": 0, "shutdown": 0}
    off = 16 + 16                           # nlmsghdr + unix_diag_msg
    while off + 4 <= ln:
        alen, atyp = struct.unpack_from("<HH", d, off)
        if alen < 4:
            break
        if atyp == UNIX_DIAG_PEER:
            out["peer"] = struct.unpack_from("<I", d, off + 4)[0]
        elif atyp == UNIX_DIAG_SHUTDOWN:
            out["shutdown"] = d[off + 4]
        off += (alen + 3) & ~3
    return out


def _peek_all(s: socket.socket, fd: int, stream: bool) -> list[bytes]:
    """Everything queued for reading on s, without consuming it."""
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
                if stream:
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


def _collect_socket(dfd: int, fd: int, link: str) -> dict:
    """The socketpair end at fd of the target (dfd: our copy, closed here): the fields of
    its fd record (kind socket). Its peer must be found among the process's fds by the
    caller (`peer` inode)."""
    s = socket.socket(fileno=dfd)
    try:
        dom = s.getsockopt(socket.SOL_SOCKET, SO_DOMAIN)
        typ = s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        if dom != socket.AF_UNIX:
            name = {socket.AF_INET: "AF_INET", socket.AF_INET6: "AF_INET6",
                    socket.AF_NETLINK: "AF_NETLINK"}.get(dom, f"domain {dom}")
            raise Refused(f"fd {fd} is an {name} socket ({link}); only AF_UNIX socketpairs "
                          "are supported")
        if typ not in TYPES:
            raise Refused(f"fd {fd} is a unix socket of type {typ} ({link}); not supported")
        if s.getsockopt(socket.SOL_SOCKET, SO_ACCEPTCONN):
            raise Refused(f"fd {fd} is a listening unix socket ({link}); only socketpairs "
                          "are supported")
        if s.getsockname() or s.getsockopt(socket.SOL_SOCKET, SO_PASSCRED):
            what = "a named (bound) unix socket" if s.getsockname() else \
                "a unix socket with SO_PASSCRED"
            raise Refused(f"fd {fd} is {what} ({link}); only unnamed socketpairs are "
                          "supported")
        if s.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF) != -1:
            raise Refused(f"fd {fd}: a socketpair with SO_PEEK_OFF set ({link}); not supported")
        ino = os.fstat(s.fileno()).st_ino
        d = _diag(ino)
        if not d["peer"]:
            raise Refused(f"fd {fd} is a unix socket ({link}) with no peer (not connected, or "
                          "its other end was closed); only socketpairs are supported")
        if d["shutdown"]:
            raise Refused(f"fd {fd}: a socketpair end that was shut down ({link}); "
                          "not supported")
        queue = _peek_all(s, fd, typ == socket.SOCK_STREAM)
        return {"kind": "socket", "sotype": typ, "ino": ino, "peer": d["peer"],
                "sndbuf": s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
                "rcvbuf": s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), "queue": queue}
    finally:
        s.close()


def pair_up(recs: list[dict]) -> None:
    """Give the socket records of one process their pair id (the lower inode) and end (0 for
    the lower inode); refuse ends whose peer is not among them."""
    by_ino = {r["ino"]: r for r in recs}
    for r in recs:
        if r["peer"] not in by_ino:
            raise Refused(f"fd {r['fd']} is a unix socket (socket:[{r['ino']}]) whose other "
                          "end is outside the process; only socketpairs with both ends inside "
                          "are supported")
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
    rec.update(_collect_socket(dfd, n, f["link"]))


def finish(recs: list[dict]) -> None:
    """Pair up the socket records of one process; their queues into base64."""
    pair_up(recs)
    for r in recs:
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


def reopen(f: dict, flags: int, socks: dict[int, tuple[int, int]]) -> int:
    """The clone's fd for socket record f, with its O_NONBLOCK."""
    s = socks[f["pair"]][f["end"]]
    fl = fcntl.fcntl(s, fcntl.F_GETFL)
    fcntl.fcntl(s, fcntl.F_SETFL, (fl & ~os.O_NONBLOCK) | (flags & os.O_NONBLOCK))
    return s

"""Inet sockets (AF_INET, AF_INET6; TCP and UDP): checkpointed from a pidfd_getfd copy,
recreated at restore in the clone's network namespace (cxlfork.state.netns).

Checkpoint (`collect`): on a copy of the socket (the same open file description: nothing is
read from or written to it, the original keeps it untouched) its family, type and protocol
(SO_DOMAIN/SO_TYPE/SO_PROTOCOL), TCP state (TCP_INFO's tcpi_state; a closed socket with tcpi_segs_in/out was a connection),
bound address
(getsockname), UDP peer (getpeername), the options of `OPTS` that differ from a new socket's
(SO_REUSEADDR, SO_REUSEPORT, SO_KEEPALIVE, TCP_KEEPIDLE/INTVL/CNT, TCP_NODELAY, SO_RCVBUF,
SO_SNDBUF, IPV6_V6ONLY, ...), SO_LINGER and SO_BINDTODEVICE (a device other than lo
is not in a clone's own namespace: that restore fails naming it); a listener's backlog is its sk_max_ack_backlog,
which NETLINK_SOCK_DIAG reports as idiag_wqueue (dumped in the socket's own namespace and
matched by inode). States: "listen" (TCP LISTEN), "bound" (a bound UDP socket, or a bound
TCP socket not listening), "unbound", "reset" (a TCP connection: established, connecting or
closing). Refused: other protocols (raw, SCTP, ...) and families.

Restore (`make`): listen/bound/unbound sockets are made again (options set before bind, then
bind to the same address and port, listen with the same backlog; a UDP socket's peer is
connected again). A connection cannot be owned by a clone (its peer talks to the original):
it becomes a TCP socket of the same family whose peer has reset it (a loopback connection
in the clone's namespace closed with SO_LINGER 0 by its other end), so the clone reads
ECONNRESET on it, then EOF, and writes fail with EPIPE.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import struct

from cxlfork.errors import CxlforkError, Refused
from cxlfork.state import netns

SO_DOMAIN, SO_PROTOCOL = 39, 38
TCP_INFO = 11
TCP_LISTEN, TCP_CLOSE = 10, 7
# (name, level, option): integer options carried over when they differ from a new socket's
OPTS = [("SO_REUSEADDR", socket.SOL_SOCKET, 2), ("SO_REUSEPORT", socket.SOL_SOCKET, 15),
        ("SO_KEEPALIVE", socket.SOL_SOCKET, 9), ("SO_BROADCAST", socket.SOL_SOCKET, 6),
        ("SO_SNDBUF", socket.SOL_SOCKET, 7), ("SO_RCVBUF", socket.SOL_SOCKET, 8),
        ("SO_PRIORITY", socket.SOL_SOCKET, 12), ("SO_RCVLOWAT", socket.SOL_SOCKET, 18),
        ("SO_OOBINLINE", socket.SOL_SOCKET, 10),
        ("IP_FREEBIND", socket.IPPROTO_IP, 15), ("IP_TOS", socket.IPPROTO_IP, 1),
        ("IP_TTL", socket.IPPROTO_IP, 2),
        ("IPV6_V6ONLY", socket.IPPROTO_IPV6, 26),
        ("TCP_NODELAY", socket.IPPROTO_TCP, 1), ("TCP_KEEPIDLE", socket.IPPROTO_TCP, 4),
        ("TCP_KEEPINTVL", socket.IPPROTO_TCP, 5), ("TCP_KEEPCNT", socket.IPPROTO_TCP, 6),
        ("TCP_DEFER_ACCEPT", socket.IPPROTO_TCP, 9), ("TCP_USER_TIMEOUT", socket.IPPROTO_TCP, 18),
        ("TCP_FASTOPEN", socket.IPPROTO_TCP, 23)]
OPT = {name: (level, opt) for name, level, opt in OPTS}
SO_LINGER, SO_BINDTODEVICE = 13, 25
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, NLMSG_DONE = 4, 20, 0x300, 3
FAMILIES = {socket.AF_INET: "AF_INET", socket.AF_INET6: "AF_INET6"}
PROTOS = {(socket.SOCK_STREAM, socket.IPPROTO_TCP): "TCP",
          (socket.SOCK_DGRAM, socket.IPPROTO_UDP): "UDP"}


def _applies(name: str, family: int, sotype: int) -> bool:
    if name.startswith("TCP_"):
        return sotype == socket.SOCK_STREAM
    if name.startswith("IPV6_"):
        return family == socket.AF_INET6
    return True


def _opts(s: socket.socket, family: int, sotype: int) -> dict[str, int]:
    """The options of s that differ from those of a new socket of its kind."""
    fresh = socket.socket(family, sotype | socket.SOCK_CLOEXEC)
    try:
        out = {}
        for name, level, opt in OPTS:
            if not _applies(name, family, sotype):
                continue
            try:
                v = s.getsockopt(level, opt)
            except OSError:
                continue
            if v != fresh.getsockopt(level, opt):
                out[name] = v
        return out
    finally:
        fresh.close()


def _backlog(s: socket.socket, family: int, ino: int) -> int:
    """A TCP listener's backlog (sk_max_ack_backlog: idiag_wqueue of a LISTEN socket),
    dumped by sock_diag in the socket's own namespace."""
    nsfd = netns.socket_ns(s.fileno())
    try:
        with netns.inside(nsfd):
            nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                               NETLINK_SOCK_DIAG)
    finally:
        os.close(nsfd)
    try:
        req = struct.pack("<BBBxI48x", family, socket.IPPROTO_TCP, 0, 1 << TCP_LISTEN)
        nl.send(struct.pack("<IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY,
                            1 | NLM_F_DUMP, 1, 0) + req)
        while True:
            d = nl.recv(1 << 16)
            off = 0
            while off + 16 <= len(d):
                ln, typ = struct.unpack_from("<IH", d, off)
                if typ == NLMSG_DONE or ln < 16:
                    raise CxlforkError(f"sock_diag: listening socket {ino} not found")
                if typ == SOCK_DIAG_BY_FAMILY and ln >= 16 + 72:
                    wq, _uid, inode = struct.unpack_from("<III", d, off + 16 + 60)
                    if inode == ino:
                        return wq
                off += (ln + 3) & ~3
            if not d:
                raise CxlforkError(f"sock_diag: listening socket {ino} not found")
    finally:
        nl.close()


def collect(s: socket.socket, fd: int, link: str, family: int, sotype: int) -> dict:
    """The fd record of inet socket s (our copy of the target's fd fd)."""
    proto = s.getsockopt(socket.SOL_SOCKET, SO_PROTOCOL)
    pname = PROTOS.get((sotype, proto))
    if pname is None:
        raise Refused(f"fd {fd} is an {FAMILIES[family]} socket of type {sotype}, protocol "
                      f"{proto} ({link}); only TCP and UDP sockets are supported")
    name = s.getsockname()
    rec = {"kind": "inet", "family": int(family), "sotype": int(sotype), "addr": name[0],
           "port": name[1], "scope_id": name[3] if family == socket.AF_INET6 else 0,
           "opts": _opts(s, family, sotype), "backlog": 0}
    dev = s.getsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, 16).rstrip(b"\0")
    if dev:
        rec["device"] = dev.decode(errors="replace")
    on, secs = struct.unpack("ii", s.getsockopt(socket.SOL_SOCKET, SO_LINGER, 8))
    if on:
        rec["linger"] = secs
    if pname == "TCP":
        info = s.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 144)
        state = info[0]
        # a closed socket that sent or received segments was a connection (e.g. reset, its
        # error not read yet: SO_ERROR is not asked, reading it would clear it)
        segs = struct.unpack_from("<II", info, 136) if len(info) >= 144 else (0, 0)
        if state == TCP_LISTEN:
            rec["state"] = "listen"
            rec["backlog"] = _backlog(s, family, os.fstat(s.fileno()).st_ino)
        elif state == TCP_CLOSE and not any(segs):
            rec["state"] = "bound" if name[1] else "unbound"
        else:
            rec["state"] = "reset"
    else:
        rec["state"] = "bound" if name[1] else "unbound"
        try:
            peer = s.getpeername()
            rec["peer"] = [peer[0], peer[1]]
        except OSError:
            pass
    return rec


def validate(v, f: dict, w: str) -> None:
    """Field checks of an inet fd record (image.load)."""
    fam = v.int_in(f, "family", 0, 64, w)
    if fam not in FAMILIES:
        v.fail(f"{w}.family", "expected AF_INET or AF_INET6")
    if v.int_in(f, "sotype", 1, 6, w) not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        v.fail(f"{w}.sotype", "expected 1 or 2 (stream, dgram)")
    if v.get(f, "state", str, w) not in ("listen", "bound", "unbound", "reset"):
        v.fail(f"{w}.state", "expected listen, bound, unbound or reset")
    addrs = [v.get(f, "addr", str, w)] + ([f["peer"][0]] if isinstance(f.get("peer"), list)
                                          and f["peer"] else [])
    for a in addrs:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            v.fail(f"{w}.addr", f"not an IP address: {a!r}")
        if ip.version != (4 if fam == socket.AF_INET else 6):
            v.fail(f"{w}.addr", f"{a} is not an address of the socket's family")
    v.int_in(f, "port", 0, 65536, w)
    v.int_in(f, "scope_id", 0, 1 << 32, w)
    v.int_in(f, "backlog", 0, 1 << 31, w)
    if "linger" in f:
        v.int_in(f, "linger", 0, 1 << 31, w)
    if "device" in f and not (0 < len(v.get(f, "device", str, w).encode()) < 16):
        v.fail(f"{w}.device", "not a device name")
    if "peer" in f:
        p = f["peer"]
        if not (isinstance(p, list) and len(p) == 2 and isinstance(p[1], int)
                and 0 <= p[1] < 65536):
            v.fail(f"{w}.peer", "expected [address, port]")
    opts = v.get(f, "opts", dict, w)
    for k, val in opts.items():
        if k not in OPT or not isinstance(val, int) or isinstance(val, bool) or \
                not -(1 << 31) <= val < (1 << 31):
            v.fail(f"{w}.opts.{k}", "unknown option or not a 32-bit integer")


def describe(f: dict) -> str:
    """TCP 0.0.0.0:8000 / UDP [::1]:53, for messages."""
    proto = "TCP" if f["sotype"] == socket.SOCK_STREAM else "UDP"
    a = f"[{f['addr']}]" if f["family"] == socket.AF_INET6 else f["addr"]
    return f"{proto} {a}:{f['port']}"


def _reset(family: int) -> socket.socket:
    """A TCP socket whose peer reset the connection (in the calling thread's namespace)."""
    lo = "127.0.0.1" if family == socket.AF_INET else "::1"
    lst = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    c = None
    try:
        lst.bind((lo, 0))
        lst.listen(1)
        c = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        c.connect(lst.getsockname())
        a, _ = lst.accept()
        a.setsockopt(socket.SOL_SOCKET, SO_LINGER, struct.pack("ii", 1, 0))
        a.close()                                    # RST to c
        return c
    except BaseException:
        if c is not None:
            c.close()
        raise
    finally:
        lst.close()


def make(f: dict, where: str) -> int:
    """A new socket for inet record f in the calling thread's namespace (where: for
    messages); its fd (close-on-exec, blocking)."""
    fam, typ = f["family"], f["sotype"]
    try:
        if f["state"] == "reset":
            return _reset(fam).detach()
        s = socket.socket(fam, typ | socket.SOCK_CLOEXEC)
    except OSError as e:
        raise CxlforkError(f"fd {f['fd']}: making an {FAMILIES[fam]} socket: {e.strerror}") from e
    try:
        for name, val in f["opts"].items():
            level, opt = OPT[name]
            # the kernel doubles the buffer sizes it is given: half of what was read
            if name in ("SO_SNDBUF", "SO_RCVBUF"):
                val //= 2
            s.setsockopt(level, opt, val)
        if "linger" in f:
            s.setsockopt(socket.SOL_SOCKET, SO_LINGER, struct.pack("ii", 1, f["linger"]))
        if "device" in f:
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, f["device"].encode())
            except OSError as e:
                raise CxlforkError(
                    f"fd {f['fd']}: {describe(f)} is bound to device {f['device']} "
                    f"(SO_BINDTODEVICE), which is not there {where}: {e.strerror}" +
                    ("" if "host" in where else " (a clone's own namespace has only lo; "
                     "--netns host restores into this one)")) from e
        if f["state"] != "unbound":
            addr = (f["addr"], f["port"]) if fam == socket.AF_INET else \
                (f["addr"], f["port"], 0, f["scope_id"])
            try:
                s.bind(addr)
            except OSError as e:
                raise CxlforkError(f"fd {f['fd']}: cannot bind {describe(f)} {where}: "
                                   f"{e.strerror}") from e
        if f["state"] == "listen":
            s.listen(f["backlog"])
        if "peer" in f:
            s.connect(tuple(f["peer"]))
        return s.detach()
    except OSError as e:
        raise CxlforkError(f"fd {f['fd']}: recreating {describe(f)}: {e.strerror}") from e
    finally:
        s.close()


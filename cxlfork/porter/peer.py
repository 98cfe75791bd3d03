"""Who is on the other end of a loopback TCP connection to the porter.

A TCP socket carries no peer credentials (SO_PEERCRED is for unix sockets), but on one host
the kernel knows who owns the client's end: /proc/net/tcp and /proc/net/tcp6 list every
socket with its owner's uid (the column identd servers read). The client's socket is the one
whose local port is the connection's client port and whose remote port is ours. A peer that
is not on this host (a non-loopback bind) has no such entry: its uid is None.
"""
from __future__ import annotations

TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
ESTABLISHED = "01"


def _port(field: str) -> int:
    return int(field.rsplit(":", 1)[1], 16)


def peer_uid(client_port: int, server_port: int) -> int | None:
    """The uid owning the local client socket (port client_port) connected to server_port."""
    for table in TABLES:
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    cols = line.split()
                    if len(cols) < 8 or cols[3] != ESTABLISHED:
                        continue
                    if _port(cols[1]) == client_port and _port(cols[2]) == server_port:
                        return int(cols[7])
        except OSError:
            continue
    return None

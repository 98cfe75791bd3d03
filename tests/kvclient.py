"""Small clients for the real servers the cxlfork tests and the servers bench clone: RESP2
(redis-server) and memcached's text protocol, over a connected TCP socket (made in a clone's
network namespace with cxlfork.state.netns.connect, or in ours). Pipelined: send many
commands, then read as many replies. No third-party client is needed."""
from __future__ import annotations

import socket


class RespError(Exception):
    """An error reply (`-ERR ...`) from the server."""


class _Reader:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.pos = 0

    def _fill(self) -> None:
        if self.pos > 1 << 20:
            del self.buf[:self.pos]
            self.pos = 0
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buf += chunk

    def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n", self.pos)
            if i >= 0:
                out = bytes(self.buf[self.pos:i])
                self.pos = i + 2
                return out
            self._fill()

    def exact(self, n: int) -> bytes:
        while len(self.buf) - self.pos < n + 2:
            self._fill()
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n + 2
        return out


class Resp:
    """A RESP2 connection: `r.call("SET", "k", "v")`, `r.pipeline(cmds)`."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.rd = _Reader(sock)

    @staticmethod
    def encode(*args) -> bytes:
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        return b"".join(out)

    def reply(self):
        line = self.rd.line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RespError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.rd.exact(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise ConnectionError(f"not a RESP reply: {line[:60]!r}")

    def call(self, *args):
        self.sock.sendall(self.encode(*args))
        return self.reply()

    def pipeline(self, cmds, batch: int = 1000) -> list:
        """Send cmds (tuples) in batches, reading each batch's replies; error replies are
        returned as RespError objects, not raised."""
        out = []
        for i in range(0, len(cmds), batch):
            part = cmds[i:i + batch]
            self.sock.sendall(b"".join(self.encode(*c) for c in part))
            for _ in part:
                try:
                    out.append(self.reply())
                except RespError as e:
                    out.append(e)
        return out

    def close(self) -> None:
        self.sock.close()


class Memcache:
    """memcached's text protocol: set, get (several keys), delete, stats."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.rd = _Reader(sock)

    def set_many(self, items, batch: int = 1000) -> None:
        items = list(items)
        for i in range(0, len(items), batch):
            part = items[i:i + batch]
            self.sock.sendall(b"".join(b"set %s 0 0 %d\r\n%s\r\n" % (k, len(v), v)
                                       for k, v in part))
            for k, _ in part:
                ans = self.rd.line()
                if ans != b"STORED":
                    raise ConnectionError(f"set {k!r}: {ans!r}")

    def set(self, key: bytes, value: bytes) -> None:
        self.set_many([(key, value)])

    def get_many(self, keys, batch: int = 500) -> dict:
        out = {}
        keys = list(keys)
        for i in range(0, len(keys), batch):
            self.sock.sendall(b"get " + b" ".join(keys[i:i + batch]) + b"\r\n")
            while True:
                line = self.rd.line()
                if line == b"END":
                    break
                parts = line.split()
                if parts[0] != b"VALUE":
                    raise ConnectionError(f"get: {line[:60]!r}")
                out[parts[1]] = self.rd.exact(int(parts[3]))
        return out

    def get(self, key: bytes):
        return self.get_many([key]).get(key)

    def delete(self, key: bytes) -> bool:
        self.sock.sendall(b"delete %s\r\n" % key)
        return self.rd.line() == b"DELETED"

    def stats(self, what: str = "") -> dict:
        self.sock.sendall(b"stats" + (b" " + what.encode() if what else b"") + b"\r\n")
        out = {}
        while (line := self.rd.line()) != b"END":
            _, k, v = line.decode().split(" ", 2)
            out[k] = v
        return out

    def close(self) -> None:
        self.sock.close()

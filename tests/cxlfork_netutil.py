"""Helpers of the socket and network-namespace tests: reach a clone's namespace (nsenter),
ask a server there, ports that no earlier test of this run used, this host's addresses."""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time

_GIVEN: set[int] = set()


def _free(port: int) -> bool:
    """Can port (and the next two) be bound here, TCP and UDP, v4 and v6, without
    SO_REUSEADDR (so no TIME_WAIT socket of an earlier run holds it)?"""
    socks = []
    try:
        for p in (port, port + 1, port + 2):
            for fam, typ, addr in ((socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0"),
                                   (socket.AF_INET6, socket.SOCK_STREAM, "::"),
                                   (socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0"),
                                   (socket.AF_INET6, socket.SOCK_DGRAM, "::")):
                s = socket.socket(fam, typ)
                socks.append(s)
                if fam == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((addr, p))
        return True
    except OSError:
        return False
    finally:
        for s in socks:
            s.close()


def new_port() -> int:
    """A base port for one test (the server uses it and the next two), free in our namespace
    now (earlier tests' server-side TIME_WAIT sockets keep theirs), below the ephemeral range
    (so no client connection takes it meanwhile), not given out before in this run."""
    rnd = random.Random(os.getpid() ^ time.monotonic_ns())
    while True:
        p = rnd.randrange(20000, 32000)
        if not _GIVEN & {p, p + 1, p + 2} and _free(p):
            _GIVEN.update((p, p + 1, p + 2))
            return p


def in_netns(pid: int, code: str, timeout=20) -> str:
    """Run python code in PID's network namespace (nsenter -t PID -n); its stdout."""
    r = subprocess.run(["nsenter", "-t", str(pid), "-n", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r.stdout


def ask(pid: int | None, family: str, addr: str, port: int) -> str:
    """What the server listening at addr:port in PID's namespace (None: ours) says."""
    if pid is None:
        with socket.socket(getattr(socket, family)) as s:
            s.settimeout(10)
            s.connect((addr, port))
            data = b""
            while chunk := s.recv(100):
                data += chunk
            return data.decode().strip()
    code = (f"import socket; s=socket.socket(socket.{family}); s.settimeout(10); "
            f"s.connect(({addr!r},{port})); print(s.recv(100).decode().strip())")
    return in_netns(pid, code).strip()


def netns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def procs_of(exe: str) -> list[str]:
    """Processes running exe (none must be left)."""
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.readlink(f"/proc/{p}/exe") == exe:
                    out.append(p)
            except OSError:
                pass
    return out


def other_device() -> str | None:
    with open("/proc/net/dev") as f:
        names = [x.split(":")[0].strip() for x in f.read().splitlines()[2:]]
    return next((n for n in names if n != "lo"), None)


def host_addrs() -> list[tuple[str, str]]:
    """(family name, address) of this host that are not loopback: a v4 address (the source
    a UDP socket would use) and a global v6 one (/proc/net/if_inet6, scope 0)."""
    out = []
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.255", 9))       # no packet is sent
        a = s.getsockname()[0]
        if not a.startswith("127."):
            out.append(("AF_INET", a))
    except OSError:
        pass
    finally:
        s.close()
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                hexa, _, _, scope, _, dev = line.split()
                if scope == "00" and dev != "lo":
                    out.append(("AF_INET6", socket.inet_ntop(socket.AF_INET6,
                                                             bytes.fromhex(hexa))))
                    break
    except OSError:
        pass
    return out

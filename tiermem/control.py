"""The tiermemd control protocol, shared by the daemon (tiermemd.control, the server) and
`tiermem ctl` (the client): a unix stream socket, one JSON request line and one JSON reply
line per connection; the peer's credentials (SO_PEERCRED) decide who is served.

Requests: {"cmd": "status"|"pause"|"resume"|"reload"|"stats"} or
          {"cmd": "policy", "target": NAME, "policy": POLICY}
Replies:  {"ok": true, ...} or {"ok": false, "error": "one line"}
"""
from __future__ import annotations

import json
import socket
import struct

from tiermem.errors import TiermemError

MAX_REQUEST = 64 * 1024


def peer_uid(conn: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a unix socket."""
    data = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", data)
    return pid, uid


def send(conn: socket.socket, obj: dict) -> None:
    conn.sendall(json.dumps(obj).encode() + b"\n")


def request(path: str, req: dict, timeout: float = 30.0) -> dict:
    """Send one request to a running tiermemd; TiermemError with one clear line on failure."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except FileNotFoundError:
            raise TiermemError(f"tiermemd is not running (no control socket at {path})") \
                from None
        except ConnectionRefusedError:
            raise TiermemError(f"tiermemd is not running (stale control socket {path})") \
                from None
        except PermissionError:
            raise TiermemError(f"permission denied on {path}: only root may control "
                               "tiermemd") from None
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except (socket.timeout, TimeoutError):
        raise TiermemError(f"tiermemd did not answer on {path} within {timeout:.0f} s") \
            from None
    except OSError as e:
        raise TiermemError(f"control socket {path}: {e.strerror or e}") from None
    finally:
        s.close()
    try:
        rep = json.loads(buf)
    except ValueError:
        raise TiermemError(f"tiermemd sent a bad reply on {path}") from None
    if not rep.get("ok"):
        raise TiermemError(rep.get("error", "tiermemd refused the request"))
    return rep

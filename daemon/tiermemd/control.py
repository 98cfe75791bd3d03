"""tiermemd's control socket server: a unix stream socket, root-owned, mode 0600, and a
peer-credential check (SO_PEERCRED) so only root (or the daemon's own user) is served even if
the file mode is loosened. The protocol (framing, client) is tiermem.control."""
from __future__ import annotations

import json
import os
import socket
import threading

from tiermem.control import MAX_REQUEST, peer_uid, request, send as _send
from tiermem.errors import TiermemError

__all__ = ["ControlServer", "request"]   # request: the client, re-exported for old callers


class ControlServer:
    def __init__(self, path: str, handler, log):
        self.path, self.handler, self.log = path, handler, log
        self.sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        d = os.path.dirname(self.path)
        if not os.path.isdir(d):
            raise TiermemError(f"control socket {self.path}: directory {d} does not exist")
        if os.path.exists(self.path):
            raise TiermemError(f"control socket {self.path} exists (another tiermemd?)")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)             # the file is created 0600, no window
        try:
            s.bind(self.path)
        except OSError as e:
            s.close()
            raise TiermemError(f"control socket {self.path}: cannot bind: {e.strerror}") \
                from None
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        s.listen(8)
        s.settimeout(0.5)
        self.sock = s
        self._thread = threading.Thread(target=self._serve, name="tiermemd-control",
                                        daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    self._one(conn)
                except Exception as e:  # a bad client must not take the daemon down
                    self.log.warning("control: %s: %s", type(e).__name__, e)

    def _one(self, conn: socket.socket) -> None:
        pid, uid = peer_uid(conn)
        buf = b""
        while b"\n" not in buf and len(buf) < MAX_REQUEST:
            chunk = conn.recv(4096)
            if not chunk:
                break
            buf += chunk
        if uid != 0 and uid != os.geteuid():   # read first: closing unread data sends RST
            self.log.warning("control: refused uid %d (pid %d): not root", uid, pid)
            _send(conn, {"ok": False, "error": f"permission denied: uid {uid} may not "
                                               "control tiermemd (root only)"})
            return
        try:
            req = json.loads(buf.split(b"\n", 1)[0] or b"null")
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ValueError("expected a JSON object with 'cmd'")
        except ValueError as e:
            _send(conn, {"ok": False, "error": f"bad request: {e}"})
            return
        try:
            reply = self.handler(req)
            reply = {"ok": True, **(reply or {})}
        except TiermemError as e:
            reply = {"ok": False, "error": str(e)}
        _send(conn, reply)

    def stop(self) -> None:
        self._stop.set()
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
        if self._thread is not None:
            self._thread.join(timeout=2)



"""tiermemd's control socket server: a unix stream socket, root-owned, mode 0600, and a
peer-credential check (SO_PEERCRED) so only root (or the daemon's own user) is served even if
the file mode is loosened. The protocol (framing, client) is tiermem.control."""
from __future__ import annotations

import json
import os
import socket
import threading
import time

from tiermem.control import MAX_REQUEST, peer_uid, request, send as _send
from tiermem.errors import TiermemError

__all__ = ["ControlServer", "request"]   # request: the client, re-exported for old callers

CONN_TIMEOUT = 5.0       # s a peer has to send its request line (and to read a refusal)
MAX_CONNECTIONS = 32     # served at once; more are closed unanswered


def _drain(conn: socket.socket, deadline: float) -> None:
    """Read and drop what the peer sends until it closes or the deadline passes."""
    try:
        conn.shutdown(socket.SHUT_WR)
        got = 0
        while got < MAX_REQUEST:
            conn.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = conn.recv(4096)
            if not chunk:
                return
            got += len(chunk)
    except OSError:
        pass


class ControlServer:
    def __init__(self, path: str, handler, log):
        self.path, self.handler, self.log = path, handler, log
        self.sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._handler_lock = threading.Lock()

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
        s.listen(64)
        s.settimeout(0.5)
        self.sock = s
        self._thread = threading.Thread(target=self._serve, name="tiermemd-control",
                                        daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        """Accept loop: each connection is served in its own thread, so a slow or silent peer
        holds only its own thread (for at most CONN_TIMEOUT seconds), never root's ctl."""
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                conn.close()                 # more than MAX_CONNECTIONS at once: refused
                self.log.warning("control: %d connections open; one refused", MAX_CONNECTIONS)
                continue
            threading.Thread(target=self._conn, args=(conn,), name="tiermemd-control-conn",
                             daemon=True).start()

    def _conn(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._one(conn, time.monotonic() + CONN_TIMEOUT)
        except Exception as e:  # a bad client must not take the daemon down
            self.log.warning("control: %s: %s", type(e).__name__, e)
        finally:
            self._slots.release()

    def _one(self, conn: socket.socket, deadline: float) -> None:
        pid, uid = peer_uid(conn)            # who it is, before reading a byte
        if uid != 0 and uid != os.geteuid():
            self.log.warning("control: refused uid %d (pid %d): not root", uid, pid)
            _send(conn, {"ok": False, "error": f"permission denied: uid {uid} may not "
                                               "control tiermemd (root only)"})
            _drain(conn, deadline)           # closing unread data would reset the reply
            return
        buf = b""
        while b"\n" not in buf and len(buf) < MAX_REQUEST:
            conn.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                chunk = conn.recv(4096)
            except (socket.timeout, TimeoutError):
                self.log.warning("control: pid %d sent no full request in %.0f s",
                                 pid, CONN_TIMEOUT)
                return
            if not chunk:
                break
            buf += chunk
        try:
            req = json.loads(buf.split(b"\n", 1)[0] or b"null")
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ValueError("expected a JSON object with 'cmd'")
        except RecursionError:
            _send(conn, {"ok": False, "error": "bad request: JSON nested too deeply"})
            return
        except ValueError as e:
            _send(conn, {"ok": False, "error": f"bad request: {e}"})
            return
        try:
            with self._handler_lock:         # the handler sees one request at a time
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



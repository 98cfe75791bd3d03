"""Host side of the guest agent protocol: JSON lines over the QEMU virtio-serial unix socket.

One connection; a reader thread hands each answer to the request with the same id, so
several threads may run commands at once. Answers to requests the host gave up on (a
previous client that timed out) carry unknown ids and are dropped.
"""
from __future__ import annotations

import json
import socket
import threading
import time
import uuid

from tiermem.errors import TiermemError


class AgentGone(TiermemError):
    """The connection to the guest agent broke (guest powered off, QEMU died)."""


class AgentClient:
    def __init__(self, sock_path: str, alive=lambda: True):
        self.sock_path = sock_path
        self._alive = alive          # callable: False once QEMU is known to have exited
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._pending: dict[str, list] = {}   # id -> [Event, answer]
        self._reader: threading.Thread | None = None
        self._closed = False
        self._broken: str | None = None

    def connect(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.sock_path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                s.close()
                if time.monotonic() > deadline or not self._alive():
                    raise AgentGone(f"cannot connect to the guest agent socket {self.sock_path}: "
                                    f"{e.strerror}") from e
                time.sleep(0.05)
        self._sock = s
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name="tiermem-agent-reader")
        self._reader.start()

    def _read_loop(self) -> None:
        buf = b""
        sock = self._sock
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    ans = json.loads(line)
                except ValueError:
                    continue
                with self._lock:
                    slot = self._pending.get(ans.get("id"))
                if slot is not None:
                    slot[1] = ans
                    slot[0].set()
        with self._lock:
            self._broken = "the connection to the guest agent closed"
            for slot in self._pending.values():
                slot[0].set()

    def request(self, req: dict, timeout: float) -> dict:
        """Sends req, waits up to timeout seconds for its answer."""
        if self._sock is None:
            raise AgentGone("not connected to the guest agent")
        rid = uuid.uuid4().hex
        req = dict(req, id=rid)
        slot = [threading.Event(), None]
        with self._lock:
            if self._broken:
                raise AgentGone(self._broken)
            self._pending[rid] = slot
        try:
            try:
                self._sock.sendall((json.dumps(req) + "\n").encode())
            except OSError as e:
                raise AgentGone(f"cannot send to the guest agent: {e.strerror}") from e
            deadline = time.monotonic() + timeout
            while not slot[0].wait(0.5):
                if not self._alive():
                    raise AgentGone("the emulated CXL machine is gone (QEMU exited)")
                if time.monotonic() > deadline:
                    raise TiermemError(f"no answer from the guest agent within {timeout:.0f} s "
                                       f"(op {req.get('op')})")
            if slot[1] is None:
                raise AgentGone(self._broken or "the connection to the guest agent closed")
            return slot[1]
        finally:
            with self._lock:
                self._pending.pop(rid, None)

    def wait_ready(self, timeout: float) -> dict:
        """Pings until the agent answers (it starts late in boot); returns the ping answer."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.request({"op": "ping"}, timeout=0.5)
            except AgentGone:
                raise
            except TiermemError:
                if time.monotonic() > deadline:
                    raise TiermemError(f"the guest agent did not answer within {timeout:.0f} s")

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        if self._reader is not None:
            self._reader.join(timeout=2)
            self._reader = None

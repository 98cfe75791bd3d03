"""tiermemd's control socket server (tiermemd.control.ControlServer) on a real unix socket:
peer credentials are checked before a byte is read, a peer that dribbles bytes does not hold
up another client, and deeply nested JSON is answered `bad request`."""
from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading

import pytest

from tiermem.control import request
from tiermemd.control import ControlServer


@pytest.fixture
def server():
    # /run, not /tmp: the uid-65534 peer must reach the socket (/tmp may be closed, 0700)
    d = tempfile.mkdtemp(prefix="tiermem-ctl-test-", dir="/run")
    os.chmod(d, 0o755)
    path = os.path.join(d, "ctl.sock")
    srv = ControlServer(path, lambda req: {"echo": req["cmd"]}, logging.getLogger("t"))
    srv.start()
    try:
        yield path
    finally:
        srv.stop()
        os.rmdir(d)


def _raw(path: str, data: bytes, timeout: float = 10.0) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(data)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


def test_request_answered(server):
    assert request(server, {"cmd": "status"})["echo"] == "status"


def test_deeply_nested_json_is_a_bad_request(server):
    rep = _raw(server, b"[" * 60000 + b"\n")
    assert rep["ok"] is False and rep["error"].startswith("bad request"), rep
    assert request(server, {"cmd": "status"})["ok"] is True      # still serving


def test_dribbling_peer_does_not_block_others(server):
    stop = threading.Event()
    drib = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    drib.connect(server)

    def dribble():                           # one byte a second, never a newline
        while not stop.wait(1.0):
            try:
                drib.send(b" ")
            except OSError:
                return
    t = threading.Thread(target=dribble, daemon=True)
    drib.send(b"{")
    t.start()
    try:
        # served one connection at a time, this waited behind the dribbler until timing out
        assert request(server, {"cmd": "stats"}, timeout=15)["echo"] == "stats"
        assert t.is_alive()                  # the dribbler was still at it meanwhile
    finally:
        stop.set()
        t.join()
        drib.close()


@pytest.mark.root
def test_credentials_checked_before_reading(server):
    if os.geteuid() != 0:
        pytest.skip("needs root (to connect as uid 65534)")
    os.chmod(server, 0o666)                  # the mode no longer guards: SO_PEERCRED must
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                             # child: uid 65534, connects, sends nothing
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(3)               # the server's per-connection limit is 5 s
                s.connect(server)
                try:
                    out = s.recv(65536)
                except (socket.timeout, TimeoutError):
                    out = b"timeout"
            os.write(w, out or b"closed")
        except BaseException as e:
            os.write(w, repr(e).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    os.waitpid(pid, 0)
    assert out.startswith(b"{"), out
    rep = json.loads(out)
    assert rep["ok"] is False and "permission denied: uid 65534" in rep["error"]

"""The porter's trust model and its answers to hostile clients: registration is off unless
configured and then root-only, invocation is limited to [porter] invoke_uids (root by
default; the peer's uid comes from the kernel's socket table), a negative Content-Length is
a 400, a client that closes mid-body costs one log line, a broken config is one line."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from cxlfork.porter.config import ConfigError, load
from test_porter_service import ECHO, porter  # noqa: F401  (fixture)

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
# A client with no project imports, run as nobody: prints the HTTP status of a request.
CLIENT = r"""
import http.client, json, sys
port, method, path, body = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
c.request(method, path, body=body.encode() or None, headers={"Content-Type": "application/json"})
r = c.getresponse()
print(r.status, r.read().decode().strip())
"""
EVIL = '{"name": "evil", "command": ["/bin/sh", "-c", "touch /tmp/porter-pwned-$$"]}'


def as_nobody(port, method, path, body=""):
    r = subprocess.run(NOBODY + ["/usr/bin/python3", "-c", CLIENT, str(port), method, path,
                                 body], capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    code, _, text = r.stdout.partition(" ")
    return int(code), text


pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cxlfork ptrace)")


def test_register_is_off_by_default(porter):  # noqa: F811
    p = porter(ECHO.format(policy="cold", slo=1000))
    code, out, _ = p.request("POST", "/functions", {"name": "e", "command": ["/bin/true"]})
    assert code == 403 and "allow_register" in out["error"], out
    assert "e" not in p.request("GET", "/functions")[1]


def test_unprivileged_user_can_neither_register_nor_invoke(porter):  # noqa: F811
    p = porter(ECHO.format(policy="cold", slo=1000), "allow_register = true")
    code, text = as_nobody(p.port, "POST", "/functions", EVIL)
    assert code == 403 and "uid 65534" in text, text
    code, text = as_nobody(p.port, "POST", "/functions/echo/invoke", "{}")
    assert code == 403 and "uid 65534 may not use this porter" in text, text
    code, text = as_nobody(p.port, "GET", "/functions")
    assert code == 403, text
    assert as_nobody(p.port, "GET", "/healthz")[0] == 200
    code, out, _ = p.invoke("echo", {"x": 1})            # root, the default invoke_uids
    assert code == 200 and out["echo"] == {"x": 1}


def test_invoke_uids_opens_invocation_not_registration(porter):  # noqa: F811
    p = porter(ECHO.format(policy="cold", slo=1000),
               "allow_register = true\ninvoke_uids = [0, 65534]")
    code, text = as_nobody(p.port, "POST", "/functions/echo/invoke", '{"y": 2}')
    assert code == 200 and '"y":2' in text, text
    code, text = as_nobody(p.port, "POST", "/functions", EVIL)
    assert code == 403, text


def _raw(port, data: bytes, read=True) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(data)
    out = b""
    if read:
        while chunk := s.recv(65536):
            out += chunk
            if b"\r\n\r\n" in out and b"}" in out:
                break
    s.close()
    return out


def test_negative_length_is_400_and_short_body_one_line(porter):  # noqa: F811
    p = porter(ECHO.format(policy="cold", slo=1000))
    out = _raw(p.port, b"POST /functions/echo/invoke HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Length: -5\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 "), out[:200]
    _raw(p.port, b"POST /functions/echo/invoke HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: 100\r\n\r\n{\"a\":", read=False)
    deadline = time.monotonic() + 30
    code = None
    while time.monotonic() < deadline:     # the porter still serves, and logged the drop
        code, out2, _ = p.invoke("echo", {"z": 3})
        if code == 200:
            break
    assert code == 200
    _, err = p.stop()
    assert "Traceback" not in err, err
    drops = [ln for ln in err.splitlines() if "client 127.0.0.1:" in ln]
    assert len(drops) >= 1 and all("closed after" in ln or "connection dropped" in ln
                                   for ln in drops), err


@pytest.mark.parametrize("text,why", [
    (b'[porter]\nport = 0\n# caf\xe9\n', "not UTF-8 text"),
    (b'[functions.e]\ncommand = ["/bin/true"]\ntimeout_s = nan\n', "functions.e.timeout_s: must be a finite number"),
    (b'[functions.e]\ncommand = ["/bin/true"]\ntimeout_s = inf\n', "functions.e.timeout_s: must be a finite number"),
    (b'[porter]\nkeepalive_s = nan\n', "porter.keepalive_s: must be a finite number"),
    (b'[porter]\ninvoke_uids = ["root"]\n', "porter.invoke_uids: must be a list"),
])
def test_bad_config_is_one_line(tmp_path, text, why):
    f = tmp_path / "porter.toml"
    f.write_bytes(text)
    with pytest.raises(ConfigError) as e:
        load(str(f))
    assert why in str(e.value) and "\n" not in str(e.value)
    r = subprocess.run([sys.executable, "-m", "cxlfork", "porter",
                        "--config", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr and why in r.stderr, r.stderr


def test_a_burst_of_200_connections_is_answered(porter):  # noqa: F811
    """Every request of a burst gets an HTTP answer (200, or 503 once queue_timeout_s passes),
    none is reset: the listen backlog was socketserver's 5."""
    import http.client
    import threading
    p = porter(ECHO.format(policy="cold", slo=1000))
    codes, errors = [], []
    go = threading.Event()

    def one(i):
        try:
            c = http.client.HTTPConnection("127.0.0.1", p.port, timeout=120)
            go.wait()
            c.request("POST", "/functions/echo/invoke", body=b'{"i": %d}' % i,
                      headers={"Content-Type": "application/json"})
            codes.append(c.getresponse().status)
            c.close()
        except OSError as e:
            errors.append(repr(e))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(180)
    assert not errors, errors[:5]
    assert len(codes) == 200 and set(codes) <= {200, 503}, sorted(set(codes))


def test_a_sigkilled_porters_leftovers_are_removed_at_the_next_start(porter, tmp_path):  # noqa: F811
    import signal as sig
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    extra = f'run_dir = "{run}"'
    a = porter(ECHO.format(policy="mow", slo=1000), extra)
    for i in range(3):
        assert a.invoke("echo", {"i": i})[0] == 200
    st = a.wait_for(lambda s: s["functions"]["echo"]["checkpoint"]["image"], 60, "checkpoint")
    image = st["functions"]["echo"]["checkpoint"]["image"]
    assert os.path.isdir(image)
    pages = [os.path.join(a.store, n) for n in os.listdir(a.store) if n.endswith(".pages")]
    assert pages
    a.p.send_signal(sig.SIGKILL)
    a.p.wait(30)
    for pid in a.tagged_pids():
        os.kill(pid, sig.SIGKILL)
    b = porter(ECHO.format(policy="mow", slo=1000), extra)
    assert not os.path.exists(image) and not any(os.path.exists(q) for q in pages)
    for i in range(3):
        assert b.invoke("echo", {"i": i})[0] == 200
    st = b.wait_for(lambda s: s["functions"]["echo"]["checkpoint"]["image"], 60,
                    "a new checkpoint in the same run_dir")
    assert os.path.isdir(st["functions"]["echo"]["checkpoint"]["image"])
    _, err = b.stop()                       # SIGTERM removes what it made
    assert not os.listdir(run / "images"), err


def test_a_worker_answering_garbage_is_reported_as_such(porter, tmp_path):  # noqa: F811
    w = tmp_path / "garbage.sh"
    w.write_text('#!/bin/sh\nread init\necho \'{"ready": true}\'\nread req\n'
                 'echo "this is not json"\nsleep 60\n')
    w.chmod(0o755)
    p = porter(f'[functions.g]\ncommand = ["{w}"]\npolicy = "cold"\ntimeout_s = 10\n')
    code, out, _ = p.invoke("g", {"x": 1})
    assert code == 502, out
    assert "not JSON: b'this is not json'" in out["error"], out
    assert "killed by signal" not in out["error"], out

"""Real web servers end to end (issue 13 part 5): nginx and a Node.js app, started fresh,
checkpointed while they keep running (`--leave-running`) and cloned, each clone in a network
namespace of its own, answering on the same port while the original keeps serving in ours.

nginx runs as one process (`master_process off; daemon off;`: epoll, an eventfd, a listening
socket, its error log open O_APPEND, MAP_SHARED|MAP_ANONYMOUS memory holding its connection
counter). Its usual master + workers form is a process tree whose workers share the error log
and the listening socket with the master: `cxlfork checkpoint` refuses it naming the shared
fd (tested), since a tree may not share a socketpair end yet.

The Node.js app (tests/cxlfork_progs/node_counter.js) keeps a counter and a 1M-element array
in JS; it runs V8 (JIT code, GC helper threads), libuv (epoll, eventfds, pipes, a threadpool
already started by crypto.pbkdf2 and fs.readFile before the checkpoint) and a setInterval
timer. Each clone answers with the original's state, keeps its own increments, compiles and
runs new code, collects garbage, uses the threadpool and its timer keeps ticking.
With UV_USE_IO_URING=1 libuv has io_uring kernel threads: refused before anything is
seized, the app left serving.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time

import pytest

from cxlfork_netutil import netns_of, new_port
from cxlfork_util import PROGS, cxlfork, new_store, rmtree

from cxlfork.state import netns

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
NODE = shutil.which("node") or shutil.which("nodejs") or "/usr/bin/node"
needs_nginx = pytest.mark.skipif(not os.path.exists(NGINX), reason="no nginx (make setup "
                                 "installs Debian's nginx-light)")
needs_node = pytest.mark.skipif(not os.path.exists(NODE), reason="no node (make setup "
                                "installs Debian's nodejs)")
POLICIES = ["mow", "moa", "moa --eager"]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, namespaces)"),
]


@pytest.fixture(scope="module")
def env():
    d = __import__("tempfile").mkdtemp(prefix="cxlfork-web-")
    s = new_store()
    yield d, s
    rmtree(d)
    rmtree(s)


def http_get(pid: int | None, port: int, path: str, timeout_s: float = 20.0) -> bytes:
    """GET path over HTTP/1.0 from 127.0.0.1:port in PID's network namespace (None: ours),
    retrying while nothing listens yet; the body (status 200 checked)."""
    import socket
    t_end = time.monotonic() + timeout_s
    while True:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=20) if pid is None \
                else netns.connect(pid, ("127.0.0.1", port), timeout=20)
            break
        except (ConnectionRefusedError, ConnectionResetError):
            if time.monotonic() > t_end:
                raise
            time.sleep(0.05)
    with s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split()[1] == b"200", head
    return body


def _kill(pids) -> None:
    for p in pids:
        try:
            os.kill(p, 9)
        except ProcessLookupError:
            pass


def _restore(img: str, mode: str, n: int) -> list[int]:
    info = json.loads(cxlfork("restore", img, "--policy", *mode.split(), "-n", n, "--detach",
                              "--json", "--stdio", "null").stdout)
    pids = info["pids"]
    assert len({netns_of(p) for p in pids} | {netns_of(os.getpid())}) == n + 1
    return pids


# ---------------------------------------------------------------- nginx

def _nginx_conf(d: str, port: int, master: bool) -> str:
    www = os.path.join(d, "www")
    os.makedirs(www, exist_ok=True)
    tmp = os.path.join(d, f"ngx-tmp-{port}")
    conf = os.path.join(d, f"nginx-{port}.conf")
    temps = "".join(f"  {k}_temp_path {tmp};\n"
                    for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    with open(conf, "w") as f:
        f.write(f"daemon off;\nmaster_process {'on' if master else 'off'};\n"
                f"worker_processes {2 if master else 1};\n"
                + ("user root;\n" if master else "")   # workers read our 0700 dirs
                + f"error_log {d}/nginx-{port}.err;\npid {d}/nginx-{port}.pid;\n"
                "events { worker_connections 128; }\n"
                f"http {{\n  access_log off;\n{temps}"
                f"  server {{\n    listen 127.0.0.1:{port};\n    root {www};\n"
                '    location = /conn { return 200 "$connection\\n"; }\n  }\n}\n')
    return conf


def _www(d: str) -> dict[str, bytes]:
    files = {"index.html": b"<p>hello from the checkpoint</p>\n",
             "big.bin": hashlib.sha256(b"seed").digest() * 40000}   # 1.25 MiB, sendfile
    os.makedirs(os.path.join(d, "www"), exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(d, "www", name), "wb") as f:
            f.write(data)
    return files


def _start_nginx(d: str, port: int, master: bool = False) -> subprocess.Popen:
    conf = _nginx_conf(d, port, master)
    log = open(os.path.join(d, f"nginx-{port}.out"), "w")
    p = subprocess.Popen([NGINX, "-c", conf, "-p", d], stdin=subprocess.DEVNULL, stdout=log,
                         stderr=log, close_fds=True)
    log.close()
    try:
        http_get(None, port, "/index.html")
    except BaseException:
        p.terminate()                         # master: its workers exit with it
        p.wait()
        raise
    return p


@needs_nginx
@pytest.mark.parametrize("policy", POLICIES)
def test_nginx_cloned_twice(env, policy):
    """nginx as one process, 5 requests served, cloned twice: each clone serves the static
    files and counts connections on from the original's count (its own copy of nginx's
    shared anonymous memory), as does the original, independently."""
    d, store = env
    files = _www(d)
    port = new_port()
    orig = _start_nginx(d, port)
    img = os.path.join(d, f"nginx-{policy.replace(' ', '')}.img")
    pids: list[int] = []
    try:
        for _ in range(3):
            http_get(None, port, "/big.bin")
        n0 = int(http_get(None, port, "/conn"))         # 1 (start probe) + 3 + this one
        assert n0 == 5
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store, "--leave-running")
        pids = _restore(img, policy, 2)
        for p in pids:
            for name, data in files.items():
                assert http_get(p, port, "/" + name) == data
        a, b = pids
        assert int(http_get(a, port, "/conn")) == n0 + 3
        assert int(http_get(a, port, "/conn")) == n0 + 4
        assert int(http_get(b, port, "/conn")) == n0 + 3
        assert int(http_get(None, port, "/conn")) == n0 + 1
        assert http_get(None, port, "/big.bin") == files["big.bin"]
        assert int(http_get(b, port, "/conn")) == n0 + 4
        assert orig.poll() is None and all(os.path.exists(f"/proc/{p}") for p in pids)
    finally:
        _kill(pids)
        orig.kill()
        orig.wait()
        cxlfork("rm", img, check=False)


@needs_nginx
def test_nginx_master_workers_refused(env):
    """The master + 2 workers tree: refused at checkpoint with one line naming the fd a
    worker shares with the master; the tree keeps serving, not stopped or traced."""
    d, store = env
    _www(d)
    port = new_port()
    orig = _start_nginx(d, port, master=True)
    img = os.path.join(d, "nginx-tree.img")
    try:
        t_end = time.monotonic() + 20
        while len(kids := _children(orig.pid)) < 2:
            assert time.monotonic() < t_end
            time.sleep(0.05)
        r = cxlfork("checkpoint", orig.pid, "-o", img, "--store", store, check=False)
        assert r.returncode == 1
        line, = r.stderr.strip().splitlines()
        assert line.startswith("cxlfork: error: fd ") and "shares its open file description" \
            in line and f"PID {orig.pid}" in line and "can be shared yet" in line, line
        assert not os.path.exists(img)
        for p in [orig.pid] + kids:
            with open(f"/proc/{p}/status") as f:
                st = dict(x.split(":", 1) for x in f.read().splitlines() if ":" in x)
            assert st["TracerPid"].strip() == "0" and st["State"].split()[0] in "SR"
        assert http_get(None, port, "/index.html").startswith(b"<p>hello")
    finally:
        orig.terminate()
        orig.wait()


def _children(pid: int) -> list[int]:
    out = []
    for t in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{t}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


# ---------------------------------------------------------------- Node.js

def _node_state(pid: int | None, port: int, path: str = "/") -> dict:
    return json.loads(http_get(pid, port, path))


@needs_node
@pytest.mark.parametrize("mode", POLICIES + ["mow --pidns new"])
def test_node_app_cloned_twice(env, mode):
    d, store = env
    port = new_port()
    app = os.path.join(PROGS, "node_counter.js")
    log = open(os.path.join(d, f"node-{port}.out"), "w")
    orig = subprocess.Popen([NODE, app, str(port), app], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=log, close_fds=True)
    log.close()
    img = os.path.join(d, f"node-{mode.replace(' ', '')}.img")
    pids: list[int] = []
    try:
        for _ in range(3):
            st = _node_state(None, port, "/inc")
        base = {"counter": 3, "len": 1 << 20, "sum": 523761200, "tsum": 274877644800}
        assert {k: st[k] for k in base} == base
        pool = _node_state(None, port, "/pool")     # starts libuv's threadpool
        with open(app, "rb") as f:
            assert pool["file"] == hashlib.sha256(f.read()).hexdigest()
        ticks0 = _node_state(None, port, "/timer")["ticks"]
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store, "--leave-running")
        pids = _restore(img, mode, 2)
        for p in pids:                              # the original's state
            st = _node_state(p, port)
            assert {k: st[k] for k in base} == base and st["pid"] == orig.pid
        a, b = pids
        for i in range(2):                          # own increments
            assert _node_state(a, port, "/inc")["counter"] == 4 + i
        assert _node_state(b, port, "/push")["len"] == (1 << 20) + 1
        assert _node_state(None, port, "/inc")["counter"] == 4
        for p, want in ((a, 5), (b, 3)):
            st = _node_state(p, port, "/gc")         # ~200 MB of garbage collected
            assert st["counter"] == want and st["churn"] == 1225
            assert st["sum"] == base["sum"] + (3 if p == b else 0)
            assert _node_state(p, port, "/jit")["jit"] == 5998000
            got = _node_state(p, port, "/pool")
            assert (got["key"], got["file"]) == (pool["key"], pool["file"])
            t1 = _node_state(p, port, "/timer")["ticks"]
            time.sleep(0.3)
            t2 = _node_state(p, port, "/timer")["ticks"]
            assert ticks0 <= t1 < t2
            assert _node_state(p, port)["tsum"] == base["tsum"]
        st = _node_state(None, port)
        assert (st["counter"], st["len"]) == (4, 1 << 20)
        assert orig.poll() is None and all(os.path.exists(f"/proc/{p}") for p in pids)
    finally:
        _kill(pids)
        orig.kill()
        orig.wait()
        cxlfork("rm", img, check=False)


@needs_node
def test_node_with_io_uring_refused(env):
    """libuv with io_uring (UV_USE_IO_URING=1: its SQPOLL ring and io-wq workers are kernel
    threads of the process that ptrace cannot stop): refused before anything is seized, one
    line naming such a thread; the app keeps serving, untraced."""
    d, store = env
    port = new_port()
    app = os.path.join(PROGS, "node_counter.js")
    log = open(os.path.join(d, f"node-{port}.out"), "w")
    orig = subprocess.Popen([NODE, app, str(port), app], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=log, close_fds=True,
                            env={**os.environ, "UV_USE_IO_URING": "1"})
    log.close()
    img = os.path.join(d, "node-uring.img")
    try:
        _node_state(None, port, "/pool")
        rings = [f for f in os.listdir(f"/proc/{orig.pid}/fd")
                 if os.readlink(f"/proc/{orig.pid}/fd/{f}") == "anon_inode:[io_uring]"]
        if not rings:
            pytest.skip("this node's libuv does not use io_uring (libuv < 1.45, or "
                        "io_uring disabled here)")
        r = cxlfork("checkpoint", orig.pid, "-o", img, "--store", store, "--leave-running",
                    check=False)
        assert r.returncode == 1
        line, = [x for x in r.stderr.splitlines() if "warning" not in x]
        assert line.startswith(f"cxlfork: error: PID {orig.pid} uses io_uring (its kernel "
                               "thread ") and "iou-" in line, line
        assert not os.path.exists(img)
        with open(f"/proc/{orig.pid}/status") as f:
            assert "TracerPid:\t0\n" in f.read()
        assert _node_state(None, port, "/inc")["counter"] == 1
    finally:
        orig.kill()
        orig.wait()

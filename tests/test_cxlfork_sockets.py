"""Inet and named unix sockets (issue 13 part 1): servers cloned into network namespaces of
their own. A C server (tests/cxlfork_progs/inet.c: TCP v4 and v6 listeners and UDP sockets
with options, a connection) is checkpointed and cloned twice under every restore policy, into
ghosts (cold and warm) too; each clone checks its own sockets, both answer on the same port in
their own namespaces (reached with nsenter) while the original keeps serving, and the
connection reads as reset in the clones. A real server, `python3 -m http.server`, is cloned
twice and each clone serves a GET in its own namespace. `--netns host` with the port taken:
one error line, no process left; no CAP_SYS_ADMIN: one line, nothing made."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from cxlfork_util import (CXLFORK, build_prog, cxlfork, go, new_store, readline, restore_popen,
                          rmtree, start, wait_file)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, namespaces)")

POLICIES = ["mow", "moa", "moa --eager", "hybrid"]
_PORTS = iter(range(41000 + os.getpid() % 1000 * 16, 65000, 4))


def _port() -> int:
    """A new base port for one test (the server uses it and the next two): server-side
    TIME_WAIT sockets of an earlier test keep a port from being bound again in our namespace."""
    return next(_PORTS)


@pytest.fixture(scope="module")
def env():
    d = tempfile.mkdtemp(prefix="cxlfork-sock-")
    s = new_store()
    yield d, s
    rmtree(d)
    rmtree(s)


def in_netns(pid: int, code: str, timeout=20) -> str:
    """Run python code in PID's network namespace (nsenter -t PID -n); its stdout."""
    r = subprocess.run(["nsenter", "-t", str(pid), "-n", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r.stdout


def ask(pid: int | None, family: str, addr: str, port: int) -> str:
    """What the server listening at addr:port in PID's namespace (None: ours) says."""
    code = (f"import socket; s=socket.socket(socket.{family}); s.settimeout(10); "
            f"s.connect(({addr!r},{port})); print(s.recv(100).decode().strip())")
    if pid is None:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=20, check=True).stdout.strip()
    return in_netns(pid, code).strip()


def _netns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def _no_procs(exe: str) -> list[str]:
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


def _check_clones(pids: list[int], orig_pid: int, port: int) -> None:
    """Each clone in its own namespace answers on the same port (v4 and v6), its backlog is
    the original's; the original answers in ours."""
    assert len({_netns(p) for p in pids} | {_netns(os.getpid())}) == len(pids) + 1
    for p in pids:
        assert ask(p, "AF_INET", "127.0.0.1", port) == f"pid {p}"
        assert ask(p, "AF_INET6", "::1", port) == f"pid {p}"
        ss = in_netns(p, "import subprocess; print(subprocess.run(['ss','-ltnH'],"
                         "capture_output=True,text=True).stdout)")
        lines = [x.split() for x in ss.splitlines() if f":{port} " in x + " "]
        assert any(x[0] == "LISTEN" and x[2] == "13" and x[3] == f"0.0.0.0:{port}"
                   for x in lines), ss
    assert ask(None, "AF_INET", "127.0.0.1", port) == f"pid {orig_pid}"


@pytest.mark.parametrize("policy", POLICIES)
def test_server_cloned_twice_into_own_namespaces(env, policy):
    d, store = env
    exe = build_prog("inet", d)
    port = _port()
    orig = start([exe, str(port), "serve"], cwd=d)
    img = os.path.join(d, f"inet-{policy.replace(' ', '')}.img")
    clones = []
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        pids = []
        for k in range(2):              # two restores (each clone its own stdin), both live
            pidfile = f"{img}.pids{k}"
            clones.append(restore_popen(img, "--policy", *policy.split(), "--pidfile", pidfile))
            pids.append(int(wait_file(pidfile, clones[-1])))
        for c in clones:
            c.stdin.write(b"go\n")
            c.stdin.flush()
            assert readline(c.stdout).strip() == "ok"
        orig.stdin.write(b"go\n")
        orig.stdin.flush()
        assert readline(orig.stdout).strip() == "ok"
        _check_clones(pids, orig.pid, port)
        out, rc, _ = go(orig)
        assert rc == 0
        for c in clones:
            c.stdin.close()
            assert c.wait(timeout=30) == 0, c.stderr.read()
    finally:
        for p in [orig] + clones:
            if p.poll() is None:
                p.kill()
                p.wait()
        cxlfork("rm", img, check=False)


@pytest.mark.parametrize("warm", [False, True])
def test_ghost_clones_get_own_namespace(env, warm):
    """A ghost, spawned in our namespace, setns()es into the clone's when it is filled."""
    from cxlfork.ghosts import GhostPool
    from cxlfork.restore import prepare_restore
    d, store = env
    exe = build_prog("inet", d)
    port = _port()
    orig = start([exe, str(port), "serve"], cwd=d)
    img = os.path.join(d, f"inet-ghost-{warm}.img")
    pids: list[int] = []
    pipes = []
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        with prepare_restore(img) as p, \
                (GhostPool(2, prepared=p) if warm else GhostPool(2)) as pool:
            for _ in range(2):
                r0, w0 = os.pipe()
                r1, w1 = os.pipe()
                pids += p.restore(1, stdio=(r0, w1, 2), ghosts=pool)
                os.close(r0)
                os.close(w1)
                pipes.append((os.fdopen(w0, "wb", 0), os.fdopen(r1, "rb", 0)))
            assert pool.stats()["taken"] == 2 and pool.stats()["fallbacks"] == 0
        for w, r in pipes:
            w.write(b"go\n")
            assert readline(r).strip() == "ok"
        orig.stdin.write(b"go\n")
        orig.stdin.flush()
        assert readline(orig.stdout).strip() == "ok"
        _check_clones(pids, orig.pid, port)
        for w, _ in pipes:
            w.close()
        for q in pids:
            _, st = os.waitpid(q, 0)
            assert os.waitstatus_to_exitcode(st) == 0
        pids = []
    finally:
        for q in pids:
            try:
                os.kill(q, 9)
                os.waitpid(q, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        orig.kill()
        orig.wait()
        cxlfork("rm", img, check=False)


def test_netns_host_port_taken_and_free(env):
    """--netns host: the original holds the port, so the clone cannot bind it: one error
    line naming the fd and address, exit 1, no clone left. With the original gone, the clone
    serves in our namespace."""
    d, store = env
    exe = build_prog("inet", d)
    port = _port()
    orig = start([exe, str(port), "serve"], cwd=d)
    img = os.path.join(d, "inet-host.img")
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        r = cxlfork("restore", img, "--netns", "host", "--detach", "--stdio", "null", check=False)
        errors = [x for x in r.stderr.splitlines() if x.startswith("cxlfork: error:")]
        assert r.returncode == 1 and len(errors) == 1, r.stderr
        assert "fd 3: cannot bind TCP 0.0.0.0:%d" % port in errors[0], r.stderr
        assert "Address already in use" in errors[0] and "Traceback" not in r.stderr
        assert _no_procs(exe) == [str(orig.pid)]
        orig.kill()
        orig.wait()
        clone = restore_popen(img, "--netns", "host")
        clone.stdin.write(b"go\n")
        clone.stdin.flush()
        assert readline(clone.stdout).strip() == "ok"
        assert ask(None, "AF_INET", "127.0.0.1", port).startswith("pid ")
        clone.stdin.close()
        assert clone.wait(timeout=30) == 0
    finally:
        if orig.poll() is None:
            orig.kill()
            orig.wait()
        cxlfork("rm", img, check=False)


def test_no_cap_sys_admin_one_line(env):
    """Without CAP_SYS_ADMIN no namespace can be made: one line, exit 1, nothing spawned."""
    d, store = env
    exe = build_prog("inet", d)
    port = _port()
    orig = start([exe, str(port), "serve"], cwd=d)
    img = os.path.join(d, "inet-nocap.img")
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        r = subprocess.run(["setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin",
                            *CXLFORK, "restore", img, "-n", "2", "--detach", "--stdio", "null"],
                           capture_output=True, text=True, timeout=60)
        errors = [x for x in r.stderr.splitlines() if x.startswith("cxlfork: error:")]
        assert r.returncode == 1 and len(errors) == 1, r.stderr
        assert "cannot make a network namespace for the clone" in errors[0]
        assert "CAP_SYS_ADMIN" in errors[0] and "--netns host" in errors[0]
        assert _no_procs(exe) == [str(orig.pid)]
    finally:
        orig.kill()
        orig.wait()
        cxlfork("rm", img, check=False)


def _http_get(pid: int | None, port: int, path: str) -> str:
    code = ("import urllib.request; print(urllib.request.urlopen("
            f"'http://127.0.0.1:{port}/{path}', timeout=10).read().decode())")
    if pid is None:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=30, check=True).stdout
    return in_netns(pid, code)


def test_http_server_cloned_twice(env):
    """A real server: `python3 -m http.server` (socketserver, poll loop), started with
    close_fds and stdin /dev/null, checkpointed while serving, cloned twice; each clone
    serves a GET of a file in its own namespace, and so does the original in ours."""
    d, store = env
    www = tempfile.mkdtemp(dir=d)
    with open(os.path.join(www, "hello.txt"), "w") as f:
        f.write("hello from the checkpoint\n")
    port = _port()
    log = open(os.path.join(d, "http.log"), "w")
    orig = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                             "127.0.0.1"], cwd=www, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=log, close_fds=True)
    img = os.path.join(d, "http.img")
    pids: list[int] = []
    try:
        t = time.monotonic()
        while True:
            try:
                assert _http_get(None, port, "hello.txt") == "hello from the checkpoint\n\n"
                break
            except subprocess.CalledProcessError:
                assert time.monotonic() - t < 20 and orig.poll() is None
                time.sleep(0.1)
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        r = cxlfork("restore", img, "-n", 2, "--detach", "--json", "--stdio", "null")
        info = json.loads(r.stdout)
        pids = info["pids"]
        assert [c["pid"] for c in info["clones"]] == pids
        for c in info["clones"]:
            assert c["netns"] == f"/proc/{c['pid']}/ns/net"
            assert c["netns_id"] == _netns(c["pid"]) != _netns(os.getpid())
        for p in pids:
            assert _http_get(p, port, "hello.txt") == "hello from the checkpoint\n\n"
        assert _http_get(None, port, "hello.txt") == "hello from the checkpoint\n\n"
        assert orig.poll() is None
    finally:
        for p in pids:
            try:
                os.kill(p, 9)
            except ProcessLookupError:
                pass
        orig.kill()
        orig.wait()
        log.close()
        cxlfork("rm", img, check=False)


@pytest.mark.parametrize("policy", POLICIES)
def test_unix_sockets(env, policy):
    """Abstract-named unix listeners and a bound datagram socket come back under their names
    in the clone's namespace (while the original keeps them in ours), a connection through
    a listener with both ends inside keeps its queue, shut-down socketpair ends stay shut
    down, and a connection to a peer outside the process reads as reset in the clone."""
    d, store = env
    exe = build_prog("unixsk", d)
    prefix = f"cxu{os.getpid()}{policy.replace(' ', '')}"
    mine, theirs = socket.socketpair()
    orig = subprocess.Popen([exe, prefix, str(theirs.fileno())], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, pass_fds=[theirs.fileno()])
    theirs.close()
    img = os.path.join(d, f"unixsk-{policy.replace(' ', '')}.img")
    clone = None
    try:
        assert readline(orig.stdout).strip() == "ready"
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        pidfile = img + ".pids"
        clone = restore_popen(img, "--policy", *policy.split(), "--pidfile", pidfile)
        wait_file(pidfile, clone)
        out, rc, err = go(clone)
        assert out.strip() == "ok" and rc == 0, f"clone: {out!r} rc={rc} {err}"
        mine.send(b"O")
        out, rc, _ = go(orig)
        assert out.strip() == "ok" and rc == 0, f"original: {out!r}"
        assert mine.recv(1) == b"o"
    finally:
        mine.close()
        for p in (orig, clone):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        cxlfork("rm", img, check=False)

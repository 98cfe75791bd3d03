"""Network namespaces of clones at the edges: `--netns host` with the port taken (one error
line, no process left) and free; no CAP_SYS_ADMIN (one line, nothing made); SO_BINDTODEVICE
to a device the clone's namespace lacks; no thread of the restoring process left in (and
pinning) a clone's namespace; cxlfork.state.netns.connect into a clone."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from cxlfork_netutil import ask, netns_of, new_port, other_device, procs_of
from cxlfork_util import CXLFORK, build_prog, cxlfork, new_store, readline, restore_popen, \
    rmtree, start

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, namespaces)")


@pytest.fixture(scope="module")
def env():
    d = tempfile.mkdtemp(prefix="cxlfork-netns-")
    s = new_store()
    yield d, s
    rmtree(d)
    rmtree(s)


def test_netns_host_port_taken_and_free(env):
    """--netns host: the original holds the port, so the clone cannot bind it: one error
    line naming the fd and address, exit 1, no clone left. With the original gone, the clone
    serves in our namespace."""
    d, store = env
    exe = build_prog("inet", d)
    port = new_port()
    orig = start([exe, str(port), "serve"], cwd=d)
    img = os.path.join(d, "inet-host.img")
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        r = cxlfork("restore", img, "--netns", "host", "--detach", "--stdio", "null", check=False)
        errors = [x for x in r.stderr.splitlines() if x.startswith("cxlfork: error:")]
        assert r.returncode == 1 and len(errors) == 1, r.stderr
        assert "fd 3: cannot bind TCP 0.0.0.0:%d" % port in errors[0], r.stderr
        assert "Address already in use" in errors[0] and "Traceback" not in r.stderr
        assert procs_of(exe) == [str(orig.pid)]
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
    port = new_port()
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
        assert procs_of(exe) == [str(orig.pid)]
    finally:
        orig.kill()
        orig.wait()
        cxlfork("rm", img, check=False)


def test_bound_to_device(env):
    """SO_BINDTODEVICE: lo is carried into the clone's namespace; a device the clone's
    namespace does not have makes that restore fail with one line naming it (nothing left),
    and --netns host restores it."""
    d, store = env
    dev = other_device()
    if dev is None:
        pytest.skip("no network device but lo")
    code = ("import socket,sys\n"
            "a=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); a.setsockopt(socket.SOL_SOCKET,25,b'lo')\n"
            "a.bind(('127.0.0.1',0))\n"
            "b=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            f"b.setsockopt(socket.SOL_SOCKET,25,{dev.encode()!r}) if sys.argv[1]=='dev' else None\n"
            "print('ready',flush=True); sys.stdin.readline()\n"
            "assert a.getsockopt(socket.SOL_SOCKET,25,16).rstrip(b'\\0')==b'lo'\n"
            f"assert b.getsockopt(socket.SOL_SOCKET,25,16).rstrip(b'\\0')=="
            f"({dev.encode()!r} if sys.argv[1]=='dev' else b'')\n"
            "print('ok')\n")
    for mode in ("lo", "dev"):
        orig = start([sys.executable, "-c", code, mode])
        img = os.path.join(d, f"dev-{mode}.img")
        try:
            cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
            r = cxlfork("restore", img, check=False, input="go\n")
            if mode == "lo":
                assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
            else:
                errors = [x for x in r.stderr.splitlines() if x.startswith("cxlfork: error:")]
                assert r.returncode == 1 and len(errors) == 1, r.stderr
                assert f"is bound to device {dev} (SO_BINDTODEVICE)" in errors[0], r.stderr
                orig.kill()                 # frees its ports for --netns host
                orig.wait()
                r = cxlfork("restore", img, "--netns", "host", check=False, input="go\n")
                assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
        finally:
            orig.kill()
            orig.wait()
            cxlfork("rm", img, check=False)


def test_no_namespace_outlives_its_clone(env):
    """Lazy moa: the handler thread this process starts at the first clone must not be born
    in (and pin) that clone's namespace; once the clones are gone no thread of ours is in
    another namespace."""
    from cxlfork.restore import restore
    d, store = env
    exe = build_prog("inet", d)
    port = new_port()
    orig = start([exe, str(port)], cwd=d)
    img = os.path.join(d, "lazyns.img")
    pids = []
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        null = os.open("/dev/null", os.O_RDWR)
        r, w = os.pipe()                # the clones wait in their read of "go"
        pids = restore(img, policy="moa", n=2, stdio=(r, null, null))
        os.close(null)
        os.close(r)
        time.sleep(0.2)
        clone_ns = {netns_of(p) for p in pids}
        ours = {os.readlink(f"/proc/self/task/{t}/ns/net") for t in os.listdir("/proc/self/task")}
        assert ours == {netns_of(os.getpid())} and not ours & clone_ns, (ours, clone_ns)
        os.close(w)
    finally:
        for p in pids:
            os.kill(p, 9)
            os.waitpid(p, 0)
        orig.kill()
        orig.wait()
        cxlfork("rm", img, check=False)


def test_connect_helper(env):
    """cxlfork.state.netns.connect: a socket connected inside a clone's namespace, used from
    this thread afterwards (what a front end such as the porter needs)."""
    from cxlfork.restore import restore
    from cxlfork.state import netns
    d, store = env
    exe = build_prog("inet", d)
    port = new_port()
    orig = start([exe, str(port), "serve"], cwd=d)
    img = os.path.join(d, "connect.img")
    pids = []
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        r, w = os.pipe()
        r1, w1 = os.pipe()
        pids = restore(img, stdio=(r, w1, 2))
        os.close(r)
        os.close(w1)
        os.write(w, b"go\n")
        assert readline(os.fdopen(r1, "rb", 0)).strip() == "ok"
        s = netns.connect(pids[0], ("::1", port), socket.AF_INET6, timeout=10)
        assert s.recv(100) == f"pid {pids[0]}\n".encode()
        s.close()
        assert netns.of(pids[0]) != netns.of(os.getpid())
        os.close(w)
        _, st = os.waitpid(pids[0], 0)
        assert os.waitstatus_to_exitcode(st) == 0
        pids = []
    finally:
        for p in pids:
            os.kill(p, 9)
            os.waitpid(p, 0)
        orig.kill()
        orig.wait()
        cxlfork("rm", img, check=False)


def test_netns_host_reuseport_shares_the_port(env):
    """--netns host with a listener that set SO_REUSEPORT (same user): the clones join the
    original's reuseport group and the kernel spreads new connections over all three."""
    d, store = env
    port = new_port()
    code = ("import socket,os,sys\n"
            "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEPORT,1)\n"
            f"s.bind(('127.0.0.1',{port})); s.listen(64)\n"
            "print('ready',flush=True)\n"
            "while True:\n"
            "    c,_=s.accept(); c.sendall(b'pid %d\\n' % os.getpid()); c.close()\n")
    orig = start([sys.executable, "-c", code])
    img = os.path.join(d, "reuseport.img")
    pids = []
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        r = cxlfork("restore", img, "-n", 2, "--netns", "host", "--detach", "--stdio", "null")
        pids = [int(x) for x in r.stdout.split()]
        assert all(netns_of(p) == netns_of(os.getpid()) for p in pids)
        seen = {ask(None, "AF_INET", "127.0.0.1", port) for _ in range(40)}
        assert len(seen) >= 2 and seen <= {f"pid {p}" for p in pids + [orig.pid]}, seen
    finally:
        for p in pids:
            try:
                os.kill(p, 9)
            except ProcessLookupError:
                pass
        orig.kill()
        orig.wait()
        cxlfork("rm", img, check=False)

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


def test_clone_of_a_clone(env):
    """A clone, itself in a namespace of its own, checkpointed and restored again: its
    sockets are read in their namespace (sock_diag there: the listener's backlog), and its
    connection, reset already and its error not read, is still a connection (reset again
    in the new clone), not a bound socket."""
    d, store = env
    exe = build_prog("inet", d)
    port = _port()
    orig = start([exe, str(port), "serve"], cwd=d)
    img1, img2 = os.path.join(d, "gen1.img"), os.path.join(d, "gen2.img")
    procs = [orig]
    try:
        cxlfork("checkpoint", orig.pid, "-o", img1, "--store", store)
        c1 = restore_popen(img1, "--pidfile", img1 + ".pids")
        procs.append(c1)
        pid1 = int(wait_file(img1 + ".pids", c1))
        cxlfork("checkpoint", pid1, "-o", img2, "--store", store)
        c2 = restore_popen(img2, "--pidfile", img2 + ".pids")
        procs.append(c2)
        pid2 = int(wait_file(img2 + ".pids", c2))
        for c in (c1, c2):
            c.stdin.write(b"go\n")
            c.stdin.flush()
            assert readline(c.stdout).strip() == "ok"
        assert _netns(pid1) != _netns(pid2)
        for p in (pid1, pid2):
            assert ask(p, "AF_INET", "127.0.0.1", port) == f"pid {p}"
        for c in (c1, c2):
            c.stdin.close()
            assert c.wait(timeout=30) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        cxlfork("rm", img1, check=False)
        cxlfork("rm", img2, check=False)


def _other_device() -> str | None:
    with open("/proc/net/dev") as f:
        names = [x.split(":")[0].strip() for x in f.read().splitlines()[2:]]
    return next((n for n in names if n != "lo"), None)


def test_bound_to_device(env):
    """SO_BINDTODEVICE: lo is carried into the clone's namespace; a device the clone's
    namespace does not have makes that restore fail with one line naming it (nothing left),
    and --netns host restores it."""
    d, store = env
    dev = _other_device()
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
    port = _port()
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
        clone_ns = {_netns(p) for p in pids}
        ours = {os.readlink(f"/proc/self/task/{t}/ns/net") for t in os.listdir("/proc/self/task")}
        assert ours == {_netns(os.getpid())} and not ours & clone_ns, (ours, clone_ns)
        os.close(w)
    finally:
        for p in pids:
            os.kill(p, 9)
            os.waitpid(p, 0)
        orig.kill()
        orig.wait()
        cxlfork("rm", img, check=False)


def _host_addrs() -> list[tuple[str, str]]:
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


def test_specific_addresses(env):
    """Listeners bound to this host's own (non-loopback) v4 and v6 addresses: the clone's
    namespace gets those addresses on its lo and the clone listens at them."""
    addrs = _host_addrs()
    if not addrs:
        pytest.skip("no non-loopback address on this host")
    d, store = env
    port = _port()
    code = ("import socket,sys,os,select\n"
            "ls=[]\n"
            "for fam,a in zip(sys.argv[2::2],sys.argv[3::2]):\n"
            "    s=socket.socket(getattr(socket,fam)); s.bind((a,int(sys.argv[1]))); s.listen()\n"
            "    ls.append(s)\n"
            "print('ready',flush=True)\n"
            "while True:\n"
            "    for s in select.select(ls,[],[])[0]:\n"
            "        c,_=s.accept(); c.sendall(b'pid %d\\n' % os.getpid()); c.close()\n")
    orig = start([sys.executable, "-c", code, str(port), *[x for fa in addrs for x in fa]])
    img = os.path.join(d, "addrs.img")
    pids = []
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        r = cxlfork("restore", img, "-n", 2, "--detach", "--json", "--stdio", "null")
        pids = json.loads(r.stdout)["pids"]
        for p in pids:
            for fam, a in addrs:
                assert ask(p, fam, a, port) == f"pid {p}"
        for fam, a in addrs:
            assert ask(None, fam, a, port) == f"pid {orig.pid}"
    finally:
        for p in pids:
            try:
                os.kill(p, 9)
            except ProcessLookupError:
                pass
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
    port = _port()
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

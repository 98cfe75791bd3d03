"""Inet and named unix sockets (issue 13 part 1): servers cloned into network namespaces of
their own. A C server (tests/cxlfork_progs/inet.c: TCP v4 and v6 listeners and UDP sockets
with options, a connection) is checkpointed and cloned twice under every restore policy, into
ghosts (cold and warm) too; each clone checks its own sockets, both answer on the same port in
their own namespaces (reached with nsenter) while the original keeps serving, and the
connection reads as reset in the clones. A real server, `python3 -m http.server`, is cloned
twice and each clone serves a GET in its own namespace. Unix sockets (unixsk.c) under every
policy; listeners at the host's own addresses; a clone of a clone. What a namespace does at
the edges (--netns host, no CAP_SYS_ADMIN, devices): test_cxlfork_netns.py."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from cxlfork_netutil import ask, host_addrs, in_netns, netns_of, new_port
from cxlfork_util import build_prog, cxlfork, go, new_store, readline, restore_popen, rmtree, \
    start, wait_file

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, namespaces)")

POLICIES = ["mow", "moa", "moa --eager", "hybrid"]


@pytest.fixture(scope="module")
def env():
    d = tempfile.mkdtemp(prefix="cxlfork-sock-")
    s = new_store()
    yield d, s
    rmtree(d)
    rmtree(s)


def _check_clones(pids: list[int], orig_pid: int, port: int) -> None:
    """Each clone in its own namespace answers on the same port (v4 and v6), its backlog is
    the original's; the original answers in ours."""
    assert len({netns_of(p) for p in pids} | {netns_of(os.getpid())}) == len(pids) + 1
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
    port = new_port()
    orig = start([exe, str(port), "serve"], cwd=d)
    img = os.path.join(d, f"inet-{policy.replace(' ', '')}.img")
    clones = []
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        shown = cxlfork("inspect", img).stdout
        assert f"TCP 0.0.0.0:{port} listen backlog 13" in shown and \
            f"TCP [::]:{port} listen backlog 5" in shown and \
            f"UDP [::1]:{port} bound" in shown and " reset" in shown, shown
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


def _ns_fds() -> int:
    """How many network namespace fds this process holds."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("net:[")
        except OSError:
            pass
    return n


@pytest.mark.parametrize("warm", [False, True])
def test_ghost_clones_get_own_namespace(env, warm):
    """A ghost, spawned in our namespace, setns()es into the clone's when it is filled."""
    from cxlfork.ghosts import GhostPool
    from cxlfork.restore import prepare_restore
    d, store = env
    exe = build_prog("inet", d)
    port = new_port()
    orig = start([exe, str(port), "serve"], cwd=d)
    img = os.path.join(d, f"inet-ghost-{warm}.img")
    pids: list[int] = []
    pipes = []
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        held = _ns_fds()
        with prepare_restore(img) as p, \
                (GhostPool(2, prepared=p, refill="manual") if warm else GhostPool(2)) as pool:
            # a warm pool made each ghost's namespace with the ghost: the clone gets that one
            premade = {os.fstat(g.netns.fd).st_ino for g in pool._idle} if warm else set()
            assert len(premade) == (2 if warm else 0)
            for _ in range(2):
                r0, w0 = os.pipe()
                r1, w1 = os.pipe()
                pids += p.restore(1, stdio=(r0, w1, 2), ghosts=pool)
                os.close(r0)
                os.close(w1)
                pipes.append((os.fdopen(w0, "wb", 0), os.fdopen(r1, "rb", 0)))
            assert pool.stats()["taken"] == 2 and pool.stats()["fallbacks"] == 0
            if warm:
                assert {os.stat(f"/proc/{q}/ns/net").st_ino for q in pids} == premade
            pool.refill()                   # idle ghosts with namespaces, closed with the pool
        assert _ns_fds() == held            # no namespace fd of ours left open
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
    port = new_port()
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
            assert c["netns_id"] == netns_of(c["pid"]) != netns_of(os.getpid())
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
    port = new_port()
    orig = start([exe, str(port), "serve"], cwd=d)
    img1, img2 = os.path.join(d, "gen1.img"), os.path.join(d, "gen2.img")
    procs = [orig]
    try:
        cxlfork("checkpoint", orig.pid, "-o", img1, "--store", store)
        # eager moa: a mow clone's store-mapped memory is registered with cxlfork's
        # userfaultfd, and checkpointing such a clone is refused (test_cxlfork_conformance)
        c1 = restore_popen(img1, "--pidfile", img1 + ".pids", "--policy", "moa", "--eager")
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
        assert netns_of(pid1) != netns_of(pid2)
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


def test_specific_addresses(env):
    """Listeners bound to this host's own (non-loopback) v4 and v6 addresses, and a v6
    socket bound to the v4 one as ::ffff:a.b.c.d: the clone's namespace gets those
    addresses on its lo and the clone listens at them (each on its own port)."""
    addrs = host_addrs()
    if not addrs:
        pytest.skip("no non-loopback address on this host")
    addrs += [("AF_INET6", "::ffff:" + a) for fam, a in addrs if fam == "AF_INET"]
    d, store = env
    port = new_port()
    code = ("import socket,sys,os,select\n"
            "ls=[]\n"
            "for i,(fam,a) in enumerate(zip(sys.argv[2::2],sys.argv[3::2])):\n"
            "    s=socket.socket(getattr(socket,fam)); s.bind((a,int(sys.argv[1])+i)); s.listen()\n"
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
            for i, (fam, a) in enumerate(addrs):
                assert ask(p, fam, a, port + i) == f"pid {p}"
        for i, (fam, a) in enumerate(addrs):
            assert ask(None, fam, a, port + i) == f"pid {orig.pid}"
    finally:
        for p in pids:
            try:
                os.kill(p, 9)
            except ProcessLookupError:
                pass
        orig.kill()
        orig.wait()
        cxlfork("rm", img, check=False)


def test_clone_namespace_addresses():
    """The addresses a clone's lo gets: specific ones of listening/bound sockets, the v4
    address of a v4-mapped v6 one; not wildcards, loopback or a connection's."""
    from cxlfork.state.netns import local_addrs
    fds = [dict(kind="inet", state=st, family=fam, addr=a) for st, fam, a in [
        ("listen", 10, "::ffff:198.51.100.7"), ("listen", 2, "0.0.0.0"), ("bound", 10, "::"),
        ("listen", 2, "127.0.0.9"), ("bound", 10, "2001:db8::5"), ("reset", 2, "10.1.1.1"),
        ("listen", 2, "198.51.100.7"), ("listen", 10, "::ffff:127.0.0.1")]]
    assert local_addrs({"fds": fds}) == [(socket.AF_INET, "198.51.100.7"),
                                         (socket.AF_INET6, "2001:db8::5")]


def _ask_path(pid: int | None, path: str) -> str:
    """What the unix listener at path says, seen from PID's mount namespace (None: ours)."""
    code = (f"import socket; s=socket.socket(socket.AF_UNIX); s.settimeout(10); "
            f"s.connect({path!r}); print(s.recv(100).decode().strip())")
    argv = [sys.executable, "-c", code]
    if pid is not None:
        argv = ["nsenter", "-t", str(pid), "-m"] + argv
    r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.parametrize("how", POLICIES + ["warm ghost", "cold ghost", "mow --pidns new"])
def test_unix_path_sockets(env, how):
    """Unix sockets bound to paths: each clone binds its own at the same path on a tmpfs, mounted over
    the original path in a mount namespace of its own; the clone reaches its own sockets by
    path (and getsockname gives it), `nsenter -t CLONE -m` reaches the clone's, everyone else
    the original's; nothing is mounted in our namespace. With --pidns new each clone is also
    in a PID namespace of its own (under the original's PID, which it answers)."""
    from cxlfork.ghosts import GhostPool
    from cxlfork.restore import prepare_restore
    d, store = env
    exe = build_prog("unixpath", d)
    sdir = tempfile.mkdtemp(dir=d)
    orig = start([exe, sdir, "serve"], cwd=d)
    img = os.path.join(d, f"upath-{how.replace(' ', '')}.img")
    path = os.path.join(sdir, "stream.sock")
    pids: list[int] = []
    pipes = []
    clones = []
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        if how.endswith("ghost"):
            with prepare_restore(img) as p, \
                    (GhostPool(2, prepared=p) if how == "warm ghost" else GhostPool(2)) as pool:
                for _ in range(2):
                    r0, w0 = os.pipe()
                    r1, w1 = os.pipe()
                    pids += p.restore(1, stdio=(r0, w1, 2), ghosts=pool)
                    os.close(r0)
                    os.close(w1)
                    pipes.append((os.fdopen(w0, "wb", 0), os.fdopen(r1, "rb", 0)))
                assert pool.stats()["fallbacks"] == 0
        else:
            for k in range(2):
                pidfile = f"{img}.pids{k}"
                clones.append(restore_popen(img, "--policy", *how.split(), "--pidfile", pidfile))
                pids.append(int(wait_file(pidfile, clones[-1])))
                pipes.append((clones[-1].stdin, clones[-1].stdout))
        for w, r in pipes:
            w.write(b"go\n")
            w.flush()
            assert readline(r).strip() == "ok"
        orig.stdin.write(b"go\n")
        orig.stdin.flush()
        assert readline(orig.stdout).strip() == "ok"
        for q in pids:
            assert _ask_path(q, path) == f"pid {orig.pid if 'pidns' in how else q}"
            if "pidns" in how:
                assert os.readlink(f"/proc/{q}/ns/pid") != os.readlink("/proc/self/ns/pid")
        assert _ask_path(None, path) == f"pid {orig.pid}"
        with open("/proc/self/mountinfo") as f:     # nothing mounted in our namespace
            assert sdir not in f.read()
        with open(f"/proc/{pids[0]}/mountinfo") as f:
            theirs = [x.split()[4] for x in f.read().splitlines() if sdir in x]
        assert sorted(theirs) == [os.path.join(sdir, "dgram.sock"), path]   # its sockets
        for w, _ in pipes:
            w.close()
        for c in clones:        # the restore command reaps its clone (spawned by a thread)
            assert c.wait(timeout=30) == 0, c.stderr.read()
        for q in pids if how.endswith("ghost") else []:
            _, st = os.waitpid(q, 0)
            assert os.waitstatus_to_exitcode(st) == 0
        pids = []
    finally:
        for q in pids:
            try:
                os.kill(q, 9)
            except ProcessLookupError:
                pass
        for c in clones + [orig]:
            if c.poll() is None:
                c.kill()
            c.wait()
        for q in pids if how.endswith("ghost") else []:
            try:
                os.waitpid(q, 0)
            except ChildProcessError:
                pass
        cxlfork("rm", img, check=False)

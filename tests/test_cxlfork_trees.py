"""Process trees of real servers (cxlfork/tree.py, cxlfork/tree_restore.py): a pre-fork
worker pool sharing one listening socket and a socketserver.ForkingTCPServer with a live
child, each checkpointed whole and cloned into its own PID and network namespaces; the
clone answers over TCP through its children, the original keeps serving."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from cxlfork_netutil import new_port
from cxlfork_util import PROGS, cxlfork, new_store, readline, restore_popen, rmtree, wait_file

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, namespaces)")
PREFORK = os.path.join(PROGS, "prefork.py")


def _ask(pid: int | None, port: int, req: str) -> list[str]:
    """One request to 127.0.0.1:port (in PID's network namespace; None: ours)."""
    if pid is None:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
    else:
        from cxlfork.state.netns import connect
        s = connect(pid, ("127.0.0.1", port), timeout=10)
    with s:
        s.sendall(req.encode() + b"\n")
        data = b""
        while chunk := s.recv(200):
            data += chunk
    return data.decode().split()


def _popen(*args) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, PREFORK, *map(str, args)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, close_fds=True)
    line = readline(p.stdout)
    assert line.startswith("ready"), line
    return p, line


def _wait_kids(pid: int, n: int) -> list[int]:
    """PID's children, once it has n (live ones: finished ones are reaped meanwhile)."""
    for _ in range(500):
        kids = [k.pid for k in psutil.Process(pid).children()
                if k.status() != psutil.STATUS_ZOMBIE]
        if len(kids) == n and len(psutil.Process(pid).children()) == n:
            return kids
        time.sleep(0.01)
    raise AssertionError(f"PID {pid} has {kids}, not {n} children")


def _check_shared(img: str, root: int) -> None:
    """Each open file description the image's processes shared (manifest "shared") is one
    in the clone tree of root (kcmp), among them the listener."""
    from cxlfork.tree import _same_ofd
    with open(os.path.join(img, "manifest.json")) as f:
        shared = json.load(f)["tree"]["shared"]
    host = {root: root}
    for k in psutil.Process(root).children(recursive=True):
        with open(f"/proc/{k.pid}/status") as f:
            nspid = next(int(x.split()[-1]) for x in f if x.startswith("NSpid:"))
        host[nspid] = k.pid
    with open(f"/proc/{root}/status") as f:
        host[next(int(x.split()[-1]) for x in f if x.startswith("NSpid:"))] = root
    socks = 0
    for x in shared:
        assert _same_ofd(host[x["from_pid"]], x["from_fd"], host[x["pid"]], x["fd"]), x
        socks += os.readlink(f"/proc/{host[x['pid']]}/fd/{x['fd']}").startswith("socket:")
    assert socks >= 3, shared          # the listener, in each worker


def _kill(p: subprocess.Popen | None) -> None:
    """Kill a restore command and the clone tree it restored (its child, --pidfile's root:
    with it goes the PID namespace's init and so every process in the namespace)."""
    if p is None or p.poll() is not None:
        return
    root = getattr(p, "root", None)
    try:
        if root is not None and psutil.Process(root).ppid() == p.pid:
            os.kill(root, 9)
    except (psutil.NoSuchProcess, ProcessLookupError):
        pass
    p.kill()
    p.wait()


def _finish(p: subprocess.Popen) -> str:
    p.stdin.write(b"quit\n")
    p.stdin.flush()
    out, _ = p.communicate(timeout=60)
    return out.decode()


@pytest.mark.parametrize("policy", [["--policy", "mow"], ["--policy", "moa"],
                                    ["--policy", "moa", "--eager"]])
def test_prefork_pool_cloned(policy):
    """Three workers blocked in accept() on the socket their parent bound: the tree is
    checkpointed whole (the listener is one open file description in four processes) and
    restored twice, each clone tree in its own PID and network namespace. Each clone's
    workers answer through the restored listener under their checkpointed PIDs, parent and
    counters, and share one total in the shared anonymous page their parent mapped (one
    object per clone tree, not one per process); the original's workers go on counting from where they were, and the clones'
    parents kill and reap their workers by the stored PIDs."""
    d = tempfile.mkdtemp(prefix="cxlfork-prefork-")
    s = new_store()
    port = new_port()
    orig, line = _popen("pool", port, 3)
    workers = [int(x) for x in line.split()[1:]]
    img = os.path.join(d, "pool.img")
    clones = []
    try:
        _wait_kids(orig.pid, 3)
        seen: dict[int, int] = {}
        for k in range(6):
            pid, ppid, _, count, req, total = _ask(None, port, f"pre{k}")
            assert int(ppid) == orig.pid and int(pid) in workers and total == str(k + 1)
            seen[int(pid)] = int(count)
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", s)
        with open(os.path.join(img, "manifest.json")) as f:
            assert '"shared"' in f.read()
        for k in range(2):
            pidfile = f"{img}.pids{k}"
            clones.append(restore_popen(img, "--pidns", "new", *policy, "--pidfile", pidfile))
            clones[-1].root = int(wait_file(pidfile, clones[-1]).split()[0])
        for c in clones + [None]:
            root = None if c is None else c.root
            counts = dict(seen)
            answered = set()
            for k in range(9):
                pid, ppid, _, count, req, total = _ask(root, port, f"req{k}")
                assert int(pid) in workers and int(ppid) == orig.pid and req == f"req{k}"
                assert total == str(7 + k), (k, total)      # one shared page per tree
                assert int(count) == counts.get(int(pid), 0) + 1, (pid, count, counts)
                counts[int(pid)] = int(count)
                answered.add(int(pid))
            assert len(answered) >= 2, answered     # through more than one worker
            if c is not None:
                assert os.readlink(f"/proc/{root}/ns/net") != os.readlink("/proc/self/ns/net")
                assert len(psutil.Process(root).children()) == 3
                _check_shared(img, root)
            else:
                seen = counts
        for c in clones:
            assert _finish(c).strip() == "done ok"
            assert c.returncode == 0, c.stderr.read().decode()
        assert _finish(orig).strip() == "done ok"
    finally:
        for p in clones + [orig]:
            _kill(p)
        for w in workers:
            try:
                os.kill(w, 9)
            except ProcessLookupError:
                pass
        cxlfork("rm", img, check=False)
        rmtree(d)
        rmtree(s)


def test_prefork_pool_on_a_unix_path_cloned():
    """The pool on a unix socket bound to a path (the listener shared by the parent and its
    workers): each clone tree has its own socket at that path in its mount namespace and
    answers there through its workers (the original tree stopped meanwhile), their total
    going on from the checkpoint's; the original answers at the path in ours."""
    d = tempfile.mkdtemp(prefix="cxlfork-unixpool-")
    s = new_store()
    path = os.path.join(d, "pool.sock")
    orig, line = _popen("pool", path, 2)
    workers = [int(x) for x in line.split()[1:]]
    img = os.path.join(d, "pool.img")
    clones = []
    code = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.settimeout(10); "
            f"s.connect({path!r}); s.sendall(b'x\\n'); print(s.recv(200).decode())")

    def ask(root):
        argv = [sys.executable, "-c", code]
        if root is not None:
            argv = ["nsenter", "-t", str(root), "-m"] + argv
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()
    try:
        _wait_kids(orig.pid, 2)
        for k in range(3):
            assert ask(None)[5] == str(k + 1)
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", s)
        for k in range(2):
            pidfile = f"{img}.pids{k}"
            clones.append(restore_popen(img, "--pidns", "new", "--pidfile", pidfile))
            clones[-1].root = int(wait_file(pidfile, clones[-1]).split()[0])
        tree = [orig.pid] + workers
        for p in tree:
            os.kill(p, signal.SIGSTOP)
        try:
            for c in clones:
                for k in range(3):
                    pid, ppid, _, _, _, total = ask(c.root)
                    assert int(pid) in workers and int(ppid) == orig.pid and total == str(4 + k)
        finally:
            for p in tree:
                os.kill(p, signal.SIGCONT)
        assert ask(None)[5] == "4"
        for c in clones:
            assert _finish(c).strip() == "done ok"
        assert _finish(orig).strip() == "done ok"
    finally:
        for p in clones + [orig]:
            _kill(p)
        cxlfork("rm", img, check=False)
        rmtree(d)
        rmtree(s)


@pytest.mark.parametrize("policy", [["--policy", "mow"], ["--policy", "moa"]])
def test_forking_tcp_server_with_a_live_child_cloned(policy):
    """socketserver.ForkingTCPServer holding a live child (a connection held open by this
    test) is cloned: in the clone that child's connection reads as reset (it exits 3 and the
    clone's server reaps it by its stored PID), new connections are served by children the
    clone forks (count goes on from the checkpoint's); the original's child still holds its
    connection, and the original keeps serving with its own count. Under lazy moa the
    children the clone forks are served by the same userfaultfd handler."""
    d = tempfile.mkdtemp(prefix="cxlfork-forking-")
    s = new_store()
    port = new_port()
    orig, _ = _popen("forking", port)
    img = os.path.join(d, "fork.img")
    clone = None
    hold = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        for k in range(3):
            assert _ask(None, port, f"pre{k}")[2] == str(k + 2)   # the held one was 1
        hold.sendall(b"hold\n")
        assert hold.recv(100) == b"holding\n"
        child, = _wait_kids(orig.pid, 1)
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", s)
        pidfile = f"{img}.pids"
        clone = restore_popen(img, "--pidns", "new", *policy, "--pidfile", pidfile)
        root = clone.root = int(wait_file(pidfile, clone).split()[0])
        for k in range(3):
            pid, ppid, count, req = _ask(root, port, f"c{k}")
            assert int(ppid) == orig.pid and int(count) == 5 + k and req == f"c{k}"
            assert int(pid) != child
        for _ in range(300):                # the restored child exited 3 and was reaped
            if not psutil.Process(root).children():
                break
            time.sleep(0.02)
        assert psutil.Process(root).children() == []
        pid, ppid, count, _ = _ask(None, port, "o")
        assert int(ppid) == orig.pid and count == "5"
        assert psutil.Process(child).status() != psutil.STATUS_ZOMBIE   # still holding
        assert _finish(clone).strip() == "done ok" and clone.returncode == 0
        hold.close()
        assert _finish(orig).strip() == "done ok"
    finally:
        hold.close()
        for p in [clone, orig]:
            _kill(p)
        cxlfork("rm", img, check=False)
        rmtree(d)
        rmtree(s)


@pytest.mark.parametrize("policy", [["--policy", "mow"], ["--policy", "moa"],
                                    ["--policy", "moa", "--eager"]])
def test_three_levels_deep_cloned(policy):
    """deeptree.py (root, child, grandchild, great-grandchild and a zombie grandchild, all
    sharing pipes) checkpointed whole and cloned twice: each clone tree prints exactly what
    the original prints (the same PIDs and parents, each process's memory, zeros after
    MADV_DONTNEED in every process, each child's exit status through waitpid of its stored
    PID, the zombie's status 7)."""
    from cxlfork_util import go, start
    d = tempfile.mkdtemp(prefix="cxlfork-deep-")
    s = new_store()
    orig = start([sys.executable, os.path.join(PROGS, "deeptree.py")], cwd=d)
    img = os.path.join(d, "deep.img")
    clones = []
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", s)
        with open(os.path.join(img, "manifest.json")) as f:
            assert f.read().count('"parent"') == 4      # A, B, C and the zombie Z
        for k in range(2):
            clones.append(restore_popen(img, "--pidns", "new", *policy))
        outs = [go(c) for c in clones + [orig]]
        want = outs[-1]
        assert want[1] == 0 and want[0].count("dontneed=zeros") == 3, want
        assert "zombie=7" in want[0] and f"R {orig.pid} a=4" in want[0], want
        for out in outs[:-1]:
            assert out[:2] == want[:2], (out, want)
    finally:
        for p in clones + [orig]:
            _kill(p)
        cxlfork("rm", img, check=False)
        rmtree(d)
        rmtree(s)


def _procs() -> set[int]:
    return {c.pid for c in psutil.Process().children(recursive=True)}


def test_tree_restore_failure_leaves_nothing():
    """A pre-fork pool restored with --netns host while the original holds its port: one
    error line naming the address, exit 1, and no process (so no PID namespace) left."""
    d = tempfile.mkdtemp(prefix="cxlfork-prefork-bad-")
    s = new_store()
    port = new_port()
    orig, _ = _popen("pool", port, 2)
    img = os.path.join(d, "pool.img")
    try:
        _wait_kids(orig.pid, 2)
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", s)
        before = _procs()
        r = cxlfork("restore", img, "--pidns", "new", "--netns", "host", check=False)
        errs = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(errs) == 1 and errs[0].startswith("cxlfork: error:"), \
            r.stderr
        assert str(port) in errs[0], errs
        assert _procs() == before
        assert _finish(orig).strip() == "done ok"
    finally:
        if orig.poll() is None:
            orig.kill()
            orig.wait()
        cxlfork("rm", img, check=False)
        rmtree(d)
        rmtree(s)


SH_UNDER_PY = r"""
import subprocess, sys
p = subprocess.Popen(["/bin/sh", "-c",
                      'echo ready; (read line; echo "ok:$line") | tr a-z A-Z'])
rc = p.wait()
print(f"sh {p.pid} exited {rc}", flush=True)
"""


def test_shell_pipeline_under_a_python_parent_cloned():
    """A Python parent running `sh -c '... | tr a-z A-Z'` (the pipeline's commands are its
    grandchildren) cloned twice (mow, lazy moa): each clone tree's pipeline passes its own
    "go" through its pipe and the parent's Popen.wait() (waitpid of the stored PID) gets
    the shell's status, as in the original."""
    from cxlfork_util import go, start
    d = tempfile.mkdtemp(prefix="cxlfork-shpy-")
    s = new_store()
    orig = start([sys.executable, "-c", SH_UNDER_PY], cwd=d)
    img = os.path.join(d, "shpy.img")
    clones = []
    try:
        for _ in range(200):            # sh has forked both commands and tr has exec'd
            sh = psutil.Process(orig.pid).children()
            kids = sh[0].children() if sh else []
            if len(kids) == 2 and any(k.name() == "tr" for k in kids):
                break
            time.sleep(0.01)
        sh_pid = sh[0].pid
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", s)
        for pol in ("mow", "moa"):
            clones.append(restore_popen(img, "--pidns", "new", "--policy", pol))
        for c in clones + [orig]:
            out, rc, err = go(c)
            assert out.split() == ["OK:GO", "sh", str(sh_pid), "exited", "0"] and rc == 0, \
                f"{out!r} {rc} {err}"
    finally:
        for p in clones + [orig]:
            _kill(p)
        cxlfork("rm", img, check=False)
        rmtree(d)
        rmtree(s)


def _get(pid: int | None, port: int) -> list[str]:
    """GET / from the server at 127.0.0.1:port (in PID's network namespace; None: ours)."""
    if pid is None:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
    else:
        from cxlfork.state.netns import connect
        s = connect(pid, ("127.0.0.1", port), timeout=10)
    with s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
    return body.decode().split()


@pytest.mark.parametrize("policy,control", [(["--policy", "mow"], False),
                                            (["--policy", "moa"], False),
                                            (["--policy", "mow"], True)])
def test_gunicorn_cloned(policy, control):
    """gunicorn (sync workers: the arbiter binds, two forked workers accept on the inherited
    listener, heartbeat files shared with the arbiter) checkpointed whole and cloned twice:
    each clone answers HTTP in its own network namespace through its workers, under the
    checkpointed PIDs, each worker's counter going on from the checkpoint's (the same first
    count in each clone and in the original, then one more per request); the original keeps
    serving; SIGTERM to a clone's arbiter stops its workers (by their stored PIDs) and it
    exits 0, as the original does. With gunicorn's control socket (a unix socket bound to a
    path) each clone has its own at the same path (its mount namespace): `gunicornc show
    workers` there answers (the original's arbiter stopped meanwhile) with the workers' PIDs.
    Not tested: a command that makes a clone's arbiter fork (`worker add`): gunicorn then
    re-binds its control socket, and a clone cannot unlink that path (docs/cxlfork.md)."""
    d = tempfile.mkdtemp(prefix="cxlfork-gunicorn-")
    s = new_store()
    port = new_port()
    ctl = os.path.join(d, "gunicorn.ctl")
    orig = subprocess.Popen([sys.executable, "-m", "gunicorn", "-w", "2", "-b",
                             f"127.0.0.1:{port}", "--chdir", PROGS, "wsgiapp:app",
                             *(["--control-socket", ctl] if control else
                               ["--no-control-socket"])], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, close_fds=True,
                            cwd=d)
    img = os.path.join(d, "g.img")
    clones = []
    try:
        for _ in range(1000):
            try:
                _get(None, port)
                break
            except OSError:
                time.sleep(0.02)
        workers = _wait_kids(orig.pid, 2)
        for _ in range(1000 if control else 0):
            # its control server listens again after the last worker's fork (gunicorn stops
            # it around each fork) and knows both workers
            r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "gunicornc"),
                                "-s", ctl, "-c", "show workers", "-j"], capture_output=True,
                               text=True, timeout=30)
            if r.returncode == 0 and json.loads(r.stdout)["count"] == 2:
                break
            time.sleep(0.05)
        time.sleep(0.3 if control else 0)
        hits: dict[int, int] = {}
        for _ in range(4):
            pid, ppid, n = map(int, _get(None, port))
            assert ppid == orig.pid and pid in workers
            hits[pid] = n
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", s)
        for k in range(2):
            pidfile = f"{img}.pids{k}"
            clones.append(restore_popen(img, "--pidns", "new", *policy, "--pidfile", pidfile,
                                        "--stdio", "null"))
            clones[-1].root = int(wait_file(pidfile, clones[-1]).split()[0])
        first: dict[int, int] = {}      # a worker's first count in a tree: the same in each
        for c in clones + [None]:
            mine: dict[int, int] = {}
            for _ in range(6):
                pid, ppid, n = map(int, _get(None if c is None else c.root, port))
                assert ppid == orig.pid and pid in workers and n > hits.get(pid, 0)
                assert n == mine[pid] + 1 if pid in mine else first.setdefault(pid, n) == n, \
                    (pid, n, mine, first)
                mine[pid] = n
            if c is not None:
                assert len(psutil.Process(c.root).children()) == 2
        if control:     # each arbiter's control socket at the same path: its own (the
            # original's arbiter is stopped meanwhile: it could not answer)
            gc = os.path.join(os.path.dirname(sys.executable), "gunicornc")
            os.kill(orig.pid, signal.SIGSTOP)
            try:
                for c in clones:
                    r = subprocess.run(["nsenter", "-t", str(c.root), "-m", gc, "-s", ctl, "-c",
                                        "show workers", "-j"],
                                       capture_output=True, text=True, timeout=30)
                    assert r.returncode == 0, r.stderr
                    assert sorted(w["pid"] for w in json.loads(r.stdout)["workers"]) == \
                        sorted(workers), r.stdout
            finally:
                os.kill(orig.pid, signal.SIGCONT)
        for c in clones:
            os.kill(c.root, 15)
            assert c.wait(timeout=60) == 0, c.stderr.read().decode()
        orig.terminate()
        assert orig.wait(timeout=60) == 0
    finally:
        for p in clones + [orig]:
            _kill(p)
        cxlfork("rm", img, check=False)
        rmtree(d)
        rmtree(s)


def test_each_process_of_a_tree_served_by_the_handler():
    """restore_tree under lazy moa (Python API): the userfaultfd handler of this process gets
    one clone per process of the tree (root, child, grandchild, great-grandchild), serving
    the four at once, and copies pages on their first touches; each reads its own memory and
    zeros after MADV_DONTNEED."""
    from cxlfork.restore import lazy_stats, sync_lazy
    from cxlfork.tree import restore_tree
    from cxlfork_util import start
    d = tempfile.mkdtemp(prefix="cxlfork-deepapi-")
    s = new_store()
    orig = start([sys.executable, os.path.join(PROGS, "deeptree.py")], cwd=d)
    img = os.path.join(d, "deep.img")
    root = None
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", s)
        before = lazy_stats()
        r0, w0 = os.pipe()
        r1, w1 = os.pipe()
        try:
            root, = restore_tree(img, "moa", stdio=(r0, w1, w1))
        finally:
            os.close(r0)
            os.close(w1)
        sync_lazy()                     # the handler holds every process's userfaultfd
        mid = lazy_stats()
        os.write(w0, b"go\n")
        out = b""
        with os.fdopen(r1, "rb") as f:
            while chunk := f.read1(4096):
                out += chunk
        os.close(w0)
        _, st = os.waitpid(root, 0)
        root = None
        for _ in range(500):            # the handler drops each as it sees it exit
            after = lazy_stats()
            if after["clones"] == before["clones"]:
                break
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(st) == 0
        assert out.decode().count("mem=ok dontneed=zeros") == 3, out
        assert mid["clones"] - before["clones"] == 4, (before, mid)      # served at once
        assert after["clones"] == before["clones"], after                  # all exited
        assert after["pages_copied"] > before["pages_copied"], (before, after)
    finally:
        if root is not None:
            os.kill(root, 9)
            os.waitpid(root, 0)
        for k in psutil.Process(orig.pid).children(recursive=True):
            k.kill()                    # the original tree never got its "go"
        _kill(orig)
        cxlfork("rm", img, check=False)
        rmtree(d)
        rmtree(s)

"""restore --pidns new (cxlfork/state/pidns.py): refusals are one error line with nothing
made; a restore that fails after the clone's namespace and its init were made leaves no
process (so no namespace) behind."""
from __future__ import annotations

import os
import tempfile
import time

import psutil
import pytest

from cxlfork_util import build_prog, cxlfork, new_store, rmtree, start

PIDS_V1 = "/sys/fs/cgroup/pids"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, namespaces)")


@pytest.fixture(scope="module")
def image():
    d = tempfile.mkdtemp(prefix="cxlfork-pidns-")
    s = new_store()
    orig = start([build_prog("pidtid", d)], cwd=d)
    img = os.path.join(d, "pidtid.img")
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", s)
        yield img
    finally:
        orig.kill()
        orig.wait()
        rmtree(d)
        rmtree(s)


def _kids() -> set[int]:
    return {c.pid for c in psutil.Process().children(recursive=True)}


def test_same_pid_refused_with_one_line(image):
    before = _kids()
    r = cxlfork("restore", image, "--pidns", "new", "--same-pid", check=False)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        "cxlfork: error: --same-pid restores under the checkpointed PID in cxlfork's own PID "
        "namespace; --pidns new gives each clone that PID in a new namespace: use one or "
        "the other"], r.stderr
    assert _kids() == before


def test_ghosts_refused(image):
    from cxlfork.errors import CxlforkError
    from cxlfork.ghosts import GhostPool
    from cxlfork.restore import prepare_restore
    with prepare_restore(image) as p, GhostPool(1, refill="manual") as pool:
        with pytest.raises(CxlforkError, match="cannot restore into this ghost pool"):
            p.restore(1, stdio="null", ghosts=pool, pidns="new")
        assert pool.stats()["taken"] == 0


@pytest.mark.skipif(not os.path.isfile(os.path.join(PIDS_V1, "cgroup.procs")),
                    reason="no cgroup v1 pids controller mounted here")
def test_failure_after_the_namespace_leaves_nothing(image):
    """A pids cgroup with room for the init and the restorer but not for the image's two
    threads: the restore fails while creating them, after the namespace and its init were
    made; the error names the step, and no process (hence no namespace) is left."""
    from cxlfork.errors import CxlforkError
    from cxlfork.restore import restore
    cg = os.path.join(PIDS_V1, f"cxlfork-test-pidns-{os.getpid()}")
    os.mkdir(cg)
    try:
        with open(os.path.join(cg, "pids.max"), "w") as f:
            f.write("2")
        before = _kids()
        with pytest.raises(CxlforkError, match="threads of clone 1"):
            restore(image, stdio="null", pidns="new", cgroup=cg)
        assert _kids() == before
        assert open(os.path.join(cg, "cgroup.procs")).read() == ""
        # the limit is what failed: with room, the same restore works
        with open(os.path.join(cg, "pids.max"), "w") as f:
            f.write("max")
        pid, = restore(image, stdio="null", pidns="new", cgroup=cg)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    finally:
        for _ in range(200):
            try:
                os.rmdir(cg)
                break
            except OSError:
                time.sleep(0.02)


@pytest.mark.parametrize("policy", ["mow", "moa"])
def test_warm_ghosts_in_new_pid_namespaces(image, policy):
    """GhostPool(prepared=p, pidns="new"): each warm ghost waits in a PID namespace of its own
    under the image's PID; a pidns="new" restore fills one, and the clone and its threads
    read their checkpointed ids (pidtid prints "ok"). Mismatched modes are refused, nothing
    taken; a cold pool cannot be namespaced."""
    from cxlfork.errors import CxlforkError
    from cxlfork.ghosts import GhostPool
    from cxlfork.restore import prepare_restore
    from cxlfork.state import pidns
    from cxlfork_util import readline
    with pytest.raises(CxlforkError, match="needs warm ghosts"):
        GhostPool(1, refill="manual", pidns="new")
    with prepare_restore(image, policy) as p, \
            GhostPool(2, refill="manual", prepared=p, pidns="new") as pool:
        orig_pid = p.m["process"]["pid"]
        ghosts = pool.pids()
        spaces = {pidns.info(g)["pidns"] for g in ghosts}
        assert all(pidns.info(g)["pid_in_ns"] == orig_pid for g in ghosts)
        assert len(spaces) == 2 and os.readlink("/proc/self/ns/pid") not in spaces
        with pytest.raises(CxlforkError, match="restore into it with pidns='new'"):
            p.restore(1, stdio="null", ghosts=pool)
        assert pool.stats()["taken"] == 0
        r, w = os.pipe()
        r2, w2 = os.pipe()
        try:
            pid, = p.restore(1, stdio=(r, w2, w2), ghosts=pool, pidns="new")
            assert pid in ghosts and pidns.info(pid)["pid_in_ns"] == orig_pid
            os.write(w, b"go\n")
            assert readline(os.fdopen(r2, "rb", closefd=False)).strip() == "ok"
            _, st = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(st) == 0
        finally:
            for fd in (r, w, r2, w2):
                os.close(fd)
        assert pool.stats()["taken"] == 1


TREE_PY = r'''
import os, sys, time
mode = sys.argv[1]
if mode == "epoll":
    import select
    ep = select.epoll()
    if os.fork() == 0:
        if os.fork() == 0:
            time.sleep(1000)
        time.sleep(1000)
    time.sleep(0.2)
print("ready", flush=True)
sys.stdin.readline()
print("ok", flush=True)
'''


@pytest.mark.parametrize("mode,want", [
    ("epoll", "shares its open file description with fd")])
def test_tree_refusals_leave_the_tree_running(mode, want):
    """What a tree cannot carry yet is refused at checkpoint with one line naming it; nothing
    is published, the processes go on untraced."""
    import sys
    d = tempfile.mkdtemp(prefix="cxlfork-tree-")
    s = new_store()
    prog = os.path.join(d, "t.py")
    with open(prog, "w") as f:
        f.write(TREE_PY)
    orig = start([sys.executable, prog, mode, os.path.join(d, "f")], cwd=d)
    img = os.path.join(d, "t.img")
    try:
        r = cxlfork("checkpoint", orig.pid, "-o", img, "--store", s, check=False)
        errs = [x for x in r.stderr.splitlines() if x.startswith("cxlfork: error:")]
        assert r.returncode == 1 and len(errs) == 1 and want in errs[0], r.stderr
        assert not os.path.exists(img) and os.listdir(s) == []
        for p in [orig.pid] + [c.pid for c in psutil.Process(orig.pid).children(True)]:
            with open(f"/proc/{p}/status") as f:
                assert "TracerPid:\t0\n" in f.read()
        orig.stdin.write(b"go\n")
        orig.stdin.flush()
        assert orig.stdout.readline().strip() == b"ok"
    finally:
        for c in psutil.Process(orig.pid).children(True):
            c.kill()
        orig.kill()
        orig.wait()
        rmtree(d)
        rmtree(s)


def test_shell_pipeline_cloned_twice():
    """A shell pipeline (sh with a subshell and tr sharing a pipe, their ends on fds 0 and 1)
    checkpointed whole and cloned twice, each clone tree in its own PID namespace: each
    pipeline reads its own "go", passes it through its pipe and exits 0; so does the
    original (one clone mow, the other lazy moa). --pidns host is refused for a tree with
    one line."""
    from cxlfork_util import go, restore_popen, wait_file
    d = tempfile.mkdtemp(prefix="cxlfork-pipe-")
    s = new_store()
    sh = "echo ready; (read line; echo \"ok:$line\") | tr a-z A-Z"
    orig = start(["/bin/sh", "-c", sh], cwd=d)
    img = os.path.join(d, "p.img")
    clones = []
    try:
        for _ in range(100):            # both commands of the pipeline have exec'd/forked
            kids = psutil.Process(orig.pid).children()
            if len(kids) == 2 and any(k.name() == "tr" for k in kids):
                break
            time.sleep(0.01)
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", s)
        r = cxlfork("restore", img, check=False)
        assert r.returncode == 1 and "it restores only with --pidns new" in r.stderr, r.stderr
        for k in range(2):
            pidfile = f"{img}.pids{k}"
            clones.append(restore_popen(img, "--pidns", "new", "--pidfile", pidfile,
                                        *(["--policy", "moa"] if k else [])))
            pid = int(wait_file(pidfile, clones[-1]).split()[0])
            kids = psutil.Process(pid).children()
            assert len(kids) == 2 and sorted(k.name() for k in kids)[-1] == "tr", kids
        for c in clones + [orig]:
            out, rc, err = go(c)
            assert out.strip() == "OK:GO" and rc == 0, f"{out!r} {rc} {err}"
    finally:
        for p in clones + [orig]:
            if p.poll() is None:
                p.kill()
                p.wait()
        cxlfork("rm", img, check=False)
        rmtree(d)
        rmtree(s)

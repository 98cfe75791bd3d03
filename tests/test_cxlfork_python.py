"""Python processes with numpy (one BLAS thread): checkpoint, N clones from one store with a
pidfile, --same-pid after --kill, the hybrid profile, and clones sharing store pages."""
from __future__ import annotations

import json
import os
import sys
import tempfile

import pytest

from cxlfork_util import (PROGS, cxlfork, go, new_store, readline, restore_popen, rmtree,
                          start, wait_file)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, PR_SET_MM_MAP)")
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1")


@pytest.fixture(scope="module")
def env():
    d = tempfile.mkdtemp(prefix="cxlfork-py-")
    s = new_store()
    yield d, s
    rmtree(d)
    rmtree(s)


def _worker(mib=32):
    return start([sys.executable, os.path.join(PROGS, "worker.py"), str(mib)], env=ENV)


def test_numpy_worker_clones_share_store(env):
    d, s = env
    w = _worker(32)
    img = os.path.join(d, "w.img")
    try:
        cxlfork("checkpoint", w.pid, "-o", img, "--store", s)
        pidfile = os.path.join(d, "pids")
        r = restore_popen(img, "-n", "3", "--pidfile", pidfile)
        pids = [int(x) for x in wait_file(pidfile, r).split()]
        assert len(pids) == 3 and len(set(pids)) == 3
        # the clones answer on the shared stdin/stdout: one ping, one pong per clone
        for _ in range(3):          # one line at a time: whichever clone reads it answers
            r.stdin.write(b"ping\n")
            r.stdin.flush()
            assert readline(r.stdout).strip() == "pong"
        # the worker's array is mapped from the store page file, not copied
        m = json.loads(cxlfork("inspect", img, "--json").stdout)
        pf = os.path.join(m["store"]["dir"], m["store"]["file"])
        with open(f"/proc/{pids[0]}/maps") as f:
            assert pf in f.read()
        cxlfork("profile", img, *pids)
        assert os.path.exists(os.path.join(img, "hot.json"))
        for _ in range(3):          # each "go" makes one clone check itself and exit
            r.stdin.write(b"go\n")
            r.stdin.flush()
            assert readline(r.stdout).strip() == "ok"
        r.communicate(timeout=60)
        assert r.returncode == 0
        # hybrid from the recorded profile
        c = restore_popen(img, "--policy", "hybrid")
        o, rc, err = go(c)
        assert o.strip() == "ok" and rc == 0, err
        o, rc, _ = go(w)
        assert o.strip() == "ok" and rc == 0
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()


def test_kill_then_restore_same_pid(env):
    d, s = env
    w = _worker(8)
    pid = w.pid
    img = os.path.join(d, "move.img")
    cxlfork("checkpoint", pid, "-o", img, "--kill", "--store", s)
    w.wait()
    assert not os.path.exists(f"/proc/{pid}")
    c = restore_popen(img, "--same-pid", "--pidfile", img + ".pid")
    assert int(wait_file(img + ".pid", c)) == pid
    o, rc, err = go(c)
    assert o.strip() == "ok" and rc == 0, err


def test_numpy_with_blas_threads(env):
    """numpy with several OpenBLAS threads (blocked in futex waits when checkpointed): mow and
    lazy moa clones have all the threads and run multi-threaded BLAS right."""
    d, s = env
    w = start([sys.executable, os.path.join(PROGS, "worker.py"), "4"],
              env=dict(os.environ, OPENBLAS_NUM_THREADS="3"))
    img = os.path.join(d, "blas3.img")
    try:
        n = len(os.listdir(f"/proc/{w.pid}/task"))
        if n == 1:
            pytest.skip("numpy's BLAS started no threads here")
        cxlfork("checkpoint", w.pid, "-o", img, "--store", s)
        assert len(json.loads(cxlfork("inspect", img, "--json").stdout)["threads"]) == n - 1
        for policy in ("mow", "moa"):
            pidfile = img + policy
            c = restore_popen(img, "--policy", policy, "--pidfile", pidfile)
            pid = int(wait_file(pidfile, c))
            assert len(os.listdir(f"/proc/{pid}/task")) == n
            for cmd, want in (("blas", "ok"), ("blas", "ok"), ("go", "ok")):
                c.stdin.write(cmd.encode() + b"\n")
                c.stdin.flush()
                assert readline(c.stdout).strip() == want, (policy, cmd)
            c.communicate(timeout=60)
            assert c.returncode == 0
        o, rc, _ = go(w)
        assert o.strip() == "ok" and rc == 0
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()


def _sigs(pid):
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, v in (line.split(":", 1) for line in f)
                if k in ("SigBlk", "SigIgn", "SigCgt")}


def test_prepared_restore_api(env):
    """prepare_restore: one check + plan, several rounds of clones; each clone answers, has the
    original's signal state (not the restoring Python's: it ignores SIGPIPE), and the closed
    object refuses further restores."""
    from cxlfork.errors import CxlforkError
    from cxlfork.restore import prepare_restore
    d, s = env
    w = _worker(8)
    img = os.path.join(d, "prep.img")
    try:
        cxlfork("checkpoint", w.pid, "-o", img, "--store", s)
        want = _sigs(w.pid)
        with open(f"/proc/{w.pid}/comm") as f:
            comm = f.read().strip()         # python or python3, after how pytest was started
        with prepare_restore(img) as p:
            for n in (1, 2):
                in_r, in_w = os.pipe()
                out_r, out_w = os.pipe()
                pids = p.restore(n, stdio=(in_r, out_w, out_w))
                try:
                    assert len(set(pids)) == n
                    for pid in pids:
                        assert _sigs(pid) == want
                        with open(f"/proc/{pid}/comm") as f:
                            assert f.read().strip() == comm
                    for _ in range(n):      # one line at a time: whichever clone reads it
                        os.write(in_w, b"go\n")
                        assert readline(os.fdopen(out_r, "rb", closefd=False)).strip() == "ok"
                    for pid in pids:
                        _, st = os.waitpid(pid, 0)
                        assert os.waitstatus_to_exitcode(st) == 0
                finally:
                    for fd in (in_r, in_w, out_r, out_w):
                        os.close(fd)
        with pytest.raises(CxlforkError, match="closed"):
            p.restore(1)
    finally:
        w.kill()
        w.wait()


def _private(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(line.split()[1]) * 1024 for line in f
                   if line.startswith(("Private_Clean", "Private_Dirty")))


def test_lazy_moa_copies_on_first_touch(env):
    """moa (lazy): the clone starts with the array mapped from the store and not copied; reading
    it copies it into private memory through the userfaultfd handler; a child the clone forks
    and the clone's own checks work."""
    from cxlfork.restore import lazy_stats, restore
    d, s = env
    w = _worker(32)
    img = os.path.join(d, "lazy.img")
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    rd = os.fdopen(out_r, "rb", closefd=False)
    try:
        cxlfork("checkpoint", w.pid, "-o", img, "--store", s)
        before = lazy_stats()["pages_copied"]
        (pid,) = restore(img, "moa", stdio=(in_r, out_w, out_w))
        os.write(in_w, b"ping\n")
        assert readline(rd).strip() == "pong"
        assert _private(pid) < 24 << 20           # the 32 MiB array is not copied yet
        os.write(in_w, b"read\n")
        assert readline(rd).strip() == "done"
        assert _private(pid) >= 32 << 20          # now it is, page by page on first touch
        assert lazy_stats()["pages_copied"] - before >= (32 << 20) // 4096
        os.write(in_w, b"fork\n")                 # a child of the clone (no registration)
        assert readline(rd).strip() == "pong"
        os.write(in_w, b"go\n")
        assert readline(rd).strip() == "ok"
        _, st = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(st) == 0
    finally:
        for fd in (in_r, in_w, out_r, out_w):
            os.close(fd)
        w.kill()
        w.wait()


def test_lazy_moa_handler_gone_keeps_clone_correct(env):
    """If the process serving the userfaultfd dies (restore killed with SIGKILL), the kernel
    drops the registration and untouched pages are mapped from the store as in mow: the clone
    still has the right contents."""
    d, s = env
    w = _worker(16)
    img = os.path.join(d, "lazy-gone.img")
    try:
        cxlfork("checkpoint", w.pid, "-o", img, "--store", s)
        pidfile = img + ".pid"
        r = restore_popen(img, "--policy", "moa", "--pidfile", pidfile)
        pid = int(wait_file(pidfile, r))
        r.kill()
        r.wait()
        assert os.path.exists(f"/proc/{pid}")
        r.stdin.write(b"go\n")
        r.stdin.flush()
        assert readline(r.stdout).strip() == "ok"
    finally:
        w.kill()
        w.wait()


def test_huge_tmpfs_store(env):
    """A store on tmpfs with huge=within_size (as cxlfork mounts its default store): the page
    file is written in 2 MiB folios; mow and lazy moa clones of it are right, verify passes."""
    import subprocess
    from cxlfork.store import mount_options
    d, _ = env
    s = tempfile.mkdtemp(prefix="cxlfork-huge-store-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", mount_options(0), "cxlfork-test", s],
                   check=True)
    w = _worker(16)
    img = os.path.join(d, "huge.img")
    try:
        cxlfork("checkpoint", w.pid, "-o", img, "--store", s)
        assert json.loads(cxlfork("verify", img, "--json").stdout)["ok"]
        for policy in ("mow", "moa"):
            c = restore_popen(img, "--policy", policy)
            o, rc, err = go(c)
            assert o.strip() == "ok" and rc == 0, (policy, err)
    finally:
        w.kill()
        w.wait()
        cxlfork("rm", img, check=False)
        subprocess.run(["umount", s], check=False)
        os.rmdir(s)


def test_lazy_moa_detach_keeps_serving(env):
    """restore --detach with lazy moa: the command exits, a process it forked serves the
    clone's first touches (the clone copies its array) and exits once the clone has."""
    import subprocess
    import time
    d, s = env
    w = _worker(16)
    img = os.path.join(d, "lazy-detach.img")
    try:
        cxlfork("checkpoint", w.pid, "-o", img, "--store", s)
        pidfile = img + ".pid"
        r = subprocess.Popen([sys.executable, "-m", "cxlfork", "restore", img, "--policy", "moa",
                              "--detach", "--pidfile", pidfile], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True)
        pid = int(wait_file(pidfile, r))
        assert r.wait(timeout=60) == 0
        servers = [int(x) for x in os.listdir("/proc") if x.isdigit()
                   and _cmdline(int(x)).endswith(f"restore\0{img}\0--policy\0moa\0--detach\0"
                                                 f"--pidfile\0{pidfile}\0")]
        assert len(servers) == 1, servers
        assert readline(r.stdout).strip() == str(pid)       # what --detach prints
        r.stdin.write(b"read\n")            # the clone copies its whole array on first touch
        r.stdin.flush()
        assert readline(r.stdout).strip() == "done"
        assert _private(pid) >= 16 << 20
        r.stdin.write(b"go\n")
        r.stdin.flush()
        assert readline(r.stdout).strip() == "ok"
        t = time.monotonic()
        while _cmdline(servers[0]) and time.monotonic() - t < 20:
            time.sleep(0.05)
        assert not _cmdline(servers[0]), "the lazy moa server did not exit with its clone"
    finally:
        w.kill()
        w.wait()


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read()
    except OSError:
        return ""


def test_api_cache_sees_a_changed_manifest(env):
    """Restores in one process reuse the validated manifest and plan only while manifest.json
    is the same file: an edit (valid checksum, hostile field) is caught by the next restore."""
    from cxlfork import image as image_mod
    from cxlfork.errors import ImageError
    from cxlfork.restore import restore
    d, s = env
    w = _worker(4)
    img = os.path.join(d, "cache.img")
    try:
        cxlfork("checkpoint", w.pid, "-o", img, "--store", s)
        for _ in range(2):
            (pid,) = restore(img, "mow", stdio="null")   # stdin /dev/null: it exits at once
            _, st = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(st) == 0
        m = image_mod.read_manifest_raw(img)
        next(v for v in m["vmas"] if v["runs"])["runs"][0][2] = 10**9
        m["checksum"] = image_mod.checksum(m)
        with open(os.path.join(img, "manifest.json"), "w") as f:
            json.dump(m, f)
        with pytest.raises(ImageError, match="past the end of the page file"):
            restore(img, "mow", stdio="null")
    finally:
        w.kill()
        w.wait()



@pytest.mark.parametrize("policy", ["mow", "moa"])
def test_asyncio_epoll_loop(env, policy):
    """A real epoll program: a Python asyncio loop (epoll selector; its interest list holds the
    stdin pipe, an os.pipe and the loop's self-pipe socketpair), checkpointed in epoll_wait
    and killed, then restored under its own PID (asyncio ties its running loop to getpid():
    under a new PID, `asyncio.sleep` in the clone raises "no running event loop", until clones
    get their PIDs back in a PID namespace). The clone's loop reads its stdin, sees a later
    write on its pipe and fires a timer."""
    d, s = env
    orig = start([sys.executable, os.path.join(PROGS, "aioloop.py")], env=ENV)
    img = os.path.join(d, f"aioloop-{policy}.img")
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", s, "--kill")
        orig.wait()
        kinds = [f["kind"] for f in json.load(open(os.path.join(img, "manifest.json")))["fds"]]
        assert "epoll" in kinds and "socket" in kinds, kinds
        pidfile = img + ".pids"
        clone = restore_popen(img, "--policy", policy, "--same-pid", "--pidfile", pidfile)
        assert int(wait_file(pidfile, clone).split()[0]) == orig.pid
        out, rc, err = go(clone)
        assert out.strip() == "ok" and rc == 0, f"{out!r} {err}"
    finally:
        if orig.poll() is None:
            orig.kill()
            orig.wait()
        cxlfork("rm", img, check=False)


@pytest.mark.parametrize("policy", ["mow", "moa"])
def test_asyncio_clones_in_new_pid_namespaces(env, policy):
    """--pidns new: the asyncio loop program, checkpointed and left running, cloned twice;
    each clone runs under a new host PID in a PID namespace of its own where it is PID
    ORIG (NSpid), so asyncio finds its running loop, answers and exits 0; `--json` names each
    clone's host PID, namespace and PID inside. The original keeps running and answers too;
    each namespace's init is gone once its clone has exited."""
    d, s = env
    orig = start([sys.executable, os.path.join(PROGS, "aioloop.py")], env=ENV)
    img = os.path.join(d, f"aioloop-ns-{policy}.img")
    clones = []
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", s)
        infos = []
        for k in range(2):
            pidfile = f"{img}.pids{k}"
            clones.append(restore_popen(img, "--policy", policy, "--pidns", "new", "--json",
                                        "--pidfile", pidfile))
            pid = int(wait_file(pidfile, clones[-1]).split()[0])
            info = json.loads(readline(clones[-1].stderr))["clones"][0]
            assert info["pid"] == pid != orig.pid and info["pid_in_ns"] == orig.pid, info
            assert info["pidns"] != os.readlink("/proc/self/ns/pid"), info
            with open(f"/proc/{pid}/status") as f:
                nspid = next(x.split()[1:] for x in f if x.startswith("NSpid:"))
            assert nspid == [str(pid), str(orig.pid)], nspid
            infos.append(info)
        assert infos[0]["pidns"] != infos[1]["pidns"]
        for c in clones:
            out, rc, err = go(c)
            assert out.strip() == "ok" and rc == 0, f"{out!r} {err}"
        out, rc, _ = go(orig)
        assert out.strip() == "ok" and rc == 0, out
        for info in infos:
            assert not os.path.exists(f"/proc/{info['init']}"), info
    finally:
        for p in [orig] + clones:
            if p.poll() is None:
                p.kill()
                p.wait()
        cxlfork("rm", img, check=False)


@pytest.mark.parametrize("policy", ["mow", "hybrid"])
def test_selectors_epoll_loop_clones_side_by_side(env, policy):
    """A selectors.EpollSelector loop (stdin pipe, os.pipe, eventfd) checkpointed in
    epoll_wait and left running; two clones under new PIDs and the original each get their
    own "go" and see their own pipe and eventfd, with the keys' data."""
    d, s = env
    orig = start([sys.executable, os.path.join(PROGS, "selloop.py")], env=ENV)
    img = os.path.join(d, f"selloop-{policy}.img")
    clones = []
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", s)
        for k in range(2):
            pidfile = f"{img}.pids{k}"
            clones.append(restore_popen(img, "--policy", policy, "--pidfile", pidfile))
            wait_file(pidfile, clones[-1])
        out, rc, _ = go(orig)
        assert out.strip() == "ok" and rc == 0, out
        for c in clones:
            out, rc, err = go(c)
            assert out.strip() == "ok" and rc == 0, f"{out!r} {err}"
    finally:
        for p in [orig] + clones:
            if p.poll() is None:
                p.kill()
                p.wait()
        cxlfork("rm", img, check=False)

"""Ghost pool (cxlfork.ghosts): restores into pre-spawned restorers. The clone is the ghost
(same PID), gets its fds, cwd, umask and rlimits at restore and passes the conformance checks;
an empty pool falls back to spawning; a dead ghost is skipped; closing the pool, or killing
its owner, leaves no ghost behind; --same-pid is refused."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time

import pytest

from cxlfork_util import (PROGS, build_prog, cxlfork, new_store, readline, rmtree, start)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, PR_SET_MM_MAP)")


@pytest.fixture(scope="module")
def env():
    d = tempfile.mkdtemp(prefix="cxlfork-ghost-")
    s = new_store()
    yield d, s
    rmtree(d)
    rmtree(s)


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie waiting for its (new) parent."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_gone(pids, timeout=10.0) -> list[int]:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        left = [p for p in pids if not _gone(p)]
        if not left:
            return []
        time.sleep(0.02)
    return left


def _children() -> list[int]:
    me = str(os.getpid())
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[1] == me:
                    out.append(int(d))
        except FileNotFoundError:
            pass
    return out


class _Clone:
    """A clone's stdin/stdout pipes (our ends) for talking to it."""

    def __init__(self):
        self.in_r, self.in_w = os.pipe()
        self.out_r, self.out_w = os.pipe()

    def stdio(self):
        return (self.in_r, self.out_w, self.out_w)

    def send(self, line: bytes) -> str:
        os.write(self.in_w, line)
        return readline(os.fdopen(self.out_r, "rb", closefd=False)).strip()

    def close(self):
        for fd in (self.in_r, self.in_w, self.out_r, self.out_w):
            os.close(fd)


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("prog,policy", [("fds", "mow"), ("threads", "mow"), ("mem", "moa"),
                                         ("sockets", "hybrid"), ("timers", "mow"),
                                         ("pipeofd", "moa"), ("epoll", "mow"),
                                         ("inotify", "moa"), ("pending", "mow")])
def test_restore_into_ghost(env, prog, policy, warm):
    """The clone is the ghost we handed the restore to; its fd table is exactly the
    checkpointed one (no socket of the ghost left over), and the program's own checks pass:
    fds, cwd (the ghost was spawned in /), umask, rlimits; threads; lazy moa; socketpairs;
    timers (created and armed after a warm ghost's wait); pipes reopened; epoll entries
    (added after a warm ghost's wait, at the clone's fd numbers); inotify watches; pending
    signals (queued by the clone itself after a warm ghost's wait).
    Cold ghosts get the whole restore; warm ones ran the memory part of the plan before."""
    from cxlfork.ghosts import GhostPool
    from cxlfork.restore import prepare_restore
    d, s = env
    exe = build_prog(prog, d)
    work = tempfile.mkdtemp(dir=d)
    orig = start([exe, work] if prog in ("fds", "inotify") else [exe], cwd=d)
    img = os.path.join(d, f"{prog}-{policy}.img")
    c = _Clone()
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", s)
        want_fds = sorted(f["fd"] for f in json.load(open(os.path.join(img, "manifest.json")))
                          ["fds"])
        with prepare_restore(img, policy) as p, \
                GhostPool(1, refill="manual", prepared=p if warm else None) as pool:
            ghost = pool.pids()[0]
            with open(f"/proc/{ghost}/status") as f:
                # a warm ghost has set its name already (PR_SET_MM_MAP, PR_SET_NAME)
                assert (prog if warm else "cxlfork-restor") in f.read()
            assert os.listdir(f"/proc/{ghost}/cwd") == os.listdir("/")
            pid, = p.restore(1, stdio=c.stdio(), ghosts=pool)
            assert pid == ghost
            assert pool.stats()["taken"] == 1 and pool.stats()["fallbacks"] == 0
            assert sorted(int(x) for x in os.listdir(f"/proc/{pid}/fd")) == want_fds
            orig.stdin.write(b"go\n")          # the original goes first (it edits files)
            orig.stdin.flush()
            assert readline(orig.stdout).strip() == "ok"
            assert c.send(b"go\n") == "ok"
            _, st = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(st) == 0
    finally:
        c.close()
        if orig.poll() is None:
            orig.kill()
        orig.wait()
        cxlfork("rm", img, check=False)


@pytest.mark.parametrize("policy,kind", [("mow", "cold"), ("mow", "warm"),
                                         ("mow", "prefault"), ("moa", "cold"),
                                         ("moa", "warm"), ("hybrid", "warm")])
def test_anonymous_semantics_in_ghosts(env, policy, kind):
    """Issue 13.4 in clones restored into ghosts: anonsem.c's checks (zeros after
    MADV_DONTNEED, mremap, a forked child's drop) pass in a cold ghost, a warm one (its
    userfaultfd is made after the wait, per clone) and a prefaulted warm one (store pages
    mapped read-only before the registration)."""
    from cxlfork.ghosts import GhostPool
    from cxlfork.restore import lazy_stats, prepare_restore
    d, s = env
    exe = build_prog("anonsem", d)
    orig = start([exe], cwd=d)
    img = os.path.join(d, f"anonsem-{policy}-{kind}.img")
    c = _Clone()
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", s)
        with prepare_restore(img, policy) as p, \
                GhostPool(1, refill="manual", prepared=None if kind == "cold" else p,
                          prefault=kind == "prefault") as pool:
            before = lazy_stats()
            pid, = p.restore(1, stdio=c.stdio(), ghosts=pool)
            assert pool.stats()["taken"] == 1 and pool.stats()["fallbacks"] == 0
            assert c.send(b"go\n") == "ok"
            _, st = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(st) == 0
            after = lazy_stats()
            assert after["removes"] > before["removes"] and after["forks"] > before["forks"]
        orig.stdin.write(b"go\n")
        orig.stdin.flush()
        assert readline(orig.stdout).strip() == "ok"       # the reference: plain anonymous
    finally:
        c.close()
        if orig.poll() is None:
            orig.kill()
        orig.wait()
        cxlfork("rm", img, check=False)


def test_pool_fallback_dead_ghost_close(env):
    """n=3 from a pool of 2 where one ghost was killed: one clone in the live ghost, one dead
    ghost skipped, two spawned; every clone answers. Closing the pool kills and reaps its idle
    ghosts; --same-pid and a bad size are refused."""
    from cxlfork.errors import CxlforkError
    from cxlfork.ghosts import GhostPool
    from cxlfork.restore import prepare_restore
    d, s = env
    w = start([sys.executable, os.path.join(PROGS, "worker.py"), "8"],
              env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    img = os.path.join(d, "w.img")
    c = _Clone()
    pids = []
    try:
        cxlfork("checkpoint", w.pid, "-o", img, "--store", s, "--kill")
        pool = GhostPool(2, refill="manual")
        g1, g2 = pool.pids()
        os.kill(g1, signal.SIGKILL)
        assert not _wait_gone([g1])
        with prepare_restore(img) as p:
            with pytest.raises(CxlforkError, match="ghost"):
                p.restore(1, same_pid=True, ghosts=pool)
            pids = p.restore(3, stdio=c.stdio(), ghosts=pool)
            assert pids[0] == g2 and g1 not in pids and len(set(pids)) == 3
            assert pool.stats() == {"size": 2, "idle": 0, "spawned": 2, "taken": 1,
                                    "fallbacks": 2, "dead": 1}
            for _ in pids:
                assert c.send(b"ping\n") == "pong"
            assert pool.refill() == 2
            idle = pool.pids()
            assert len(idle) == 2 and not set(idle) & set(pids)
            pool.close()
            assert not _wait_gone(idle, timeout=0.1)
            assert pool.take() is None           # closed: restores spawn
            pool.close()                         # idempotent
            more = p.restore(1, stdio=c.stdio(), ghosts=pool)
            pids += more
            assert c.send(b"ping\n") == "pong"
            # a warm pool serves only the prepared restore it was made for
            with GhostPool(1, refill="manual", prepared=p) as warm, \
                    prepare_restore(img) as other:
                with pytest.raises(CxlforkError, match="warm for"):
                    other.restore(1, stdio=c.stdio(), ghosts=warm)
                wpid = warm.pids()[0]
                pids += p.restore(1, stdio=c.stdio(), ghosts=warm)
                assert pids[-1] == wpid and c.send(b"ping\n") == "pong"
                warm.refill()
                idle = warm.pids()
            assert not _wait_gone(idle, timeout=0.1)
        with pytest.raises(CxlforkError, match="closed"):
            GhostPool(1, prepared=p)
        # a warm ghost whose plan fails reports the restorer's error line, and is reaped
        with prepare_restore(img) as p:
            from cxlfork import plan as plan_mod
            from cxlfork.restore import _sealed_memfd
            plan_fd, sock = p.warm_plan()
            bad = bytearray(os.pread(plan_fd, 1 << 20, 0))
            struct.pack_into("<8Q", bad, plan_mod.HDR_WORDS * 8, plan_mod.OP_MMAP,
                             0xFFFF800000000000, 4096, 3, 0x22, 2**64 - 1, 0, 0)
            p._warm[False] = (_sealed_memfd(bytes(bad), p.fds_open), sock)
            before = set(_children())
            with pytest.raises(CxlforkError, match="warm ghost .* failed: restorer: mmap"):
                GhostPool(1, prepared=p)
            assert set(_children()) == before
        with pytest.raises(CxlforkError, match="positive"):
            GhostPool(0)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        c.close()
        if w.poll() is None:
            w.kill()
        w.wait()
        cxlfork("rm", img, check=False)


def test_ghosts_exit_when_owner_killed(env):
    """A process holding a pool (background refill) is SIGKILLed: its ghosts read EOF on
    their sockets and exit."""
    code = ("import sys, time\n"
            "from cxlfork.ghosts import GhostPool\n"
            "pool = GhostPool(3)\n"
            "print(' '.join(map(str, pool.pids())), flush=True)\n"
            "time.sleep(600)\n")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        ghosts = [int(x) for x in readline(owner.stdout).split()]
        assert len(ghosts) == 3 and not any(_gone(g) for g in ghosts)
        owner.kill()
        owner.wait()
        assert _wait_gone(ghosts) == []
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()

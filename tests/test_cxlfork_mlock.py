"""mlock()ed memory (tests/cxlfork_progs/mlock.c): a program that mlock()s a region,
mlock2(MLOCK_ONFAULT)s another and calls mlockall(MCL_FUTURE[|MCL_ONFAULT]) is cloned under
every policy and finds its locks as it had them; the clone's RLIMIT_MEMLOCK (the image's)
is respected when the restore lacks CAP_IPC_LOCK: too small is one line and no clone, large
enough restores (the kernel checks it in the restorer)."""
from __future__ import annotations

import os
import resource
import subprocess
import tempfile

import psutil
import pytest

from cxlfork_util import (CXLFORK, build_prog, cxlfork, go, new_store, readline, restore_popen,
                          rmtree, wait_file)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, PR_SET_MM_MAP)")
POLICIES = ["mow", "moa", "moa --eager", "hybrid"]
NO_IPC_LOCK = ["setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock"]


@pytest.fixture(scope="module")
def env():
    d = tempfile.mkdtemp(prefix="cxlfork-mlock-")
    s = new_store()
    yield d, s, build_prog("mlock", d)
    rmtree(d)
    rmtree(s)


def _start(exe, *args, memlock=None, prefix=()):
    def limit():
        if memlock is not None:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (memlock, memlock))
    p = subprocess.Popen([*prefix, exe, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         close_fds=True, preexec_fn=limit)
    assert readline(p.stdout).strip() == "ready"
    return p


def _roundtrip(env, policy, args=(), memlock=None, prefix=()):
    d, store, exe = env
    # the original runs as the clone will (a clone never gains a capability its restore
    # lacks, cxlfork.state.creds): without CAP_IPC_LOCK under NO_IPC_LOCK
    orig = _start(exe, *args, memlock=memlock, prefix=prefix)
    img = os.path.join(d, f"mlock-{policy.replace(' ', '')}-{len(prefix)}-{'-'.join(args)}.img")
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        pidfile = img + ".pids"
        pol, *rest = policy.split()
        clone = subprocess.Popen([*prefix, *CXLFORK, "restore", img, "--policy", pol, *rest,
                                  "--pidfile", pidfile], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True)
        wait_file(pidfile, clone)
        out, rc, _ = go(orig)
        assert out.strip() == "ok" and rc == 0, f"original: {out!r} rc={rc}"
        out, rc, err = go(clone)
        assert out.strip() == "ok" and rc == 0, f"clone: {out!r} rc={rc} {err}"
    finally:
        if orig.poll() is None:
            orig.kill()
            orig.wait()
        cxlfork("rm", img, check=False)


@pytest.mark.parametrize("policy", POLICIES)
def test_locks_come_back(env, policy):
    _roundtrip(env, policy)


@pytest.mark.parametrize("policy", ["mow", "moa"])
def test_mlockall_onfault(env, policy):
    _roundtrip(env, policy, args=("onfault",))


def test_limit_large_enough_without_cap_ipc_lock(env):
    """Without CAP_IPC_LOCK the kernel holds the clone to its RLIMIT_MEMLOCK (4 MiB here):
    the locks fit and come back."""
    _roundtrip(env, "mow", memlock=4 << 20, prefix=NO_IPC_LOCK)


def test_limit_too_small_is_refused(env):
    """The original (root, CAP_IPC_LOCK) locked 128 KiB over its 64 KiB RLIMIT_MEMLOCK; a
    restore without CAP_IPC_LOCK cannot give its clone that: one line, exit 1, no clone.
    The same image restores with the capability."""
    d, store, exe = env
    orig = _start(exe, memlock=64 << 10)
    img = os.path.join(d, "mlock-small.img")
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        r = subprocess.run([*NO_IPC_LOCK, *CXLFORK, "restore", img, "--detach"],
                           capture_output=True, text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, r.stderr
        assert "mlock()ed; its RLIMIT_MEMLOCK (64 KiB)" in lines[0] and \
            "lacks CAP_IPC_LOCK" in lines[0], lines[0]
        assert r.stdout == ""
        assert [p.pid for p in psutil.process_iter(["exe"]) if p.info["exe"] == exe] == \
            [orig.pid]
        pidfile = img + ".pids"
        clone = restore_popen(img, "--pidfile", pidfile)
        wait_file(pidfile, clone)
        out, rc, err = go(clone)
        assert out.strip() == "ok" and rc == 0, f"clone: {out!r} rc={rc} {err}"
    finally:
        orig.kill()
        orig.wait()
        cxlfork("rm", img, check=False)

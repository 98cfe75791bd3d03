"""`cxlfork restore --stdio original` (the default when fds 0-2 were files): a daemon whose
stdout and stderr are its log file (tests/cxlfork_progs/stdlog.c) is cloned, and the clone
writes into that log as the original had it open (path, O_APPEND or the offset, 1 and 2 one
open file description); a log replaced, a symlink put in its place, a file now another
user's, or one its owner can no longer open is refused with one line and no clone."""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time

import psutil
import pytest

from cxlfork_util import build_prog, cxlfork, new_store, rmtree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, PR_SET_MM_MAP)")
NOBODY = 65534
O_APPEND = 0o2000


@pytest.fixture(scope="module")
def env():
    d = tempfile.mkdtemp(prefix="cxlfork-stdio-")
    os.chmod(d, 0o755)
    s = new_store()
    yield d, s, build_prog("stdlog", d)
    rmtree(d)
    rmtree(s)


def _wait_text(path, want, timeout=20.0):
    t = time.monotonic()
    while True:
        with open(path) as f:
            text = f.read()
        if want in text:
            return text
        if time.monotonic() - t > timeout:
            raise AssertionError(f"{want!r} not in {path}: {text!r}")
        time.sleep(0.01)


def _daemon(exe, log, append=True, user=None):
    """stdlog with stdin /dev/null and stdout+stderr one open file description of log, as
    `exe </dev/null >>log 2>&1` (append) or `>log 2>&1`."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(log, flags, 0o644)
    if user is not None:
        os.fchown(fd, user, user)
    argv = [exe] if user is None else [exe, str(user)]      # its fsuid/fsgid
    try:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                             close_fds=True)
    finally:
        os.close(fd)
    _wait_text(log, "start ")
    return p


def _fdinfo(pid, fd):
    out = {}
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return {"pos": int(out["pos"]), "flags": int(out["flags"], 8)}


def _kill(*pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, TypeError):
            pass


def _clones_of(exe, but):
    return [p.pid for p in psutil.process_iter(["exe"]) if p.info["exe"] == exe and
            p.pid not in but]


def _restore(img, *extra, check=True):
    r = cxlfork("restore", img, "--detach", *extra, check=check)
    return [int(x) for x in r.stdout.split()] if r.returncode == 0 else r


def test_clone_appends_to_the_log(env):
    """Default (auto, fds 0-2 were /dev/null and a regular file): the clone's fds 1 and 2 are
    the log reopened O_APPEND, one open file description; its lines and the original's
    later ones all land in the log, nothing overwritten."""
    d, store, exe = env
    log = os.path.join(d, "append.log")
    orig = _daemon(exe, log)
    img = os.path.join(d, "append.img")
    clone = None
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        [clone] = _restore(img)
        assert os.readlink(f"/proc/{clone}/fd/1") == log
        assert os.readlink(f"/proc/{clone}/fd/2") == log
        assert os.readlink(f"/proc/{clone}/fd/0") == "/dev/null"
        info = _fdinfo(clone, 1)
        assert info["flags"] & O_APPEND and \
            info["flags"] & ~0o2000000 == _fdinfo(orig.pid, 1)["flags"] & ~0o2000000
        os.kill(clone, signal.SIGUSR1)
        _wait_text(log, f"err {clone} 1\n")
        os.kill(orig.pid, signal.SIGUSR1)
        text = _wait_text(log, f"err {orig.pid} 1\n")
        assert text == (f"start {orig.pid} 0\nout {clone} 1\nerr {clone} 1\n"
                        f"out {orig.pid} 1\nerr {orig.pid} 1\n"), text
    finally:
        _kill(orig.pid, clone)
        orig.wait()
        cxlfork("rm", img, check=False)


def test_clone_writes_at_the_original_offset(env):
    """`>log 2>&1` (no O_APPEND): the clone's fds 1 and 2 are one open file description at
    the original's offset, so its two lines follow the original's and do not overwrite each
    other (two descriptions at one offset would). Explicit --stdio original."""
    d, store, exe = env
    log = os.path.join(d, "offset.log")
    orig = _daemon(exe, log, append=False)
    img = os.path.join(d, "offset.img")
    clone = None
    try:
        pos = _fdinfo(orig.pid, 1)["pos"]
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store, "--kill")
        orig.wait()
        [clone] = _restore(img, "--stdio", "original")
        assert _fdinfo(clone, 1)["pos"] == pos and not _fdinfo(clone, 1)["flags"] & O_APPEND
        os.kill(clone, signal.SIGUSR1)
        text = _wait_text(log, f"err {clone} 1\n")
        assert text == f"start {orig.pid} 0\nout {clone} 1\nerr {clone} 1\n", text
    finally:
        _kill(orig.pid, clone)
        cxlfork("rm", img, check=False)


def test_inherit_still_given(env):
    """--stdio null overrides the default: the clone's 1 is /dev/null, the log untouched."""
    d, store, exe = env
    log = os.path.join(d, "null.log")
    orig = _daemon(exe, log)
    img = os.path.join(d, "null.img")
    clone = None
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        [clone] = _restore(img, "--stdio", "null")
        assert os.readlink(f"/proc/{clone}/fd/1") == "/dev/null"
    finally:
        _kill(orig.pid, clone)
        orig.wait()
        cxlfork("rm", img, check=False)


def _refused(env, name, tamper, want, user=None):
    d, store, exe = env
    work = tempfile.mkdtemp(dir=d)
    os.chmod(work, 0o777)
    log = os.path.join(work, "x.log")
    orig = _daemon(exe, log, user=user)
    img = os.path.join(d, f"{name}.img")
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        tamper(log)
        r = _restore(img, check=False)
        assert not isinstance(r, list), f"restored {r}"
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and want in lines[0], r.stderr
        assert lines[0].startswith("cxlfork: error: fd 1")
        assert _clones_of(exe, [orig.pid]) == []          # nothing left behind
    finally:
        orig.kill()
        orig.wait()
        cxlfork("rm", img, check=False)


def test_log_replaced_is_refused(env):
    """A log rotated since the checkpoint (renamed, a new file at the path): refused."""
    def rotate(log):
        os.rename(log, log + ".1")
        open(log, "w").close()
    _refused(env, "rotated", rotate, "is not the file the original had open")


def test_symlink_in_its_place_is_refused(env):
    """The log's path made a symlink to another file (root's): not followed."""
    victim = os.path.join(env[0], "victim")
    with open(victim, "w") as f:
        f.write("root's\n")

    def link(log):
        os.rename(log, log + ".1")
        os.symlink(victim, log)
    _refused(env, "symlink", link, "Too many levels of symbolic links")
    with open(victim) as f:
        assert f.read() == "root's\n"


def test_owner_can_no_longer_open_it(env):
    """A process opening files as uid 65534 (its fsuid) logging to its file; after the
    checkpoint the file is root's 0600 (same inode): root restoring must not open it for
    that user."""
    def take(log):
        os.chown(log, 0, 0)
        os.chmod(log, 0o600)
    _refused(env, "taken", take, "as uid 65534 (the checkpointed process's): Permission "
             "denied", user=NOBODY)


def test_path_of_another_user_is_refused(env):
    """The same inode, now owned by another uid (mode 0666, so the open itself works)."""
    def give(log):
        os.chown(log, 1234, 1234)
        os.chmod(log, 0o666)
    _refused(env, "given", give, "belongs to uid 1234, not to uid 65534", user=NOBODY)


def test_api_into_a_warm_ghost(env):
    """The API default (auto) into a warm ghost: the ghost gets the log as its fds 1 and 2
    with the fd table it is sent, and appends to it."""
    from cxlfork.ghosts import GhostPool
    from cxlfork.restore import prepare_restore
    d, store, exe = env
    log = os.path.join(d, "ghost.log")
    orig = _daemon(exe, log)
    img = os.path.join(d, "ghost.img")
    clone = None
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        with prepare_restore(img) as p, GhostPool(1, prepared=p, refill="manual") as pool:
            ghost = pool.pids()[0]
            [clone] = p.restore(1, ghosts=pool)
            assert clone == ghost
            assert os.readlink(f"/proc/{clone}/fd/1") == log
            assert _fdinfo(clone, 2)["flags"] & O_APPEND
            os.kill(clone, signal.SIGUSR1)
            _wait_text(log, f"err {clone} 1\n")
    finally:
        _kill(orig.pid, clone)
        orig.wait()
        if clone:
            try:
                os.waitpid(clone, 0)
            except ChildProcessError:
                pass
        cxlfork("rm", img, check=False)

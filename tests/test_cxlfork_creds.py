"""Credentials survive a clone: a daemon that started as root and dropped to uid 65534
(tests/cxlfork_progs/creds.c: groups, setresgid/setresuid, no_new_privs; "caps" also keeps
CAP_NET_BIND_SERVICE in its permitted/effective/inheritable/ambient sets, drops CAP_SYS_ADMIN
from its bounding set and holds securebits) is checkpointed by root and cloned under every
policy and into ghosts: the clone's /proc/PID/status Uid/Gid/Groups/Cap*/NoNewPrivs equal the
original's, both threads check their own credentials, and the clone cannot read a root-only
file (the original could not either). Threads with different credentials and images of
format version 2 (no credentials recorded) are refused in one line; a user other than root
cannot restore an image of another uid's process. A real server: `python3 -m http.server`
run as nobody is cloned and answers as nobody."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time

import pytest

from cxlfork_util import (build_prog, cxlfork, go, new_store, readline, restore_popen, rmtree,
                          start, wait_file)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, setresuid)")
NOBODY = 65534
FIELDS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
          "NoNewPrivs")


@pytest.fixture(scope="module")
def env():
    d = tempfile.mkdtemp(prefix="cxlfork-creds-")
    os.chmod(d, 0o755)                       # nobody must reach its cwd and the program
    s = new_store()
    secret = os.path.join(d, "secret")
    with open(secret, "w") as f:
        f.write("root only\n")
    os.chmod(secret, 0o600)
    exe = build_prog("creds", d)
    os.chmod(exe, 0o755)
    yield d, s, exe, secret
    rmtree(d)
    rmtree(s)


def _status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in FIELDS:
                out[k] = " ".join(v.split())
    return out


def _tasks_status(pid: int) -> list[dict]:
    return [_task_status(pid, int(t)) for t in sorted(os.listdir(f"/proc/{pid}/task"))]


def _task_status(pid: int, tid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in FIELDS:
                out[k] = " ".join(v.split())
    return out


def _ckpt(env, mode: str, name: str):
    d, store, exe, secret = env
    orig = start([exe, mode, secret], cwd=d)
    img = os.path.join(d, name)
    cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
    return orig, img


@pytest.mark.parametrize("mode", ["plain", "caps"])
@pytest.mark.parametrize("policy", ["mow", "moa", "moa --eager", "hybrid"])
def test_clone_keeps_dropped_credentials(env, mode, policy):
    orig, img = _ckpt(env, mode, f"{mode}-{policy.replace(' ', '')}.img")
    try:
        want = _status(orig.pid)
        assert want["Uid"] == want["Gid"] == f"{NOBODY} {NOBODY} {NOBODY} {NOBODY}", want
        assert want["CapEff"] == ("0000000000000400" if mode == "caps" else "0" * 16)
        pidfile = img + ".pids"
        pol, *rest = policy.split()
        clone = restore_popen(img, "--policy", pol, *rest, "--pidfile", pidfile)
        cpid = int(wait_file(pidfile, clone).split()[0])
        time.sleep(0.05)
        got = _tasks_status(cpid)
        assert len(got) == 2 and all(g == want for g in got), (want, got)
        out, rc, _ = go(orig)
        assert out.strip() == "ok" and rc == 0, f"original: {out!r} rc={rc}"
        out, rc, err = go(clone)
        assert out.strip() == "ok" and rc == 0, f"clone: {out!r} rc={rc} {err}"
    finally:
        if orig.poll() is None:
            orig.kill()
            orig.wait()
        cxlfork("rm", img, check=False)


@pytest.mark.parametrize("warm", [False, True])
def test_ghost_drops_credentials_when_filled(env, warm):
    """Ghosts are spawned as root before the image is known (cold) or with it (warm); the one
    filled with this image's clone takes its credentials at the end of the plan."""
    from cxlfork.ghosts import GhostPool
    from cxlfork.restore import prepare_restore
    orig, img = _ckpt(env, "caps", f"ghost-{warm}.img")
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    saved = [os.dup(0), os.dup(1)]
    try:
        want = _status(orig.pid)
        with prepare_restore(img) as p, \
                GhostPool(1, refill="manual", prepared=p if warm else None) as pool:
            [ghost] = pool.pids()
            assert _status(ghost)["Uid"] == "0 0 0 0"          # a root ghost
            os.dup2(in_r, 0)                # the clone's stdin and stdout: our pipes
            os.dup2(out_w, 1)
            try:
                [cpid] = p.restore(1, stdio="inherit", ghosts=pool)
            finally:
                os.dup2(saved[0], 0)
                os.dup2(saved[1], 1)
            os.close(in_r)
            os.close(out_w)
            assert cpid == ghost
            got = _tasks_status(cpid)
            assert len(got) == 2 and all(g == want for g in got), (want, got)
            os.write(in_w, b"go\n")
            with os.fdopen(out_r) as f:
                out_r = -1
                assert readline(f).strip() == "ok"
            os.waitpid(cpid, 0)
    finally:
        for fd in (in_w, out_r, *saved):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        orig.kill()
        orig.wait()
        cxlfork("rm", img, check=False)


def test_threads_with_other_credentials_refused(env):
    d, store, exe, secret = env
    orig = start([exe, "split", secret], cwd=d)
    img = os.path.join(d, "split.img")
    try:
        r = cxlfork("checkpoint", orig.pid, "-o", img, "--store", store, check=False)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and "per-thread credentials are not supported" in lines[-1], \
            r.stderr
        assert not os.path.exists(img)
        assert orig.poll() is None                # left running, not stopped
        with open(f"/proc/{orig.pid}/status") as f:
            assert "TracerPid:\t0" in f.read()
    finally:
        orig.kill()
        orig.wait()


def test_old_image_without_credentials_refused(env):
    from cxlfork import image as image_mod
    orig, img = _ckpt(env, "plain", "v2.img")
    try:
        m = image_mod.read_manifest_raw(img)
        m["version"] = 2
        del m["process"]["creds"]
        m.pop("checksum", None)
        m["checksum"] = image_mod.checksum(m)
        with open(os.path.join(img, "manifest.json"), "w") as f:
            json.dump(m, f)
        r = cxlfork("restore", img, check=False)
        line = r.stderr.strip().splitlines()[-1]
        assert r.returncode != 0 and "version 2 has no record of the process's credentials" \
            in line and "checkpoint the process again" in line, r.stderr
    finally:
        orig.kill()
        orig.wait()
        cxlfork("rm", img, check=False)


def _as_nobody(*argv, env=None, cwd=None):
    return subprocess.run(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY),
                           "--clear-groups", "--", *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def test_non_root_restores_only_its_own_credentials(env):
    """uid 65534 checkpoints its own process; the image edited to claim root's uids and
    sealed again with 65534's own key is refused in one line before anything is spawned: a
    restore never gains a uid. (A restore by a user other than root does not get further
    anyway: prctl(PR_SET_MM_MAP) needs CAP_SYS_RESOURCE; docs/cxlfork.md.)"""
    from cxlfork_util import CXLFORK
    home = tempfile.mkdtemp(prefix="cxlfork-creds-nobody-", dir="/dev/shm")
    os.chmod(home, 0o755)
    work = os.path.join(home, "w")
    os.mkdir(work, 0o700)
    os.chown(work, NOBODY, NOBODY)
    envv = dict(os.environ, CXLFORK_KEY=os.path.join(work, "key"), HOME=work)
    sleeper = subprocess.Popen(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY),
                                "--clear-groups", "sleep", "60"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, close_fds=True)
    img = os.path.join(work, "own.img")
    store = os.path.join(work, "store")
    try:
        time.sleep(0.2)
        r = _as_nobody(*CXLFORK, "checkpoint", sleeper.pid, "-o", img, "--store", store,
                       env=envv, cwd=work)
        assert r.returncode == 0, r.stderr
        edit = ("import sys, json; from cxlfork import image as im; p = sys.argv[1] + "
                "'/manifest.json'; m = json.load(open(p)); "
                "c = m['process']['creds']; c['uids'] = [0, 0, 0, 0]; c['uid'] = 0; "
                "m.pop('checksum'); "
                "m['checksum'] = im.checksum(m); json.dump(m, open(p, 'w'))")
        r = _as_nobody(CXLFORK[0], "-c", edit, img, env=envv, cwd=work)
        assert r.returncode == 0, r.stderr
        r = _as_nobody(*CXLFORK, "restore", img, "--json", env=envv, cwd=work)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and "only root may restore another user's process" in \
            lines[-1], r.stderr
        assert not r.stdout.strip()
    finally:
        sleeper.kill()
        sleeper.wait()
        _as_nobody(*CXLFORK, "rm", img, env=envv, cwd=work)
        rmtree(home)


def _get(port: int, ns_pid: int | None = None) -> str:
    cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/"]
    if ns_pid is not None:
        cmd = ["nsenter", "-t", str(ns_pid), "-n", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout


def test_http_server_as_nobody_cloned(env):
    d, store, exe, secret = env
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = subprocess.Popen(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY),
                            "--clear-groups", "/usr/bin/python3", "-m", "http.server",
                            str(port), "--bind", "127.0.0.1"], cwd=d,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, close_fds=True)
    img = os.path.join(d, "http.img")
    clone = cpid = None
    try:
        t = time.monotonic()
        while _get(port) != "200":
            assert time.monotonic() - t < 20 and srv.poll() is None, "http.server did not start"
            time.sleep(0.1)
        cxlfork("checkpoint", srv.pid, "-o", img, "--store", store)
        pidfile = img + ".pids"
        clone = restore_popen(img, "--pidfile", pidfile, "--stdio", "null")
        cpid = int(wait_file(pidfile, clone).split()[0])
        assert _get(port, cpid) == "200"
        assert _status(cpid) == _status(srv.pid)
        assert _status(cpid)["Uid"] == f"{NOBODY} {NOBODY} {NOBODY} {NOBODY}"
        assert _get(port) == "200"                 # the original still serves
    finally:
        srv.kill()
        srv.wait()
        if cpid is not None:           # the clone outlives the restore command killed below
            try:
                os.kill(cpid, 9)
            except ProcessLookupError:
                pass
        if clone is not None:
            clone.kill()
            clone.wait()
        cxlfork("rm", img, check=False)


def test_root_without_a_capability_gives_clones_none_of_it(env):
    """Root restoring with CAP_IPC_LOCK dropped (setpriv) an image of a root process that
    held it: the clone lacks it too (a restore never gains one), and a warning says so."""
    from cxlfork_util import CXLFORK
    d, store, exe, secret = env
    orig = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, close_fds=True)
    img = os.path.join(d, "ipclock.img")
    pidfile = img + ".pids"
    clone = None
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        assert int(_status(orig.pid)["CapEff"], 16) & (1 << 14)
        clone = subprocess.Popen(["setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock",
                                  *CXLFORK, "restore", img, "--pidfile", pidfile],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, close_fds=True)
        cpid = int(wait_file(pidfile, clone).split()[0])
        got, want = _status(cpid), _status(orig.pid)
        assert int(got["CapEff"], 16) == int(want["CapEff"], 16) & ~(1 << 14), (got, want)
        assert int(got["CapBnd"], 16) == int(want["CapBnd"], 16) & ~(1 << 14)
        assert got["Uid"] == want["Uid"]
        os.kill(cpid, 9)
        _, err = clone.communicate(timeout=30)
        assert "held capabilities this restore lacks (numbers 14)" in err.decode(), err
    finally:
        orig.kill()
        orig.wait()
        if clone is not None and clone.poll() is None:
            clone.kill()
            clone.wait()
        cxlfork("rm", img, check=False)

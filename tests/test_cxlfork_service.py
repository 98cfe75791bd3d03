"""The resident restore service (`cxlfork service`, cxlfork/service.py) and its client
`cxlfork-restore` (native/restore_client.c): a clone restored through it works and ends up
in the caller's cgroup, not the service's; a caller that could not restore itself is refused
with one line; without a service (or for a caller in another namespace) the client falls
back to the Python command, or says so in one line with CXLFORK_SERVICE=require."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from cxlfork_util import (CXLFORK, build_prog, cxlfork, go, new_store, readline, rmtree, start,
                          wait_file)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, PR_SET_MM_MAP)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT = os.path.join(ROOT, "cxlfork", "native", "cxlfork-restore")
NOBODY = 65534


def _cgroup_dir() -> tuple[str, str] | None:
    """(cgroup.procs-holding directory of this process, hierarchy tag) for the memory
    controller (v1) or the unified hierarchy (v2), or None."""
    with open("/proc/self/cgroup") as f:
        lines = [ln.rstrip("\n").split(":", 2) for ln in f]
    for _, ctl, path in lines:
        if "memory" in ctl.split(",") and os.path.isdir("/sys/fs/cgroup/memory"):
            return "/sys/fs/cgroup/memory" + path, "memory"
    for _, ctl, path in lines:
        if ctl == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            return "/sys/fs/cgroup" + path, ""
    return None


def _cgroup_of(pid: int, tag: str) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        for ln in f:
            _, ctl, path = ln.rstrip("\n").split(":", 2)
            if (tag and tag in ctl.split(",")) or (not tag and ctl == ""):
                return path
    raise AssertionError(f"no {tag or 'v2'} cgroup for {pid}")


@pytest.fixture(scope="module")
def env():
    if not os.access(CLIENT, os.X_OK):
        pytest.skip(f"{CLIENT} not built (pip install -e .)")
    d = tempfile.mkdtemp(prefix="cxlfork-svc-")
    os.chmod(d, 0o755)
    s = new_store()
    sock = os.path.join(d, "restore.sock")
    # the service runs in a cgroup of its own below ours: clones must not end up there
    cg = _cgroup_dir()
    svc_cg = None
    if cg:
        svc_cg = os.path.join(cg[0], f"cxlfork-svc-test-{os.getpid()}")
        try:
            os.mkdir(svc_cg)
        except OSError:
            svc_cg = None

    def into_cgroup():
        if svc_cg:
            with open(os.path.join(svc_cg, "cgroup.procs"), "w") as f:
                f.write("0")
    svc = subprocess.Popen(CXLFORK + ["service", "--socket", sock], preexec_fn=into_cgroup,
                           stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, close_fds=True)
    t = time.monotonic()
    while not os.path.exists(sock):
        assert svc.poll() is None, svc.stderr.read().decode()
        assert time.monotonic() - t < 60, "service did not start"
        time.sleep(0.05)
    exe = build_prog("misc", d)
    yield {"dir": d, "store": s, "sock": sock, "svc": svc, "exe": exe, "cg": cg,
           "svc_cg": svc_cg}
    svc.send_signal(signal.SIGTERM)
    svc.wait(timeout=30)
    if svc_cg:
        try:
            os.rmdir(svc_cg)
        except OSError:
            pass
    rmtree(d)
    rmtree(s)


def _image(env, name: str):
    orig = start([env["exe"]], cwd=env["dir"])
    img = os.path.join(env["dir"], name)
    cxlfork("checkpoint", orig.pid, "-o", img, "--store", env["store"])
    return orig, img


def _client(env, img, *extra, mode="require", sock=None, argv0=(CLIENT,), **kw):
    e = dict(os.environ, CXLFORK_SERVICE=mode, CXLFORK_SERVICE_SOCK=sock or env["sock"])
    return subprocess.Popen([*argv0, img, *extra], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, close_fds=True, env=e, cwd=env["dir"], **kw)


def _done(orig, img):
    if orig.poll() is None:
        orig.kill()
        orig.wait()
    cxlfork("rm", img, check=False)


def test_clone_through_the_service_works_in_the_callers_cgroup(env):
    orig, img = _image(env, "fast.img")
    try:
        pf = img + ".pid"
        c = _client(env, img, "--pidfile", pf)
        pid = int(wait_file(pf, c))
        # restored by the service (its child's child), not by a Python command of ours
        with open(f"/proc/{pid}/status") as f:
            ppid = int(next(x for x in f if x.startswith("PPid:")).split()[1])
        with open(f"/proc/{ppid}/status") as f:
            pppid = int(next(x for x in f if x.startswith("PPid:")).split()[1])
        assert pppid == env["svc"].pid, (ppid, pppid, env["svc"].pid)
        if env["svc_cg"]:
            tag = env["cg"][1]
            assert _cgroup_of(env["svc"].pid, tag) != _cgroup_of(os.getpid(), tag)
            assert _cgroup_of(pid, tag) == _cgroup_of(os.getpid(), tag)
        out, rc, err = go(c)
        assert out.strip() == "ok" and rc == 0, (out, rc, err)
        out, rc, _ = go(orig)
        assert out.strip() == "ok" and rc == 0
    finally:
        _done(orig, img)


def test_detach_and_json_through_the_service(env):
    orig, img = _image(env, "det.img")
    try:
        import json
        c = _client(env, img, "--detach", "--json")
        assert c.wait(timeout=60) == 0, c.stderr.read()       # the clone waits for "go"
        pid = json.loads(readline(c.stdout))["pids"][0]
        out, rc, err = go(c)
        assert out.strip() == "ok", (out, err)
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, 0)                               # not ours: the service's
    finally:
        _done(orig, img)


def test_bad_image_is_one_line_through_the_service(env):
    c = _client(env, os.path.join(env["dir"], "missing.img"))
    out, err = c.communicate(timeout=60)
    lines = err.decode().strip().splitlines()
    assert c.returncode == 1 and len(lines) == 1, err
    assert lines[0].startswith("cxlfork: error: ") and "missing.img" in lines[0], lines


def test_non_root_caller_refused_with_one_line(env):
    orig, img = _image(env, "nobody.img")
    try:
        client = os.path.join(env["dir"], "cxlfork-restore")
        shutil.copy(CLIENT, client)
        os.chmod(client, 0o755)
        os.chmod(env["sock"], 0o666)
        before = _clones(env)
        c = _client(env, img, "--pidfile", img + ".pid", mode="auto",
                    argv0=("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", client))
        out, err = c.communicate(timeout=60)
        lines = err.decode().strip().splitlines()
        assert c.returncode == 1 and len(lines) == 1, err
        assert lines[0].startswith("cxlfork: error: restore service: uid 65534 may not "
                                   "restore"), lines
        assert not os.path.exists(img + ".pid") and _clones(env) == before
    finally:
        _done(orig, img)


def _clones(env) -> set[int]:
    out = set()
    for x in os.listdir("/proc"):
        try:
            if x.isdigit() and os.readlink(f"/proc/{x}/exe") == env["exe"]:
                out.add(int(x))
        except OSError:
            pass
    return out


def test_no_service_falls_back_or_says_so(env):
    orig, img = _image(env, "nosvc.img")
    nosock = os.path.join(env["dir"], "nobody-listens.sock")
    try:
        c = _client(env, img, sock=nosock)
        out, err = c.communicate(timeout=60)
        lines = err.decode().strip().splitlines()
        assert c.returncode == 1 and len(lines) == 1, err
        assert "restore service not running at " + nosock in lines[0], lines
        pf = img + ".pid"
        c = _client(env, img, "--pidfile", pf, mode="auto", sock=nosock)
        pid = int(wait_file(pf, c))
        with open(f"/proc/{pid}/status") as f:       # restored by the Python command
            assert int(next(x for x in f if x.startswith("PPid:")).split()[1]) == c.pid
        out, rc, err = go(c)
        assert out.strip() == "ok" and rc == 0, (out, rc, err)
    finally:
        _done(orig, img)


def test_caller_in_another_namespace_falls_back(env):
    """A caller in another network namespace: the service cannot restore there as the
    caller's own command would, so the client runs that (or says why, with require)."""
    orig, img = _image(env, "netns.img")
    try:
        c = _client(env, img, argv0=("unshare", "-n", CLIENT))
        out, err = c.communicate(timeout=60)
        lines = err.decode().strip().splitlines()
        assert c.returncode == 1 and len(lines) == 1, err
        assert "another net namespace" in lines[0], lines
        pf = img + ".pid"
        c = _client(env, img, "--pidfile", pf, mode="auto", argv0=("unshare", "-n", CLIENT))
        pid = int(wait_file(pf, c))
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        out, rc, err = go(c)
        assert out.strip() == "ok" and rc == 0, (out, rc, err)
    finally:
        _done(orig, img)


def test_client_named_cxlfork_is_the_whole_command(env):
    """Linked as `cxlfork`, the client serves `cxlfork restore` through the service and hands
    every other verb to the Python command."""
    orig, img = _image(env, "named.img")
    try:
        link = os.path.join(env["dir"], "cxlfork")
        if not os.path.exists(link):
            os.symlink(CLIENT, link)
        r = subprocess.run([link, "inspect", img, "--json"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and '"pid"' in r.stdout, r.stderr
        pf = img + ".pid"
        c = _client(env, "restore", img, "--pidfile", pf, argv0=(link,))
        pid = int(wait_file(pf, c))
        with open(f"/proc/{pid}/status") as f:
            ppid = int(next(x for x in f if x.startswith("PPid:")).split()[1])
        with open(f"/proc/{ppid}/status") as f:
            assert int(next(x for x in f if x.startswith("PPid:")).split()[1]) == \
                env["svc"].pid
        out, rc, err = go(c)
        assert out.strip() == "ok" and rc == 0, (out, rc, err)
    finally:
        _done(orig, img)

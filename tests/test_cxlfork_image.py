"""Images and the CLI's safety: inspect/verify/rm/gc, corrupt/truncated/hostile manifests and
page files refused with one error line and no process left behind, refusals at checkpoint,
--leave-running keeps the original's memory identical, cxlfork killed mid-checkpoint."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib

import pytest

from cxlfork_util import (PROGS, build_prog, cxlfork, go, new_store, readline, restore_popen,
                          rmtree, start, wait_file)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, PR_SET_MM_MAP)")


@pytest.fixture(scope="module")
def env():
    d = tempfile.mkdtemp(prefix="cxlfork-img-")
    s = new_store()
    exe = build_prog("misc", d)
    p = start([exe], cwd=d)
    img = os.path.join(d, "base.img")
    cxlfork("checkpoint", p.pid, "-o", img, "--store", s)
    yield d, s, img, p
    p.kill()
    p.wait()
    rmtree(d)
    rmtree(s)


def _children_of_restore_left(before: set[int]) -> set[int]:
    return {int(x) for x in os.listdir("/proc") if x.isdigit()} - before


def _copy_image(src: str, dst: str) -> None:
    os.mkdir(dst, 0o700)
    with open(os.path.join(src, "manifest.json")) as f:
        data = f.read()
    with open(os.path.join(dst, "manifest.json"), "w") as f:
        f.write(data)


def test_inspect_verify_json(env):
    d, s, img, p = env
    r = cxlfork("inspect", img, "--json")
    m = json.loads(r.stdout)
    assert m["format"] == "cxlfork-image" and m["version"] == 3
    assert m["process"]["pid"] == p.pid
    assert any(v["path"] == "[vdso]" for v in m["vmas"])
    assert "MiB" in cxlfork("inspect", img).stdout
    v = json.loads(cxlfork("verify", img, "--json").stdout)
    assert v["ok"] and v["pages"] == m["store"]["pages"] > 0
    st = os.stat(img)
    assert st.st_mode & 0o777 == 0o700
    assert os.stat(os.path.join(img, "manifest.json")).st_mode & 0o777 == 0o600
    pf = os.path.join(m["store"]["dir"], m["store"]["file"])
    assert os.stat(pf).st_mode & 0o777 == 0o600
    assert os.stat(s).st_mode & 0o777 == 0o700


def _restore_fails(img: str, needle: str) -> None:
    before = {int(x) for x in os.listdir("/proc") if x.isdigit()}
    r = cxlfork("restore", img, "--stdio", "null", check=False)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cxlfork: error: "), r.stderr
    assert needle in lines[0], lines[0]
    time.sleep(0.05)
    # ours only: a clone (or its restorer) of this image runs in the image's working
    # directory; other users of cxlfork on the machine may be restoring at the same time
    cwd = os.path.dirname(os.path.abspath(img))

    def ours(pid):
        try:
            return os.readlink(f"/proc/{pid}/exe").endswith(("misc", "cxlfork-restorer")) \
                and os.readlink(f"/proc/{pid}/cwd") == cwd
        except OSError:
            return False
    left = [pid for pid in _children_of_restore_left(before) if ours(pid)]
    assert not left, f"processes left behind: {left}"


def test_corrupt_manifest_byte_flips(env):
    d, s, img, p = env
    rnd = random.Random(1)
    with open(os.path.join(img, "manifest.json"), "rb") as f:
        data = f.read()
    for k in range(12):
        bad = os.path.join(d, f"flip{k}.img")
        os.mkdir(bad, 0o700)
        b = bytearray(data)
        i = rnd.randrange(len(b))
        b[i] = (b[i] + rnd.randrange(1, 255)) % 256
        with open(os.path.join(bad, "manifest.json"), "wb") as f:
            f.write(bytes(b))
        _restore_fails(bad, "")
        r = cxlfork("verify", bad, check=False)
        assert r.returncode != 0 and r.stderr.startswith("cxlfork: error: ")


def test_truncated_manifest(env):
    d, s, img, p = env
    bad = os.path.join(d, "trunc.img")
    os.mkdir(bad, 0o700)
    with open(os.path.join(img, "manifest.json"), "rb") as f:
        data = f.read()
    with open(os.path.join(bad, "manifest.json"), "wb") as f:
        f.write(data[:len(data) // 2])
    _restore_fails(bad, "corrupt manifest")


def _hostile(env, name, mutate, needle):
    """A manifest edited with a *valid* checksum: field validation must catch it."""
    from cxlfork import image as image_mod
    d, s, img, p = env
    m = image_mod.read_manifest_raw(img)
    mutate(m)
    m["checksum"] = image_mod.checksum(m)
    bad = os.path.join(d, name)
    os.mkdir(bad, 0o700)
    with open(os.path.join(bad, "manifest.json"), "w") as f:
        json.dump(m, f)
    _restore_fails(bad, needle)


def test_hostile_manifests(env):
    def first_run(m):
        return next(v for v in m["vmas"] if v["runs"])
    _hostile(env, "h1.img", lambda m: first_run(m)["runs"][0].__setitem__(2, 10**9),
             "past the end of the page file")
    _hostile(env, "h2.img", lambda m: m["vmas"][1].__setitem__("start", 0x100000000000),
             "vmas[1]")
    _hostile(env, "h3.img", lambda m: m["store"].__setitem__("file", "../../etc/passwd"),
             "plain page-file name")
    _hostile(env, "h4.img", lambda m: m["regs"].__setitem__("rip", -1), "regs.rip")
    _hostile(env, "h5.img", lambda m: m.__setitem__("version", 99), "version")
    _hostile(env, "h6.img", lambda m: m["fds"].append({"fd": 7, "kind": "socket", "flags": 0,
                                                       "cloexec": False}), "fds[")
    _hostile(env, "h7.img", lambda m: m["vmas"][0].__setitem__("prot", "rwx"), "prot")
    _hostile(env, "h8.img", lambda m: m["store"].__setitem__("hash_alg", "md4"), "hash_alg")
    _hostile(env, "h9.img", lambda m: m["fds"].append(
        {"fd": 9, "kind": "socket", "flags": 2, "cloexec": False, "sotype": 1, "pair": 5,
         "end": 0, "sndbuf": 4096, "rcvbuf": 4096, "queue": []}), "its two ends")
    inet = {"fd": 9, "kind": "inet", "flags": 2, "cloexec": False, "family": 2, "sotype": 1,
            "state": "listen", "addr": "0.0.0.0", "port": 80, "scope_id": 0, "backlog": 5,
            "opts": {}}
    for k, (key, val, needle) in enumerate([
            ("addr", "not-an-ip", "fds[3].addr"), ("addr", "::1", "not an address of the"),
            ("family", 99, "fds[3].family"), ("state", "stolen", "fds[3].state"),
            ("port", 70000, "fds[3].port"), ("opts", {"SO_EVIL": 1}, "fds[3].opts.SO_EVIL"),
            ("opts", {"TCP_NODELAY": 2**40}, "fds[3].opts.TCP_NODELAY"),
            ("device", "x" * 40, "fds[3].device")]):
        _hostile(env, f"hi{k}.img", lambda m: m["fds"].append(dict(inet, **{key: val})), needle)
    unix = {"fd": 9, "kind": "unix", "flags": 2, "cloexec": False, "sotype": 1,
            "state": "listen", "name": "", "backlog": 5, "passcred": False, "sndbuf": 4096,
            "rcvbuf": 4096}
    _hostile(env, "hu1.img", lambda m: m["fds"].append(dict(unix, state="x")), "fds[3].state")
    _hostile(env, "hu2.img", lambda m: m["fds"].append(dict(unix, name="A" * 200)),
             "fds[3].name")
    _hostile(env, "hu3.img", lambda m: m["fds"].append(dict(unix, path="../etc/x", mode=0o600)),
             "fds[3].path")
    _hostile(env, "hu4.img", lambda m: m["fds"].append(dict(unix, path="/run/x", mode=-1)),
             "fds[3].mode")


def test_hostile_event_fd_records(env):
    """The event/timer fd, FIFO and deleted-file records are validated field by field too."""
    def fd(**kw):
        return lambda m: m["fds"].append({"fd": 40, "flags": 2, "cloexec": False, **kw})
    _hostile(env, "e1.img", fd(kind="epoll", entries=[{"tfd": 77, "events": 1, "data": 0}]),
             "is not another fd of the image")
    _hostile(env, "e2.img", fd(kind="epoll", entries=[{"tfd": 0, "events": -1, "data": 0}]),
             "entries[0].events")
    _hostile(env, "e3.img", fd(kind="timerfd", clock=2, settime=0, interval_ns=0,
                               value_ns=0, ticks=0), "clock 2 is not supported")
    _hostile(env, "e4.img", fd(kind="signalfd", mask=2**64), "mask")
    _hostile(env, "e5.img", fd(kind="inotify", watches=[
        {"wd": 3, "mask": 2, "path": "/tmp", "dev": 1, "ino": 1, "symlink": False},
        {"wd": 2, "mask": 2, "path": "/tmp", "dev": 1, "ino": 1, "symlink": False}]),
        "watch descriptors must increase")
    _hostile(env, "e6.img", fd(kind="inotify", watches=[
        {"wd": 1, "mask": 2, "path": "tmp", "dev": 1, "ino": 1, "symlink": False}]),
        "absolute path")
    _hostile(env, "e7.img", fd(kind="fifo", path="/tmp/x", buffered=-3), "buffered")
    _hostile(env, "e8.img", fd(kind="deleted", object=999, pos=0), "no such object")


def test_first_version_content_hash_still_verifies(env):
    """Images written before per-segment hashing (no store.hash_alg: one stream over the whole
    page file) verify with their own algorithm; the segmented hash differs from it."""
    from cxlfork import image as image_mod
    from cxlfork.native import lib
    d, s, img, p = env
    m = image_mod.read_manifest_raw(img)
    fd = os.open(image_mod.store_file(m), os.O_RDONLY)
    try:
        legacy = f"{lib.cx_hash_file(fd, 0, m['store']['pages'] * 4096):016x}"
    finally:
        os.close(fd)
    assert m["store"]["hash_alg"] == image_mod.HASH_ALG and m["store"]["hash"] != legacy
    del m["store"]["hash_alg"]
    m["store"]["hash"] = legacy
    m["checksum"] = image_mod.checksum(m)
    old = os.path.join(d, "v1hash.img")
    os.mkdir(old, 0o700)
    with open(os.path.join(old, "manifest.json"), "w") as f:
        json.dump(m, f)
    assert json.loads(cxlfork("verify", old, "--json").stdout)["ok"]


def test_page_file_truncated_or_modified(env):
    from cxlfork import image as image_mod
    d, s, img, p = env
    m = image_mod.load(img)
    pf = image_mod.store_file(m)
    saved = open(pf, "rb").read()
    try:
        with open(pf, "r+b") as f:
            f.seek(100)
            f.write(b"\xff")
        r = cxlfork("verify", img, check=False)
        assert r.returncode == 1 and "hash mismatch" in r.stderr
        os.truncate(pf, len(saved) - 4096)
        _restore_fails(img, "truncated")
    finally:
        with open(pf, "wb") as f:
            f.write(saved)
        # the page file's ctime moved: pin it again and re-seal (as its owner may)
        m = image_mod.read_manifest_raw(img)
        m["store"]["pin"] = image_mod.pin_of(os.stat(pf))
        m["checksum"] = image_mod.checksum(m)
        with open(os.path.join(img, "manifest.json"), "w") as f:
            json.dump(m, f)
    cxlfork("verify", img)


def test_bad_pid_and_existing_output(env):
    d, s, img, p = env
    r = cxlfork("checkpoint", 999999999, "-o", os.path.join(d, "x.img"), "--store", s,
                check=False)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == \
        "cxlfork: error: no process with PID 999999999"
    r = cxlfork("checkpoint", p.pid, "-o", img, "--store", s, check=False)
    assert r.returncode == 1 and "already exists" in r.stderr
    r = cxlfork("checkpoint", p.pid, "-o", os.path.join(d, "y.img"),
                "--store", d, check=False)               # a 0700 directory on ext4
    assert r.returncode == 1 and "not tmpfs" in r.stderr, r.stderr
    ww = os.path.join(d, "ww")                 # like /tmp: a store others may write
    os.mkdir(ww)
    os.chmod(ww, 0o1777)
    r = cxlfork("checkpoint", p.pid, "-o", os.path.join(d, "y.img"),
                "--store", ww, check=False)
    assert r.returncode == 1 and "writable by group or others" in r.stderr, r.stderr
    assert os.stat(ww).st_mode & 0o7777 == 0o1777      # checked, not changed


def test_refuses_unprivileged_caller(env):
    from conftest import run_unprivileged
    d, s, img, p = env
    r = run_unprivileged([sys.executable, "-m", "cxlfork", "checkpoint", str(p.pid), "-o",
                          "/tmp/cxlfork-nobody.img", "--store", "/dev/shm"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=
                         os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert r.returncode != 0
    assert "cannot ptrace PID" in r.stderr or "permission denied" in r.stderr, r.stderr
    assert not os.path.exists("/tmp/cxlfork-nobody.img")


def test_refuses_sockets_not_threads(env):
    """Sockets cxlfork cannot carry are refused with the fd named (nothing published, the
    process goes on): an AF_NETLINK socket, a unix socket bound to a path, a socketpair with
    an fd in flight (SCM_RIGHTS). A Python thread sleeping
    in time.sleep is checkpointed and the clone runs (the sleep gets EINTR and goes on)."""
    d, s, img, p = env
    code = ("import socket,threading,sys,time,os\n"
            "mode=sys.argv[1]\n"
            "if mode=='thread': threading.Thread(target=time.sleep,args=(60,),daemon=True).start()\n"
            "elif mode=='netlink': s=socket.socket(socket.AF_NETLINK,socket.SOCK_RAW,0)\n"
            "elif mode=='path':\n"
            "    s=socket.socket(socket.AF_UNIX); p=sys.argv[2]\n"
            "    s.bind(p); s.listen(); os.unlink(p)\n"
            "else:\n"
            "    a,b=socket.socketpair(); f=open('/dev/null')\n"
            "    a.sendmsg([b'x'],[(socket.SOL_SOCKET,socket.SCM_RIGHTS,"
            "f.fileno().to_bytes(4,'little'))])\n"
            "print('ready',flush=True); sys.stdin.readline()\n")
    want = {"netlink": "is an AF_NETLINK socket", "path": "is a unix socket bound to the path",
            "inflight": "file descriptors or credentials in flight"}
    for mode in ("thread", "netlink", "path", "inflight"):
        q = subprocess.Popen([sys.executable, "-c", code, mode, os.path.join(d, "ref.sock")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert readline(q.stdout).strip() == "ready"
        try:
            out = os.path.join(d, f"ref-{mode}.img")
            r = cxlfork("checkpoint", q.pid, "-o", out, "--store", s, check=False)
            if mode != "thread":
                assert r.returncode == 1 and want[mode] in r.stderr, r.stderr
                errors = [x for x in r.stderr.splitlines() if x.startswith("cxlfork: error:")]
                assert len(errors) == 1 and "fd " in errors[0], r.stderr
                assert not os.path.exists(out)
                assert not [x for x in os.listdir(s) if ".tmp." in x]
            else:
                assert r.returncode == 0, r.stderr
                _, rc, err = go(restore_popen(out))
                assert rc == 0, err
            out_, rc, _ = go(q)              # still alive and well
            assert rc == 0
        finally:
            q.kill()
            q.wait()


def _mem_crc(pid: int, skip: tuple[int, int] = (0, 0)) -> int:
    """CRC of every readable mapping of pid (while it sits in read(2)), without the bytes in
    skip (the rseq area, which the kernel rewrites whenever the task is scheduled)."""
    crc = 0
    with open(f"/proc/{pid}/maps") as f, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in f:
            parts = line.split()
            a, b = (int(x, 16) for x in parts[0].split("-"))
            if parts[1][0] != "r" or len(parts) > 5 and parts[5].startswith("[v"):
                continue
            try:
                data = bytearray(os.pread(mem.fileno(), b - a, a))
                if a <= skip[0] < b:
                    o = skip[0] - a
                    data[o:o + skip[1]] = bytes(len(data[o:o + skip[1]]))
                crc = zlib.crc32(bytes(data), crc)
            except OSError:
                pass
    return crc


def test_leave_running_keeps_memory_identical(env):
    d, s, img, p = env
    exe = build_prog("mem", d)
    q = start([exe], cwd=d)
    try:
        lr = os.path.join(d, "lr.img")
        cxlfork("checkpoint", q.pid, "-o", lr, "--store", s)
        rseq = json.loads(cxlfork("inspect", lr, "--json").stdout)["rseq"]
        skip = (rseq["addr"], rseq["len"]) if rseq else (0, 0)
        before = _mem_crc(q.pid, skip)
        cxlfork("checkpoint", q.pid, "-o", lr + "2", "--store", s)
        assert _mem_crc(q.pid, skip) == before
        out, rc, _ = go(q)
        assert out.strip() == "ok" and rc == 0
    finally:
        if q.poll() is None:
            q.kill()
            q.wait()


def test_killed_mid_checkpoint_leaves_original_running(env):
    d, s, img, p = env
    q = start([sys.executable, os.path.join(PROGS, "worker.py"), "256"],
              env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    out = os.path.join(d, "killed.img")
    try:
        c = subprocess.Popen([sys.executable, "-m", "cxlfork", "checkpoint", str(q.pid), "-o",
                              out, "--store", s], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(".pages.tmp." in x for x in os.listdir(s)):
            time.sleep(0.002)
        c.send_signal(signal.SIGKILL)
        c.wait()
        time.sleep(0.2)
        assert not os.path.exists(out)
        state = open(f"/proc/{q.pid}/status").read()
        assert "TracerPid:\t0" in state
        cxlfork("gc", "--store", s)
        assert not [x for x in os.listdir(s) if ".tmp." in x]
        assert not [x for x in os.listdir(d) if x.startswith("killed.img")]
        o, rc, _ = go(q)
        assert o.strip() == "ok" and rc == 0
    finally:
        if q.poll() is None:
            q.kill()
            q.wait()


def test_rm_and_gc(env):
    d, s, img, p = env
    exe = build_prog("misc", d)
    q = start([exe], cwd=d)
    try:
        a, b = os.path.join(d, "a.img"), os.path.join(d, "b.img")
        cxlfork("checkpoint", q.pid, "-o", a, "--store", s)
        cxlfork("checkpoint", q.pid, "-o", b, "--store", s)
        ma = json.loads(cxlfork("inspect", a, "--json").stdout)
        mb = json.loads(cxlfork("inspect", b, "--json").stdout)
        cxlfork("rm", a)
        assert not os.path.exists(a)
        assert not os.path.exists(os.path.join(s, ma["store"]["file"]))
        import shutil
        shutil.rmtree(b)                      # removed by hand: its page file is garbage
        r = json.loads(cxlfork("gc", "--store", s, "--json").stdout)
        assert os.path.join(s, mb["store"]["file"]) in r["removed"]
        cxlfork("verify", img)                # the module's image is untouched
    finally:
        q.kill()
        q.wait()


def test_checkpoint_says_what_cannot_be_checkpointed(env):
    """A kernel thread said 'No such process (/proc/2/mem)' and PID 1 blamed permissions:
    each says what it is, in one line, and nothing is made."""
    import psutil
    d, s, img, p = env
    out = os.path.join(d, "k.img")

    def refused(pid):
        r = cxlfork("checkpoint", pid, "-o", out, "--store", s, check=False)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not os.path.exists(out)
        return r.stderr.strip()

    assert refused(2) == ("cxlfork: error: PID 2 (kthreadd) is a kernel thread: it has no "
                          "user address space or registers to checkpoint (only user processes "
                          "can be)")
    name = psutil.Process(1).name()
    assert refused(1).startswith(f"cxlfork: error: PID 1 ({name}) is the init process of "
                                 "this PID namespace: cxlfork does not checkpoint an init")
    z = subprocess.Popen(["true"])
    try:
        while psutil.Process(z.pid).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.05)
        assert refused(z.pid) == (f"cxlfork: error: PID {z.pid} (true) is a zombie: it has "
                                  "exited and waits for its parent to reap it; there is "
                                  "nothing left to checkpoint")
    finally:
        z.wait()
    u = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "sleep", "600"],
                         stdin=subprocess.DEVNULL, close_fds=True)
    try:
        while not psutil.Process(u.pid).children():
            time.sleep(0.05)
        child = psutil.Process(u.pid).children()[0].pid
        assert refused(child).startswith(f"cxlfork: error: PID {child} (sleep) is the init "
                                         "process of a PID namespace (PID 1 there)")
    finally:
        u.kill()
        u.wait()


def test_profile_refuses_what_is_not_a_clone(env):
    """`cxlfork profile IMAGE PID` of a process that is not a clone of IMAGE exited 0 with
    an empty record: one line, exit 1, no record; a clone is profiled."""
    d, s, img, p = env
    prof = os.path.join(d, "prof.img")
    cxlfork("checkpoint", p.pid, "-o", prof, "--store", s)
    hot = os.path.join(prof, "hot.json")

    def refused(pid, why):
        r = cxlfork("profile", prof, pid, check=False)
        assert r.returncode == 1 and r.stderr.strip().splitlines() == [
            f"cxlfork: error: PID {pid} is not a clone of {prof}: {why}"], r.stderr
        assert not os.path.exists(hot)

    refused(p.pid, "it started before the image was checkpointed")          # the original
    exe = json.loads(cxlfork("inspect", prof, "--json").stdout)["process"]["exe"]["path"]
    sl = subprocess.Popen(["sleep", "600"])
    try:
        refused(sl.pid, f"it runs {os.path.realpath(shutil.which('sleep'))}, the image {exe}")
    finally:
        sl.kill()
        sl.wait()
    pf = os.path.join(d, "prof.pids")
    c = restore_popen(prof, "--pidfile", pf)
    try:
        clone = int(wait_file(pf, c).split()[0])
        r = cxlfork("profile", prof, clone)
        assert "pages touched" in r.stdout and os.path.exists(hot)
    finally:
        _, rc, err = go(c)
    assert rc == 0, err

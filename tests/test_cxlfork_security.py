"""Images and the page store under attack (issue 18, items 6-10): a page file with a flipped
byte, a manifest edited and re-sealed with an unkeyed hash, the sealing key unsafe, `cxlfork rm`
of a crafted manifest pointing at a victim directory, stores and page files another user
owns or may write, `restore --pidfile` that cannot be written. Each is refused with one error
line and leaves no clone, file or directory behind."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from cxlfork_util import CXLFORK, build_prog, cxlfork, new_store, rmtree, start

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, PR_SET_MM_MAP)")
NOBODY = 65534


@pytest.fixture(scope="module")
def env():
    d = tempfile.mkdtemp(prefix="cxlfork-sec-")
    s = new_store()
    exe = build_prog("misc", d)
    p = start([exe], cwd=d)
    yield d, s, p
    p.kill()
    p.wait()
    rmtree(d)
    rmtree(s)


def _ckpt(env, name: str, store: str | None = None) -> str:
    d, s, p = env
    img = os.path.join(d, name)
    cxlfork("checkpoint", p.pid, "-o", img, "--store", store or s)
    return img


def _manifest(img: str) -> dict:
    with open(os.path.join(img, "manifest.json")) as f:
        return json.load(f)


def _write_manifest(img: str, m: dict) -> None:
    with open(os.path.join(img, "manifest.json"), "w") as f:
        json.dump(m, f)


def _page_file(img: str) -> str:
    m = _manifest(img)
    return os.path.join(m["store"]["dir"], m["store"]["file"])


def _ours(d: str, original: int) -> list[int]:
    """Clones (or restorers) of the test program other than the original: they run in d."""
    out = []
    for x in os.listdir("/proc"):
        if not x.isdigit() or int(x) == original:
            continue
        try:
            if os.readlink(f"/proc/{x}/exe").endswith(("/misc", "cxlfork-restorer")) and \
                    os.readlink(f"/proc/{x}/cwd") == d:
                out.append(int(x))
        except OSError:
            pass
    return out


def _one_error(r: subprocess.CompletedProcess, needle: str) -> str:
    assert r.returncode != 0, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cxlfork: error: "), r.stderr
    assert needle in lines[0], lines[0]
    return lines[0]


def _restore_fails(env, img: str, needle: str, *extra) -> str:
    d, s, p = env
    r = cxlfork("restore", img, "--stdio", "null", *extra, check=False)
    line = _one_error(r, needle)
    assert not _ours(d, p.pid), "clone left behind"
    return line


def _restore_ok(img: str) -> None:
    """The clone ran: with stdin /dev/null its wait_go fails, and it says so on its stdio."""
    out = img + ".out"
    r = cxlfork("restore", img, "--stdio", out, check=False)
    with open(out) as f:
        said = f.read()
    os.unlink(out)
    assert r.returncode == 1 and "read of go returned 0" in said, (r.stderr, said)


# -- 6: the page file is pinned -----------------------------------------------------------------
def test_page_file_flipped_byte_refused_at_restore(env):
    img = _ckpt(env, "flip.img")
    _restore_ok(img)
    pf = _page_file(img)
    st = os.stat(pf)
    with open(pf, "r+b") as f:
        f.seek(4096 + 17)
        b = f.read(1)
        f.seek(4096 + 17)
        f.write(bytes([b[0] ^ 0xFF]))
    _restore_fails(env, img, "changed since the checkpoint")
    # a writer that puts the mtime back (root can): the ctime still moved
    os.utime(pf, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(pf).st_mtime_ns == st.st_mtime_ns
    line = _restore_fails(env, img, "changed since the checkpoint")
    assert "ctime_ns" in line and "mtime_ns" not in line, line
    r = cxlfork("verify", img, check=False)
    _one_error(r, "content hash mismatch")


def test_page_file_replaced_or_symlinked_refused(env):
    d, s, p = env
    img = _ckpt(env, "repl.img")
    pf = _page_file(img)
    data = open(pf, "rb").read()
    os.rename(pf, pf + ".orig")
    with open(pf, "wb") as f:                 # same bytes, same size: another file
        f.write(data)
    os.chmod(pf, 0o600)
    _restore_fails(env, img, "changed since the checkpoint")
    os.unlink(pf)
    os.symlink(pf + ".orig", pf)
    _restore_fails(env, img, "is a symlink")
    os.unlink(pf)
    os.rename(pf + ".orig", pf)               # even the original renamed back: ctime moved
    _restore_fails(env, img, "changed since the checkpoint")
    cxlfork("rm", img)


# -- 7: the manifest is sealed with the caller's key -----------------------------------------------
def _unkeyed(m: dict) -> str:
    """What the seal was before: SHA-256 over the canonical JSON."""
    from cxlfork.image import canonical
    return hashlib.sha256(canonical({k: v for k, v in m.items() if k != "checksum"})).hexdigest()


def test_manifest_edited_and_resealed_without_key_refused(env):
    d, s, p = env
    img = _ckpt(env, "edit.img")
    m = _manifest(img)
    m["process"]["cwd"] = "/"                 # an edit that validates field by field
    m["checksum"] = _unkeyed(m)
    _write_manifest(img, m)
    _restore_fails(env, img, "checksum mismatch")
    r = cxlfork("verify", img, check=False)
    _one_error(r, "checksum mismatch")
    r = cxlfork("inspect", img, check=False)
    _one_error(r, "checksum mismatch")


def test_odd_seals_and_deep_nesting_are_one_line(env):
    d, s, p = env
    img = _ckpt(env, "odd.img")
    m = _manifest(img)
    for bad in ("\u00e9" * 64, 7, None):
        m["checksum"] = bad
        _write_manifest(img, m)
        _restore_fails(env, img, "checksum mismatch")
    with open(os.path.join(img, "manifest.json"), "w") as f:
        f.write("[" * 100000)
    _restore_fails(env, img, "nested too deeply")
    _one_error(cxlfork("verify", img, check=False), "nested too deeply")


def test_old_format_version_refused_with_reason(env):
    img = _ckpt(env, "v1.img")
    m = _manifest(img)
    m["version"] = 1
    del m["store"]["pin"]
    m["checksum"] = _unkeyed(m)
    _write_manifest(img, m)
    line = _restore_fails(env, img, "version 1")
    assert "checkpoint the process again" in line
    _one_error(cxlfork("verify", img, check=False), "version 1")


def test_key_other_user_or_unsafe_refused(env):
    """Another key (another user's, or a new one) does not open this user's images; a key
    readable by others, a symlink or one owned by another user is refused."""
    d, s, p = env
    img = _ckpt(env, "key.img")
    kd = tempfile.mkdtemp(prefix="cxlfork-sec-key-")
    try:
        key = os.path.join(kd, "k")
        envk = dict(os.environ, CXLFORK_KEY=key)
        r = subprocess.run(CXLFORK + ["verify", img], capture_output=True, text=True, env=envk)
        _one_error(r, "no cxlfork key")
        img2 = os.path.join(d, "key2.img")
        subprocess.run(CXLFORK + ["checkpoint", str(p.pid), "-o", img2, "--store", s],
                       check=True, capture_output=True, env=envk)
        assert os.stat(key).st_mode & 0o777 == 0o600 and os.stat(key).st_size == 32
        r = subprocess.run(CXLFORK + ["verify", img2], capture_output=True, text=True,
                           env=envk)
        assert r.returncode == 0, r.stderr
        _one_error(cxlfork("verify", img2, check=False), "checksum mismatch")   # root's key
        r = subprocess.run(CXLFORK + ["verify", img], capture_output=True, text=True, env=envk)
        _one_error(r, "checksum mismatch")
        os.chmod(key, 0o644)
        r = subprocess.run(CXLFORK + ["verify", img2], capture_output=True, text=True, env=envk)
        _one_error(r, "readable by group or others")
        os.chmod(key, 0o600)
        os.chown(key, NOBODY, NOBODY)
        r = subprocess.run(CXLFORK + ["verify", img2], capture_output=True, text=True, env=envk)
        _one_error(r, "owned by uid 65534")
        os.chown(key, 0, 0)
        os.rename(key, key + ".real")
        os.symlink(key + ".real", key)
        r = subprocess.run(CXLFORK + ["verify", img2], capture_output=True, text=True, env=envk)
        _one_error(r, "is a symlink")
        r = subprocess.run(CXLFORK + ["rm", img2], capture_output=True, text=True, env=envk)
        _one_error(r, "not removing")
        os.unlink(key)
        os.rename(key + ".real", key)
        subprocess.run(CXLFORK + ["rm", img2], check=True, capture_output=True, env=envk)
    finally:
        rmtree(kd)
    cxlfork("rm", img)


# -- 8: rm only removes what is validated and inside an owned store --------------------------------
def test_rm_crafted_manifest_keeps_victim(env):
    d, s, p = env
    victim = tempfile.mkdtemp(prefix="cxlfork-sec-victim-", dir="/dev/shm")
    try:
        for n in ("x.pages", "x.owner"):
            with open(os.path.join(victim, n), "w") as f:
                f.write("precious\n")
        crafted = os.path.join(d, "crafted.img")
        os.mkdir(crafted, 0o700)
        _write_manifest(crafted, {"format": "cxlfork-image", "version": 3,
                                  "store": {"dir": victim, "file": "x.pages"}})
        _one_error(cxlfork("rm", crafted, check=False), "not removing")
        assert sorted(os.listdir(victim)) == ["x.owner", "x.pages"]
        assert os.path.isdir(crafted)
        # a real image whose store.dir is re-pointed and sealed again with the owner's key:
        # the victim directory is another user's, so rm refuses it
        from cxlfork import image as image_mod
        img = _ckpt(env, "rm2.img")
        m = image_mod.read_manifest_raw(img)
        real_pf = image_mod.store_file(m)
        os.rename(os.path.join(victim, "x.pages"), os.path.join(victim, m["store"]["file"]))
        m["store"]["dir"] = victim
        m["checksum"] = image_mod.checksum(m)
        _write_manifest(img, m)
        os.chown(victim, NOBODY, NOBODY)
        _one_error(cxlfork("rm", img, check=False), "owned by uid 65534")
        assert os.path.exists(os.path.join(victim, m["store"]["file"])) and os.path.isdir(img)
        assert os.path.exists(real_pf)
    finally:
        rmtree(victim)
    shutil.rmtree(crafted, ignore_errors=True)
    shutil.rmtree(img, ignore_errors=True)
    os.unlink(real_pf)
    os.unlink(real_pf[:-len(".pages")] + ".owner")


def test_rm_of_sealed_image_removes_page_file(env):
    d, s, p = env
    img = _ckpt(env, "rm1.img")
    pf = _page_file(img)
    r = cxlfork("rm", img)
    assert not os.path.exists(img) and not os.path.exists(pf)
    assert f"removed {pf}" in r.stdout


# -- 9: stores and page files of other users ----------------------------------------------------
def test_store_of_another_user_refused_at_checkpoint(env):
    d, s, p = env
    other = tempfile.mkdtemp(prefix="cxlfork-sec-other-", dir="/dev/shm")
    try:
        os.chown(other, NOBODY, NOBODY)
        img = os.path.join(d, "other.img")
        r = cxlfork("checkpoint", p.pid, "-o", img, "--store", other, check=False)
        _one_error(r, "owned by uid 65534")
        assert not os.path.exists(img) and os.listdir(other) == []
        assert not [n for n in os.listdir(d) if n.startswith("other.img")]
        os.chown(other, 0, 0)
        os.chmod(other, 0o777)
        r = cxlfork("checkpoint", p.pid, "-o", img, "--store", other, check=False)
        _one_error(r, "writable by group or others")
        assert os.listdir(other) == []
        os.chmod(other, 0o700)
        link = other + ".link"
        os.symlink(other, link)
        try:
            r = cxlfork("checkpoint", p.pid, "-o", img, "--store", link, check=False)
            _one_error(r, "is a symlink")
        finally:
            os.unlink(link)
    finally:
        rmtree(other)


def test_store_or_page_file_of_another_user_refused_at_restore(env):
    d, s, p = env
    s2 = new_store()
    try:
        img = _ckpt(env, "own.img", s2)
        pf = _page_file(img)
        os.chown(s2, NOBODY, NOBODY)
        _restore_fails(env, img, "owned by uid 65534")
        os.chown(s2, 0, 0)
        os.chmod(s2, 0o770)
        _restore_fails(env, img, "writable by group or others")
        os.chmod(s2, 0o700)
        # chown/chmod of the page file move its ctime too; refused for what they are first
        os.chown(pf, NOBODY, NOBODY)
        _restore_fails(env, img, "owned by uid 65534")
        os.chown(pf, 0, 0)
        os.chmod(pf, 0o666)
        _restore_fails(env, img, "writable by group or others")
    finally:
        rmtree(s2)
        shutil.rmtree(os.path.join(d, "own.img"), ignore_errors=True)


# -- 10: --pidfile -------------------------------------------------------------------------------
def _restore_with_stdin(env, *args) -> subprocess.CompletedProcess:
    """Restore with a stdin pipe the clone would wait on (so a clone left behind stays)."""
    d, s, p = env
    q = subprocess.Popen(CXLFORK + ["restore", *args], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while q.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        left = _ours(d, p.pid)
        for pid in left:
            os.kill(pid, 9)
        out, err = q.communicate(timeout=30)
    finally:
        if q.poll() is None:
            q.kill()
            q.wait()
    assert not left, f"clones left running: {left}"
    return subprocess.CompletedProcess(q.args, q.returncode, out, err)


def test_pidfile_in_missing_directory_makes_no_clone(env):
    d, s, p = env
    img = _ckpt(env, "pid.img")
    r = _restore_with_stdin(env, img, "--pidfile", os.path.join(d, "no", "such", "pids"))
    _one_error(r, "does not exist")
    r = _restore_with_stdin(env, img, "--detach", "--pidfile", d)
    _one_error(r, "is a directory")
    cxlfork("rm", img)


def test_pidfile_temporary_name_is_not_followed(env):
    """A symlink planted at the pidfile's temporary name (its PID is guessable) is not
    written through: the restore fails, the clone is killed, the target is intact."""
    d, s, p = env
    img = _ckpt(env, "pid3.img")
    victim = os.path.join(d, "victim")
    with open(victim, "w") as f:
        f.write("precious\n")
    shared = tempfile.mkdtemp(prefix="cxlfork-sec-shared-", dir="/dev/shm")
    os.chmod(shared, 0o1777)
    pidfile = os.path.join(shared, "pids")
    # the shell waits for a line until the symlink is planted, then execs cxlfork (same PID)
    q = subprocess.Popen(["sh", "-c", 'read x; exec "$@"', "sh", *CXLFORK,
                          "restore", img, "--detach", "--pidfile", pidfile],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    os.symlink(victim, f"{pidfile}.tmp.{q.pid}")
    q.stdin.write("planted\n")
    q.stdin.flush()
    try:
        out, err = q.communicate(timeout=60)
        left = _ours(d, p.pid)
        for pid in left:
            os.kill(pid, 9)
        assert not left, f"clones left running: {left}"
        _one_error(subprocess.CompletedProcess(q.args, q.returncode, out, err), "--pidfile")
        assert open(victim).read() == "precious\n" and not os.path.exists(pidfile)
    finally:
        rmtree(shared)
    cxlfork("rm", img)


def test_pidfile_write_failing_kills_the_clones(env):
    """A directory that passes the checks but cannot take a file (a tmpfs with no inode
    left): the clones were made, and are killed and reaped."""
    d, s, p = env
    img = _ckpt(env, "pid2.img")
    full = tempfile.mkdtemp(prefix="cxlfork-sec-full-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "nr_inodes=1,size=64k", "cxlfork-sec", full],
                   check=True)
    try:
        r = _restore_with_stdin(env, img, "-n", "2", "--detach", "--pidfile",
                                os.path.join(full, "pids"))
        line = _one_error(r, "No space left on device")
        assert "killed the 2 clone(s)" in line
    finally:
        subprocess.run(["umount", full], check=True)
        os.rmdir(full)
    cxlfork("rm", img)


def test_non_root_user_has_own_key_and_store(env):
    """A non-root user seals with a key in their own state directory and gets their own
    fallback store; root's store is refused to them, their key is refused to root."""
    from conftest import unprivileged_cannot_read_checkout
    if (why := unprivileged_cannot_read_checkout()):
        pytest.skip(why)
    d, s, p = env
    img = _ckpt(env, "nr.img")
    state = tempfile.mkdtemp(prefix="cxlfork-sec-state-", dir="/dev/shm")
    os.chmod(state, 0o755)
    home = os.path.join(state, "home")
    os.mkdir(home, 0o700)
    os.chown(home, NOBODY, NOBODY)
    code = ("import os, sys\n"
            "from cxlfork import trust, store\n"
            "from cxlfork.errors import CxlforkError\n"
            "trust.key(create=True)\n"
            "st = os.stat(trust.key_path())\n"
            "print(trust.key_path(), oct(st.st_mode & 0o777), st.st_uid, store.fallback())\n"
            "try:\n"
            "    store.open_store(sys.argv[1], create=False)\n"
            "except CxlforkError as e:\n"
            "    print(e)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            sys.executable, "-c", code, s], capture_output=True, text=True,
                           env={"PATH": os.environ["PATH"], "PYTHONPATH": root, "HOME": home})
        assert r.returncode == 0, r.stderr
        first, second = r.stdout.strip().splitlines()
        key = os.path.join(home, ".local", "state", "tiermem", "cxlfork.key")
        assert first == f"{key} 0o600 {NOBODY} /dev/shm/cxlfork-store-{NOBODY}", first
        assert f"store {s} is owned by uid 0, not by you (uid {NOBODY})" in second, second
        r = subprocess.run(CXLFORK + ["verify", img], capture_output=True, text=True,
                           env=dict(os.environ, CXLFORK_KEY=key))
        _one_error(r, "owned by uid 65534")
    finally:
        rmtree(state)
    cxlfork("rm", img)


def test_porter_start_removes_stale_unsealed_images_without_following_them(env):
    """A porter's run_dir/images/ (its own) holding an image it cannot validate (an older
    format, or crafted): the directory goes at the next start, nothing outside it."""
    from cxlfork.porter.config import PorterConfig
    from cxlfork.porter.service import Porter
    d, s, p = env
    run = tempfile.mkdtemp(prefix="cxlfork-sec-run-", dir="/dev/shm")
    victim = tempfile.mkdtemp(prefix="cxlfork-sec-victim-", dir="/dev/shm")
    try:
        with open(os.path.join(victim, "x.pages"), "w") as f:
            f.write("precious\n")
        old = os.path.join(run, "images", "old.img")
        os.makedirs(old, mode=0o700)
        os.chmod(os.path.join(run, "images"), 0o700)
        _write_manifest(old, {"format": "cxlfork-image", "version": 1,
                              "store": {"dir": victim, "file": "x.pages"}})
        logs = []
        porter = Porter(PorterConfig(run_dir=run, store=s), log=logs.append)
        porter.stop()
        assert not os.path.exists(old), logs
        assert os.listdir(victim) == ["x.pages"]
        assert any("without its page file" in x for x in logs), logs
    finally:
        rmtree(run)
        rmtree(victim)

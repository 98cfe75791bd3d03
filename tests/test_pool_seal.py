"""The pool key and the seals of pool images, on this host (no emulated hosts): a pool laid
out as `tiermem emulate start --hosts` lays it out (host-id, one region of three
preallocated files), in a temporary directory, with its key in another. The two-host tests
are tests/test_remote_vm.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST = os.path.join(HERE, "remote_guest.py")


@pytest.fixture
def pool(tmp_path):
    root = tmp_path / "pool"
    (root / "h0").mkdir(parents=True)
    os.chmod(root / "h0", 0o700)
    (root / "host-id").write_text("0\n")
    for what, mib in (("pages", 48), ("log", 2), ("leases", 1)):
        p = root / "h0" / f"h0.{what}"
        p.write_bytes(b"\xa5" * (mib << 20) if what == "pages" else b"\0" * (mib << 20))
        os.chmod(p, 0o600)
    kd = tmp_path / "key"
    kd.mkdir(mode=0o700)
    key = kd / "pool.key"
    key.write_bytes(os.urandom(32))
    os.chmod(key, 0o600)
    env = dict(os.environ, CXLFORK_POOL=str(root), CXLFORK_POOL_KEY=str(key))
    local = "/run/cxlfork/pool-images"           # poollog.LOCAL_IMAGES: host-local images
    before = set(os.listdir(local)) if os.path.isdir(local) else set()
    yield env, str(key)
    for n in set(os.listdir(local)) - before if os.path.isdir(local) else ():
        shutil.rmtree(os.path.join(local, n), ignore_errors=True)


def _run(env, *args, timeout=120):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _one_line(r, msg):
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [f"cxlfork: error: {msg}"], r.stderr


def test_pool_key_missing_or_readable_by_others(pool):
    env, key = pool
    os.chmod(key, 0o644)
    _one_line(_run(env, "-m", "cxlfork", "pool", "ls"),
              f"pool key {key} is readable by group or others (mode 0644); it must be 0600")
    os.unlink(key)
    for args in (("ls",), ("checkpoint", str(os.getpid()), "x")):
        _one_line(_run(env, "-m", "cxlfork", "pool", *args),
                  f"no pool key {key}: the host that boots the pool's hosts provisions it "
                  f"('tiermem emulate start --hosts N' does); pool images are sealed with it")


@pytest.mark.parametrize("how", ["foreign", "record", "manifest", "manifest-seal"])
def test_foreign_or_tampered_pool_image_refused(pool, how):
    env, key = pool
    c = json.loads(_run(env, GUEST, "ckpt", "img", "4", "--kill").stdout)
    assert c["rc"] == 0, c
    r = _run(env, GUEST, "clones", "img", "1")
    assert json.loads(r.stdout)["answers"] == ["done", "ok"], r.stdout + r.stderr
    slot = json.loads(_run(env, GUEST, "forge", "img", how).stdout)["slot"]
    if how == "manifest-seal":
        msg = (f"image h0/img on the pool: manifest checksum mismatch (corrupt, edited, or "
               f"not sealed with this pool's key {key})")
    else:
        msg = (f"pool image 'img' refused: its log record (h0.log slot {slot}: record seal "
               f"mismatch) is not sealed with this pool's key {key} (sealed under a foreign "
               f"key, or edited)")
    for verb in ("restore", "verify"):
        _one_line(_run(env, "-m", "cxlfork", "pool", verb, "img"), msg)

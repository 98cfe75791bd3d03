"""Ghosts and spawned restorers born in a given cgroup (cxlfork.cgtarget): on cgroup v1 the
child joins the memory controller's cgroup.procs before its exec, on cgroup v2 clone3 places
it (CLONE_INTO_CGROUP); what a warm ghost copies is charged to that cgroup, not the
spawner's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

from cxlfork_util import build_prog, cxlfork, new_store, readline, rmtree, start

V1 = "/sys/fs/cgroup/memory"
V2 = "/sys/fs/cgroup/unified"
pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, cgroups)"),
              pytest.mark.skipif(not os.path.isfile(os.path.join(V1, "cgroup.procs")),
                                 reason="no cgroup v1 memory controller mounted here")]


def _rmdir(d: str) -> None:
    """Remove a test cgroup once its processes are gone (they were killed and reaped)."""
    for _ in range(200):
        try:
            os.rmdir(d)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)
    os.rmdir(d)


@pytest.fixture
def cgroups():
    """Two fresh v1 memory cgroups: 'spawner' (where the pool's owner runs) and 'target'."""
    made = []
    for name in ("spawner", "target"):
        d = os.path.join(V1, f"cxlfork-test-{os.getpid()}-{name}")
        os.mkdir(d)
        made.append(d)
    yield made
    for d in made:
        _rmdir(d)


@pytest.fixture(scope="module")
def mem_image():
    d = tempfile.mkdtemp(prefix="cxlfork-cg-")
    s = new_store()
    exe = build_prog("mem", d)
    orig = start([exe], cwd=d)
    img = os.path.join(d, "mem.img")
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", s)
        yield img
    finally:
        if orig.poll() is None:
            orig.kill()
        orig.wait()
        cxlfork("rm", img, check=False)
        rmtree(d)
        rmtree(s)


_SPAWNER = r"""
import json, os, sys
from cxlfork.ghosts import GhostPool
from cxlfork.restore import prepare_restore
img, spawner, target = sys.argv[1:4]
with open(os.path.join(spawner, "cgroup.procs"), "w") as f:
    f.write("0")
usage = lambda d: int(open(os.path.join(d, "memory.usage_in_bytes")).read())
with prepare_restore(img, "moa", eager=True) as p:
    p.warm_plan()
    before = {"spawner": usage(spawner), "target": usage(target)}
    with GhostPool(1, refill="manual", prepared=p, cgroup=target) as pool:
        g = pool.pids()[0]
        after = {"spawner": usage(spawner), "target": usage(target)}
        anon = [int(l.split()[1]) * 1024 for l in open(f"/proc/{g}/smaps_rollup")
                if l.startswith("Anonymous:")][0]
        cg = open(f"/proc/{g}/cgroup").read()
print(json.dumps({"before": before, "after": after, "anon": anon, "cgroup": cg}))
"""


def test_warm_moa_ghost_charged_to_its_cgroup(mem_image, cgroups):
    """A warm eager-moa ghost copies the image's private pages when it is spawned: with
    cgroup=target those copies are charged to target (its memory.usage_in_bytes rises by at
    least the ghost's anonymous memory) and not to the cgroup of the process that spawned it."""
    spawner, target = cgroups
    out = subprocess.run([sys.executable, "-c", _SPAWNER, mem_image, spawner, target],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    anon = r["anon"]
    assert anon >= 16 << 20, r                          # the mem program's copied pages
    assert f"memory:/{os.path.basename(target)}\n" in r["cgroup"], r["cgroup"]
    grew = {k: r["after"][k] - r["before"][k] for k in ("spawner", "target")}
    assert grew["target"] >= anon, (grew, anon)
    assert grew["spawner"] < anon // 8, (grew, anon)


def test_spawned_restorer_and_v2_and_errors(mem_image, cgroups):
    """prepared.restore(cgroup=) spawns the clone's restorer in that cgroup (v1); a cold ghost
    pool on the v2 hierarchy is placed by clone3(CLONE_INTO_CGROUP); a pool from another
    cgroup, or a directory that is no cgroup, is one clear error and leaves nothing behind."""
    from cxlfork.errors import CxlforkError
    from cxlfork.ghosts import GhostPool
    from cxlfork.restore import prepare_restore
    _, target = cgroups
    name = os.path.basename(target)
    with prepare_restore(mem_image, "mow") as p:
        r, w = os.pipe()
        r2, w2 = os.pipe()
        try:
            pid, = p.restore(1, stdio=(r, w2, w2), cgroup=target)
            try:
                assert f"memory:/{name}\n" in open(f"/proc/{pid}/cgroup").read()
                assert str(pid) in open(os.path.join(target, "cgroup.procs")).read().split()
                os.write(w, b"go\n")
                assert readline(os.fdopen(r2, "rb", closefd=False)).strip() == "ok"
            finally:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
        finally:
            for fd in (r, w, r2, w2):
                os.close(fd)
        with GhostPool(1, refill="manual") as pool:
            with pytest.raises(CxlforkError, match="ghost pool's ghosts are in cgroup"):
                p.restore(1, ghosts=pool, cgroup=target)
            assert pool.stats()["taken"] == 0
    with pytest.raises(CxlforkError, match="is not a cgroup directory"):
        GhostPool(1, refill="manual", cgroup=tempfile.gettempdir())
    if not os.path.isfile(os.path.join(V2, "cgroup.procs")):
        return
    d2 = os.path.join(V2, f"cxlfork-test-{os.getpid()}")
    os.mkdir(d2)
    try:
        with GhostPool(2, refill="manual", cgroup=d2) as pool:
            for pid in pool.pids():
                assert f"0::/{os.path.basename(d2)}\n" in open(f"/proc/{pid}/cgroup").read()
    finally:
        _rmdir(d2)


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return [int(x.split()[1]) for x in f if x.startswith(key + ":")][0]


def test_prefaulted_warm_ghost_has_its_store_pages_mapped(mem_image):
    """GhostPool(prefault=True): a warm mow ghost has its readable store pages in its page
    tables before any restore (RssFile + RssShmem cover the mem program's ~24 MiB of store pages; a
    ghost without prefault has almost none); the clone still answers. Lazy moa, or prefault
    without warm ghosts, is one error."""
    from cxlfork.errors import CxlforkError
    from cxlfork.ghosts import GhostPool
    from cxlfork.restore import prepare_restore
    with prepare_restore(mem_image, "mow") as p:
        rss = {}
        for prefault in (False, True):
            with GhostPool(1, refill="manual", prepared=p, prefault=prefault) as pool:
                g = pool.pids()[0]               # the store is a file or shmem (/dev/shm)
                rss[prefault] = (_status(g, "RssFile") + _status(g, "RssShmem")) << 10
                if prefault:
                    r, w = os.pipe()
                    r2, w2 = os.pipe()
                    try:
                        pid, = p.restore(1, stdio=(r, w2, w2), ghosts=pool)
                        os.write(w, b"go\n")
                        assert readline(os.fdopen(r2, "rb", closefd=False)).strip() == "ok"
                        os.waitpid(pid, 0)
                    finally:
                        for fd in (r, w, r2, w2):
                            os.close(fd)
        assert rss[True] >= 16 << 20 and rss[False] < 4 << 20, rss
        with pytest.raises(CxlforkError, match="needs warm ghosts"):
            GhostPool(1, refill="manual", prefault=True)
    with prepare_restore(mem_image, "moa") as p:
        with pytest.raises(CxlforkError, match="lazy moa"):
            GhostPool(1, refill="manual", prepared=p, prefault=True)

"""First-request write profile (cxlfork.firstreq): recorded from a real mow clone after its
first request, it names the stored pages that request copied on write and the untouched
anonymous pages it filled; a prefaulting warm ghost makes those pages private before the
clone exists (pagemap: present, not the store's), the clone answers as the original does,
and its first request takes far fewer page faults than a plain mow clone's. A profile that
does not fit the image is refused with one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from cxlfork_util import PROGS, cxlfork, new_store, readline, rmtree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, PR_SET_MM_MAP)")
PAGE = 4096


def _minflt(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(") ", 1)[1].split()[7])


class _Clone:
    def __init__(self):
        self.in_r, self.in_w = os.pipe()
        self.out_r, self.out_w = os.pipe()

    def stdio(self):
        return (self.in_r, self.out_w, 2)

    def go(self) -> str:
        os.write(self.in_w, b"go\n")
        return readline(os.fdopen(self.out_r, "rb", closefd=False)).strip()

    def close(self):
        for fd in (self.in_r, self.in_w, self.out_r, self.out_w):
            os.close(fd)


def _kill(pid):
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


@pytest.fixture(scope="module")
def image():
    d = tempfile.mkdtemp(prefix="cxlfork-firstreq-")
    s = new_store()
    p = subprocess.Popen([sys.executable, os.path.join(PROGS, "firstwrite.py")],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
    try:
        buf, zone = (int(x) for x in readline(p.stdout).split())
        assert readline(p.stdout).strip() == "ready"
        img = os.path.join(d, "fw.img")
        cxlfork("checkpoint", p.pid, "-o", img, "--store", s)
        p.stdin.write(b"go\n")
        p.stdin.flush()
        want = readline(p.stdout).strip()          # the original's first answer
        yield img, buf, zone, want
    finally:
        p.kill()
        p.wait()
        cxlfork("rm", os.path.join(d, "fw.img"), check=False)
        rmtree(d)
        rmtree(s)


def test_profile_prefaults_first_writes(image):
    from cxlfork.firstreq import FIRST, record
    from cxlfork.ghosts import GhostPool
    from cxlfork.restore import prepare_restore
    from tiermem.native import PM_FILE, PM_PRESENT, pagemap_read
    img, buf, zone, want = image
    # a plain mow clone's first request, then its profile
    c = _Clone()
    try:
        with prepare_restore(img, "mow") as p:
            assert p.first is None
            pid, = p.restore(1, stdio=c.stdio())
            f0 = _minflt(pid)
            assert c.go() == want
            plain_faults = _minflt(pid) - f0
            r = record(img, [pid])
            _kill(pid)
    finally:
        c.close()
    assert r["written_pages"] >= (4 << 20) // PAGE          # half the data, copied on write
    assert r["zero_pages"] >= (2 << 20) // PAGE             # the untouched mapping
    assert os.path.exists(os.path.join(img, FIRST))
    # a prefaulting warm ghost made those pages private before the clone exists
    c = _Clone()
    try:
        with prepare_restore(img, "mow") as p, \
                GhostPool(1, refill="manual", prepared=p, prefault=True) as pool:
            assert p.first
            ghost = pool.pids()[0]
            for addr, n in ((buf, (4 << 20) // PAGE), (zone, (2 << 20) // PAGE)):
                pm = pagemap_read(ghost, addr - addr % PAGE + PAGE, n - 1)
                private = ((pm & np.uint64(PM_PRESENT)) != 0) & ((pm & np.uint64(PM_FILE)) == 0)
                assert private.all(), f"{(~private).sum()} pages at {addr:#x} not private"
            # the second half of the data was only read: still the store's pages
            pm = pagemap_read(ghost, buf + (5 << 20), 256)
            assert ((pm & np.uint64(PM_FILE)) != 0).all()
            pid, = p.restore(1, stdio=c.stdio(), ghosts=pool)
            assert pid == ghost
            f0 = _minflt(pid)
            assert c.go() == want                  # same bytes as the original's
            ghost_faults = _minflt(pid) - f0
            _kill(pid)
    finally:
        c.close()
    assert ghost_faults * 4 < plain_faults, (ghost_faults, plain_faults)


def test_bad_profile_refused(image):
    from cxlfork.errors import ImageError
    from cxlfork.firstreq import FIRST
    from cxlfork.restore import prepare_restore
    img = image[0]
    path = os.path.join(img, FIRST)
    m = json.load(open(os.path.join(img, "manifest.json")))
    try:
        for body, msg in (({"id": m["id"], "ranges": [[4096, 4096]]}, "not inside one writable"),
                          ({"id": "other", "ranges": []}, "another image"),
                          ("{not json", "corrupt")):
            with open(path, "w") as f:
                f.write(body if isinstance(body, str) else json.dumps(body))
            with pytest.raises(ImageError, match=msg):
                prepare_restore(img, "mow")
    finally:
        os.unlink(path)

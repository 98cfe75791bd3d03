"""MADV_FREE then reuse, and MADV_REMOVE, on restored anonymous memory against plain
anonymous memory (tests/cxlfork_progs/anonfree.c, which allows nothing else), per policy.
The original (plain anonymous memory) and a moa --eager clone (copies in anonymous memory)
pass. Under mow, lazy moa and hybrid the clone's pages are a private mapping of the page
store, and the kernel answers both calls itself, before cxlfork's userfaultfd handler can:
MADV_FREE fails with EINVAL and MADV_REMOVE with EACCES, as docs/cxlfork.md ("Known limits")
says; the test holds the clone to exactly those two failures (and the rest of the checks
passing), so a change either way shows here."""
from __future__ import annotations

import os
import tempfile

import pytest

from cxlfork_util import build_prog, cxlfork, go, new_store, restore_popen, rmtree, start, \
    wait_file

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, PR_SET_MM_MAP)")

DOCUMENTED = ["FAIL: MADV_FREE returned -1 errno 22", "FAIL: MADV_REMOVE returned -1 errno 13"]


@pytest.fixture(scope="module")
def env():
    d = tempfile.mkdtemp(prefix="cxlfork-anonfree-")
    s = new_store()
    yield d, s
    rmtree(d)
    rmtree(s)


@pytest.mark.parametrize("policy,want", [("mow", DOCUMENTED), ("moa", DOCUMENTED),
                                         ("hybrid", DOCUMENTED), ("moa --eager", ["ok"])])
def test_madv_free_and_remove(env, policy, want):
    d, store = env
    exe = build_prog("anonfree", d)
    orig = start([exe], cwd=d)
    img = os.path.join(d, f"anonfree-{policy.replace(' ', '')}.img")
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store)
        pidfile = img + ".pids"
        clone = restore_popen(img, "--policy", *policy.split(), "--pidfile", pidfile)
        wait_file(pidfile, clone)
        out, rc, _ = go(orig)
        assert out.split("\n")[:-1] == ["ok"] and rc == 0, f"original: {out!r}"
        out, rc, err = go(clone)
        assert out.split("\n")[:-1] == want and rc == (0 if want == ["ok"] else 1), \
            f"clone under {policy}: {out!r} rc={rc} {err}"
    finally:
        if orig.poll() is None:
            orig.kill()
            orig.wait()
        cxlfork("rm", img, check=False)

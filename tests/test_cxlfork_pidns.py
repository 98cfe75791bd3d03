"""restore --pidns new (cxlfork/state/pidns.py): refusals are one error line with nothing
made; a restore that fails after the clone's namespace and its init were made leaves no
process (so no namespace) behind."""
from __future__ import annotations

import os
import tempfile
import time

import psutil
import pytest

from cxlfork_util import build_prog, cxlfork, new_store, rmtree, start

PIDS_V1 = "/sys/fs/cgroup/pids"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, namespaces)")


@pytest.fixture(scope="module")
def image():
    d = tempfile.mkdtemp(prefix="cxlfork-pidns-")
    s = new_store()
    orig = start([build_prog("pidtid", d)], cwd=d)
    img = os.path.join(d, "pidtid.img")
    try:
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", s)
        yield img
    finally:
        orig.kill()
        orig.wait()
        rmtree(d)
        rmtree(s)


def _kids() -> set[int]:
    return {c.pid for c in psutil.Process().children(recursive=True)}


def test_same_pid_refused_with_one_line(image):
    before = _kids()
    r = cxlfork("restore", image, "--pidns", "new", "--same-pid", check=False)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        "cxlfork: error: --same-pid restores under the checkpointed PID in cxlfork's own PID "
        "namespace; --pidns new gives each clone that PID in a new namespace: use one or "
        "the other"], r.stderr
    assert _kids() == before


def test_ghosts_refused(image):
    from cxlfork.errors import CxlforkError
    from cxlfork.ghosts import GhostPool
    from cxlfork.restore import prepare_restore
    with prepare_restore(image) as p, GhostPool(1, refill="manual") as pool:
        with pytest.raises(CxlforkError, match="cannot restore into a ghost"):
            p.restore(1, stdio="null", ghosts=pool, pidns="new")
        assert pool.stats()["taken"] == 0


@pytest.mark.skipif(not os.path.isfile(os.path.join(PIDS_V1, "cgroup.procs")),
                    reason="no cgroup v1 pids controller mounted here")
def test_failure_after_the_namespace_leaves_nothing(image):
    """A pids cgroup with room for the init and the restorer but not for the image's two
    threads: the restore fails while creating them, after the namespace and its init were
    made; the error names the step, and no process (hence no namespace) is left."""
    from cxlfork.errors import CxlforkError
    from cxlfork.restore import restore
    cg = os.path.join(PIDS_V1, f"cxlfork-test-pidns-{os.getpid()}")
    os.mkdir(cg)
    try:
        with open(os.path.join(cg, "pids.max"), "w") as f:
            f.write("2")
        before = _kids()
        with pytest.raises(CxlforkError, match="threads of clone 1"):
            restore(image, stdio="null", pidns="new", cgroup=cg)
        assert _kids() == before
        assert open(os.path.join(cg, "cgroup.procs")).read() == ""
        # the limit is what failed: with room, the same restore works
        with open(os.path.join(cg, "pids.max"), "w") as f:
            f.write("max")
        pid, = restore(image, stdio="null", pidns="new", cgroup=cg)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    finally:
        for _ in range(200):
            try:
                os.rmdir(cg)
                break
            except OSError:
                time.sleep(0.02)

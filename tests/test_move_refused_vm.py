"""Bad input in the emulated CXL machine: pages the kernel refuses to migrate (held by a
pipe through vmsplice) come back as EBUSY from tiermem.native.move_pages and the daemon's
mover, are counted, and the other pages still move; once the pipe lets go, they move too.
(On the one-node host nothing is ever migrated, so no page can be refused there.)"""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROG = os.path.join(ROOT, "tests", "progs", "pinned_move.py")

pytestmark = [pytest.mark.vm]


def test_pinned_pages_are_refused_counted_and_the_rest_moves(cxl_vm):
    r = cxl_vm.run([sys.executable, PROG], timeout=600)
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    res = json.loads(r.stdout)
    assert res["before"] == [1], res
    # the kernel stores no status for a batch whose migration failed: without re-reading
    # where those pages are, the status array held whatever was in memory before
    assert res["status_pinned"] == [-16], res                  # -EBUSY
    assert res["status_free"] == [0], res
    assert res["where_after"] == [1], res                      # really still on node 1
    assert res["mover"] == {"moved": 48, "failed": {"EBUSY": 16}, "node_full": False}, res
    assert res["mover_after_drain"] == {"moved": 16, "failed": {}}, res
    assert res["data_ok"] is True

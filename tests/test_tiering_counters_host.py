"""tiermemd's stats count processes that exit mid-run (issue 16, bad input): a real
process is tiered, killed, and the engine keeps going and says so in its stats."""
import os
import subprocess
import sys

import pytest

from tiermem.topology import read_topology
from tiermemd import config
from tiermemd.engine import Engine

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="tiermemd needs root")


def test_exited_workload_is_counted_and_the_loop_goes_on(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                              stdin=subprocess.DEVNULL) for _ in range(2)]
    try:
        raw = {"daemon": {"interval": "200ms", "socket": str(tmp_path / "ctl.sock"),
                          "state_dir": str(tmp_path / "state")},
               "targets": [{"name": "w", "pids": [p.pid for p in procs],
                            "policy": "first-touch"}]}
        topo = read_topology()
        eng = Engine(config.parse(raw, topology=topo), topo)
        eng.step()
        assert sorted(eng.procs) == sorted(p.pid for p in procs)
        st = eng.stats.to_dict()["targets"]["w"]
        assert st["processes_exited"] == 0 and st["node_full_events"] == 0
        procs[0].kill()
        procs[0].wait()
        eng.step()
        eng.step()
        st = eng.stats.to_dict()["targets"]["w"]
        assert st["processes_exited"] == 1
        assert list(eng.procs) == [procs[1].pid]       # the other one is still served
        assert st["pages_busy"] == 0
    finally:
        for p in procs:
            p.kill()
            p.wait()

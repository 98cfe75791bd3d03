"""The porter's memory cgroup on cgroup v2, in the emulated machine (its kernel has the memory
controller on the cgroup2 mount; this host has it on v1 only): the limit lands in memory.max,
a child that joins before exec and goes over it is OOM-killed and counted in memory.events,
a process moved in shows in cgroup.procs, and remove() leaves nothing."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

pytestmark = pytest.mark.vm

SCENARIO = r"""
import json, os, subprocess, sys
from cxlfork.porter.cgroup import MemoryCgroup
cg = MemoryCgroup.create(32 << 20)
d = cg.add_function("f")
res = {"version": cg.version, "path": cg.path,
       "max": open(os.path.join(cg.path, "memory.max")).read().strip()}
fd = cg.procs_fd("f")
hog = "b = bytearray(96 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('survived')"
p = subprocess.Popen([sys.executable, "-c", hog], stdout=subprocess.PIPE,
                     preexec_fn=lambda: os.write(fd, b"0"))
res["hog_out"] = p.communicate()[0].decode()
res["hog_rc"] = p.returncode
q = subprocess.Popen(["sleep", "60"])
cg.move("f", q.pid)
res["moved_in"] = q.pid in [int(x) for x in open(os.path.join(d, "cgroup.procs")).read().split()]
res["stats"] = cg.stats()
q.kill()
q.wait()
cg.remove()
res["gone"] = not os.path.exists(cg.path)
print(json.dumps(res))
"""


def test_cgroup_v2_limit_oom_kill_and_removal(cxl_vm):
    r = cxl_vm.run([PY, "-c", SCENARIO], timeout=300, cwd=ROOT)
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["version"] == 2, res
    assert res["max"] == str(32 << 20)
    assert res["hog_rc"] == -9 and "survived" not in res["hog_out"], res
    assert res["stats"]["functions"]["f"]["oom_kills"] == 1, res["stats"]
    assert res["stats"]["oom_kills"] >= 1
    assert res["moved_in"] and res["gone"], res

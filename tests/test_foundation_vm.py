"""Foundation inside the emulated CXL machine: two nodes in two tiers, moves between them
with data verified, a full node and an absent node refused clearly."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

pytestmark = pytest.mark.vm


def _run(vm, args, timeout=300):
    r = vm.run([PY, *args], timeout=timeout)
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_topo_two_tiers(cxl_vm):
    d = json.loads(_run(cxl_vm, ["-m", "tiermem.cli", "topo", "--json"]))
    nodes = {n["id"]: n for n in d["nodes"]}
    assert set(nodes) >= {0, 1}
    assert nodes[1]["cpuless"] and nodes[1]["mem_total_kb"] > 0
    assert not nodes[0]["cpuless"]
    assert nodes[0]["tier"] is not None and nodes[1]["tier"] is not None
    assert nodes[1]["tier"] > nodes[0]["tier"], "slow node must be in a lower memory tier"
    assert d["slow_nodes"] == [1] and 0 in d["fast_nodes"]
    assert nodes[0]["demotion_targets"] == [1]


def test_move_slow_to_fast_by_range(cxl_vm):
    res = json.loads(_run(cxl_vm, [os.path.join(ROOT, "tests/progs/move_scenario.py"),
                                   "promote"]))
    pages = res["info"]["pages"]
    assert res["before"].get("1", res["before"].get(1)) == pages
    assert res["move"]["pages_moved"] == pages // 2 and not res["move"]["pages_failed"]
    after = {int(k): v for k, v in res["after"].items()}
    assert after[0] == pages // 2 and after[1] == pages - pages // 2
    assert res["verify"] == "ok" and res["verify2"] == "ok"
    assert res["capped"]["pages_moved"] == 4_000_000 // 4096
    assert res["absent"]["rc"] != 0 and "node 7 does not exist" in res["absent"]["err"]


def test_move_to_full_node(cxl_vm):
    res = json.loads(_run(cxl_vm, [os.path.join(ROOT, "tests/progs/move_scenario.py"), "full"]))
    mv = res["move"]
    assert mv["rc"] != 0, mv
    err = mv["err"].strip().splitlines()
    assert len(err) == 1 and "not moved" in err[0] and "ENOMEM" in err[0], mv
    assert res["verify"] == "ok" and res["hog_alive"]

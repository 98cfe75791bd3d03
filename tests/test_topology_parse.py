"""Parsing unit test: topology from a hand-made sysfs tree of a 3-node CXL box (DRAM node
with CPUs, two CPU-less CXL nodes) via TIERMEM_SYSROOT. The real-kernel checks are in
test_foundation_host.py and test_foundation_vm.py."""
import importlib
import os

import pytest


def _w(root, path, text):
    p = os.path.join(root, path.lstrip("/"))
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "w") as f:
        f.write(text)


@pytest.fixture
def fake_sys(tmp_path, monkeypatch):
    r = str(tmp_path)
    _w(r, "/sys/devices/system/node/online", "0-2\n")
    dist = {0: "10 20 30", 1: "20 10 40", 2: "30 40 10"}
    for n, cpus, total, free in ((0, "0-3", 8_000_000, 6_000_000), (1, "", 4_000_000, 3_900_000),
                                 (2, "", 2_000_000, 2_000_000)):
        _w(r, f"/sys/devices/system/node/node{n}/cpulist", cpus + "\n")
        _w(r, f"/sys/devices/system/node/node{n}/distance", dist[n] + "\n")
        _w(r, f"/sys/devices/system/node/node{n}/meminfo",
           f"Node {n} MemTotal:       {total} kB\nNode {n} MemFree:        {free} kB\n")
    _w(r, "/sys/devices/system/node/node1/access0/initiators/read_latency", "280\n")
    _w(r, "/sys/devices/system/node/node1/access0/initiators/read_bandwidth", "20000\n")
    os.makedirs(os.path.join(r, "sys/devices/system/node/node1/access0/initiators/node0"))
    _w(r, "/sys/devices/virtual/memory_tiering/memory_tier4/nodelist", "0\n")
    _w(r, "/sys/devices/virtual/memory_tiering/memory_tier22/nodelist", "1-2\n")
    _w(r, "/sys/kernel/mm/numa/demotion_enabled", "true\n")
    _w(r, "/proc/sys/kernel/numa_balancing", "2\n")
    monkeypatch.setenv("TIERMEM_SYSROOT", r)
    import tiermem.kfs as kfs
    import tiermem.topology as topology
    importlib.reload(kfs)
    importlib.reload(topology)
    yield topology
    monkeypatch.delenv("TIERMEM_SYSROOT")
    importlib.reload(kfs)
    importlib.reload(topology)


def test_parse_cxl_box(fake_sys):
    t = fake_sys.read_topology()
    assert sorted(t.nodes) == [0, 1, 2]
    assert t.nodes[0].cpus == [0, 1, 2, 3] and t.nodes[1].cpuless and t.nodes[2].cpuless
    assert t.nodes[1].mem_total_kb == 4_000_000 and t.nodes[1].mem_free_kb == 3_900_000
    assert t.nodes[2].distances == {0: 30, 1: 40, 2: 10}
    assert t.tiers == {4: [0], 22: [1, 2]}
    assert t.fast_nodes == [0] and t.slow_nodes == [1, 2]
    assert t.nodes[0].demotion_targets == [1]          # nearest of the lower tier
    assert t.nodes[1].hmat["access0"]["read_latency"] == 280
    assert t.nodes[1].hmat["access0"]["initiators"] == [0]
    assert t.demotion_enabled is True and t.numa_balancing == 2
    assert fake_sys.slow_node_or_fallback(t) == (1, None)


def test_cpulist_parse():
    from tiermem.kfs import parse_cpulist
    assert parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpulist("") == []


ZONEINFO = """Node 0, zone      DMA
  pages free     3840
        min      86
        low      107
        high     128
        promo    149
Node 0, zone    DMA32
  pages free     400000
        min      11241
        low      14051
        high     16861
        promo    19671
Node 1, zone   Normal
        min      5697
        low      7121
        high     8545
        promo    9969
"""


def test_zone_watermarks_sum_the_zones_of_one_node():
    from tiermem.topology import zone_watermarks
    assert zone_watermarks(0, ZONEINFO) == {"min": (86 + 11241) * 4096,
                                            "low": (107 + 14051) * 4096,
                                            "high": (128 + 16861) * 4096,
                                            "promo": (149 + 19671) * 4096}
    assert zone_watermarks(1, ZONEINFO)["high"] == 8545 * 4096
    assert zone_watermarks(7, ZONEINFO) == {}


def test_zone_watermarks_of_this_kernel():
    from tiermem.topology import zone_watermarks
    w = zone_watermarks(0)
    assert 0 < w["min"] <= w["low"] <= w["high"]

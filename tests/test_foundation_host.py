"""Foundation on the real host kernel: topology from sysfs, move_pages queries, pagemap,
the microbenchmarks' sanity, and the CLI's bad-input handling."""
import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tiermem import native, placement
from tiermem.topology import read_topology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIERMEM = [sys.executable, "-m", "tiermem.cli"]


def tiermem(*args, check=False):
    return subprocess.run(TIERMEM + [str(a) for a in args], capture_output=True, text=True,
                          check=check, cwd=ROOT)


@pytest.fixture
def worker():
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests/progs/pattern_worker.py"),
                          "16"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    info = json.loads(p.stdout.readline())
    yield p, info
    if p.poll() is None:
        p.kill()
    p.wait()


def test_topology_matches_sysfs():
    topo = read_topology()
    online = open("/sys/devices/system/node/online").read().strip()
    assert len(topo.nodes) >= 1
    assert 0 in topo.nodes
    n0 = topo.nodes[0]
    assert n0.mem_total_kb > 0 and 0 <= n0.mem_free_kb <= n0.mem_total_kb
    from tiermem.kfs import parse_cpulist
    cpus_online = parse_cpulist(open("/sys/devices/system/cpu/online").read())
    assert sorted(c for n in topo.nodes.values() for c in n.cpus) == cpus_online
    assert sorted(topo.nodes) == parse_cpulist(online)
    assert n0.distances[0] == 10
    assert topo.fast_nodes and set(topo.fast_nodes) <= set(topo.memory_nodes)


def test_topo_cli_json():
    r = tiermem("topo", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["nodes"][0]["id"] == 0 and "tiers" in d and "fast_nodes" in d


def test_move_pages_query_and_pagemap(worker):
    p, info = worker
    pages = np.arange(info["start"], info["end"], native.PAGE_SIZE, dtype=np.uint64)
    st = native.query_nodes(info["pid"], pages)
    assert (st == 0).all()                       # one node here: every page on node 0
    dec = native.pagemap_decode(native.pagemap_read(info["pid"], info["start"], len(pages)))
    assert dec["present"].all() and not dec["swapped"].any()
    if os.geteuid() == 0:
        assert (dec["pfn"] > 0).all()            # root sees PFNs
    # an unmapped address gives -EFAULT per page, not a call failure
    st = native.query_nodes(info["pid"], np.array([0x1000], dtype=np.uint64))
    assert st[0] == -errno.EFAULT


def test_move_to_same_node_keeps_data(worker):
    p, info = worker
    res = placement.move(info["pid"], 0, (info["start"], info["end"]))
    assert res.requested == 0 and res.already == info["pages"]
    p.stdin.write("verify\n"); p.stdin.flush()
    assert p.stdout.readline().strip() == "ok"


def test_numastat_counts_worker_pages(worker):
    p, info = worker
    r = tiermem("numastat", info["pid"], "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    vma = [v for v in d["vmas"] if int(v["start"], 16) <= info["start"] < int(v["end"], 16)]
    assert vma and vma[0]["pages"]["0"] >= info["pages"]


def test_microbenchmarks_sane():
    with native.NodeBuffer(32 << 20, 0) as buf:
        lat = [native.latency_ns(buf, loads=300_000, seed=s) for s in (1, 2, 3)]
        bw = native.read_bandwidth(buf, passes=1)
    assert all(l > 0 for l in lat)
    assert max(lat) / min(lat) < 5              # repeatable within a factor
    assert bw > 1e8                             # > 100 MB/s: the loop really ran


@pytest.mark.parametrize("args,needle", [
    (["numastat", "999999999"], "no process with PID 999999999"),
    (["move", "999999999", "--to", "0"], "no process with PID 999999999"),
    (["move", str(os.getpid()), "--to", "77"], "node 77 does not exist"),
    (["move", str(os.getpid()), "--to", "0", "--range", "0x1000-0x2000"],
     "outside every mapping"),
    (["move", str(os.getpid()), "--to", "0", "--range", "nonsense"], "bad range"),
    (["move", str(os.getpid()), "--to", "0", "--max-mb", "-1"], "--max-mb must be positive"),
])
def test_bad_input_one_line(args, needle):
    r = tiermem(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("tiermem: error:")
    assert "Traceback" not in r.stderr


def test_pid_exits_during_move():
    """A target that exits mid-way: one clear line, never a traceback."""
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests/progs/pattern_worker.py"),
                          "64"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    info = json.loads(p.stdout.readline())
    p.kill(); p.wait()
    r = tiermem("move", info["pid"], "--to", "0")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_not_root_refused(worker):
    """Moving another user's pages without CAP_SYS_NICE: one clear line."""
    from conftest import run_unprivileged
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to an unprivileged user for this check")
    p, info = worker
    r = run_unprivileged([sys.executable, "-m", "tiermem.cli", "move", str(info["pid"]),
                          "--to", "0"], capture_output=True, text=True, cwd="/")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "root" in r.stderr and len(r.stderr.strip().splitlines()) == 1

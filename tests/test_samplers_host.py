"""Samplers on this host's kernel (6.18: DAMON paddr only, with a kdamond already running;
BPF tracepoints; no soft-dirty, no idle-page tracking, no hardware PMU)."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tiermem import damon_sysfs as ds
from tiermem.errors import TiermemError
from tiermem.samplers import Target
from tiermem.samplers.bpf import bcc_available
from tiermem.samplers.damon import DamonSampler
from tiermem.samplers.ebpf import FaultSampler, MemSampler
from tiermem.samplers.idle import IdleSampler
from tiermem.samplers.pagemap import PagemapSampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "emulation", "workloads"))
from sampler_hotcheck import prog_loaded  # noqa: E402

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (BPF, DAMON sysfs, PFNs)")
needs_bcc = pytest.mark.skipif(not bcc_available()[0], reason=bcc_available()[1])


@pytest.fixture(scope="module")
def hot_binary(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("wl") / "sampler_hot")
    subprocess.run(["gcc", "-O2", "-pthread", "-o", out,
                    os.path.join(ROOT, "emulation/workloads/sampler_hot.c")], check=True)
    return out


def _spawn(binary, size_mb=16, seconds=5, wait=False, pass_us=10000):
    env = dict(os.environ)
    if wait:
        env["SAMPLER_HOT_WAIT"] = "1"
    p = subprocess.Popen([binary, str(size_mb), "8", "3", str(seconds), str(pass_us)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    first = p.stdout.readline()
    assert first.startswith("mapped"), first
    f = dict(x.split("=") for x in first.split()[1:])
    return p, int(f["base"], 16), int(f["size"])


def _go(p):
    p.stdin.write("go\n")
    p.stdin.flush()
    line = p.stdout.readline()
    assert line.startswith("ready"), line


# --- DAMON ---------------------------------------------------------------------------------

@root
def test_damon_features_report_versions_and_missing():
    n = ds.nr_kdamonds()
    feats = {f["name"]: f for f in ds.detect_features()}
    assert feats["sysfs"]["present"] and feats["paddr"]["present"]
    assert all(f["since"] for f in feats.values())
    if not feats["vaddr"]["present"]:
        assert "not built into this kernel" in feats["vaddr"]["note"] or \
            "appeared in Linux" in feats["vaddr"]["note"]
    assert ds.nr_kdamonds() == n, "probing must leave the interface as it was"


@root
def test_damon_vaddr_missing_is_a_clear_error(hot_binary):
    if ds.has_operations("vaddr"):
        pytest.skip("this kernel has DAMON vaddr (tested in the VM tests)")
    p, _, _ = _spawn(hot_binary)
    try:
        with pytest.raises(TiermemError, match="'vaddr'.*not built into this kernel"):
            DamonSampler().start(Target([p.pid]))
    finally:
        p.kill()
        p.wait()


@root
def test_damon_busy_kdamond_is_refused_and_untouched():
    running = ds.running_kdamonds()
    if not running:
        pytest.skip("no kdamond is running on this machine (the refusal is tested in the VM)")
    before = [(k["index"], k["pid"], k["state"]) for k in running]
    n = ds.nr_kdamonds()
    with pytest.raises(TiermemError) as ei:
        DamonSampler().start(Target(phys_ranges=[ds.node_phys_range(0)]))
    msg = str(ei.value)
    assert f"kdamond {running[0]['index']} (pid {running[0]['pid']}" in msg and "--force" in msg
    assert "\n" not in msg
    assert [(k["index"], k["pid"], k["state"]) for k in ds.running_kdamonds()] == before
    assert ds.nr_kdamonds() == n


@root
@needs_bcc
def test_damon_paddr_attach_reads_real_results_and_detaches():
    """Read-only attach to the running kdamond through damon:damon_aggregated + BPF."""
    running = [k for k in ds.running_kdamonds() if k["operations"] == "paddr"]
    if not running:
        pytest.skip("no running paddr kdamond to attach to")
    k = running[0]
    ctx = f"{ds.KDAMONDS}/{k['index']}/contexts/0"
    aggr = int(open(ctx + "/monitoring_attrs/intervals/aggr_us").read()) / 1e6
    sample = int(open(ctx + "/monitoring_attrs/intervals/sample_us").read()) / 1e6
    if aggr > 6:
        pytest.skip(f"kdamond {k['index']} aggregates every {aggr} s: too slow for a test")
    regions = []
    t = f"{ctx}/targets/0/regions"
    for i in range(int(open(t + "/nr_regions").read())):
        regions.append((int(open(f"{t}/{i}/start").read()), int(open(f"{t}/{i}/end").read())))
    s = DamonSampler(attach=k["index"])
    with s:
        s.start(Target())
        ids = s.prog_ids()
        assert ids and all(prog_loaded(i) for i in ids)
        deadline = time.monotonic() + 2.5 * aggr + 1
        spans = s.read_spans()
        got = len(spans)
        while time.monotonic() < deadline and got == 0:
            time.sleep(0.5)
            spans = s.read_spans()
            got = len(spans)
    assert got > 0, "no damon_aggregated events within 2.5 aggregation intervals"
    assert spans.space == "paddr" and (spans.pid == 0).all()
    lo = min(r[0] for r in regions) if regions else 0
    hi = max(r[1] for r in regions) if regions else 1 << 64
    assert (spans.addr >= lo).all() and (spans.addr + spans.length <= hi).all()
    assert (spans.weight <= aggr / sample + 1e-6).all()
    assert not any(prog_loaded(i) for i in ids), "BPF program left loaded after stop()"
    assert [x["pid"] for x in ds.running_kdamonds() if x["index"] == k["index"]] == [k["pid"]]


# --- eBPF ----------------------------------------------------------------------------------

@root
@needs_bcc
def test_ebpf_counts_first_touch_faults_and_cleans_up(hot_binary):
    p, base, size = _spawn(hot_binary, size_mb=16, seconds=1, wait=True)
    s = FaultSampler()
    try:
        s.start(Target([p.pid]))
        ids = s.prog_ids()
        assert ids and all(prog_loaded(i) for i in ids)
        _go(p)
        b = s.read()
    finally:
        s.stop()
        p.kill()
        p.wait()
    assert b.sub_page and b.space == "vaddr"
    inside = (b.addr >= base) & (b.addr < base + size)
    pages = np.unique(b.pages()[inside])
    assert pages.size == size // 4096, "every first touch of the mapping is one fault"
    assert (b.pid[inside] == p.pid).all()
    assert not any(prog_loaded(i) for i in ids), "BPF program left loaded after stop()"
    assert s.cpu_seconds() > 0


@root
@needs_bcc
def test_ebpf_target_exit_while_sampled(hot_binary, tmp_path):
    """The target exits mid-record: batches so far are kept, the reason recorded, and no
    BPF program is left."""
    from tiermem.record import record
    p, _, _ = _spawn(hot_binary, size_mb=8, seconds=3, wait=True)
    s = FaultSampler()
    seen = []
    _go(p)
    rec = record(s, Target([p.pid]), 10.0, 0.2, lambda *a: seen.extend(s.prog_ids()))
    p.wait()
    assert "exited" in rec.meta.get("ended_early", "")
    assert rec.nr_batches >= 1 and rec.meta["duration_s"] < 5
    assert seen and not any(prog_loaded(i) for i in set(seen))


def test_hw_mem_sampler_says_not_available_here():
    ok, why = MemSampler.available()
    if ok:
        pytest.skip("this machine has a hardware PMU with data-address sampling")
    assert "not available on this machine" in why or "bcc" in why
    with pytest.raises(TiermemError, match="not available"):
        MemSampler().start(Target([os.getpid()]))


# --- pagemap / idle --------------------------------------------------------------------------

@root
def test_pagemap_present_counts_the_mapping(hot_binary):
    p, base, size = _spawn(hot_binary, size_mb=16, seconds=2, wait=True)
    try:
        _go(p)
        for scan in (True, False):
            s = PagemapSampler("present", use_scan=scan)
            with s:
                s.start(Target([p.pid]))
                b = s.read()
            inside = (b.addr >= base) & (b.addr < base + size)
            assert int(inside.sum()) == size // 4096, f"use_scan={scan}"
    finally:
        p.kill()
        p.wait()


def test_pagemap_soft_dirty_missing_is_precise():
    from tiermem.samplers.pagemap import _probe_soft_dirty
    ok, why = _probe_soft_dirty()
    if ok:
        pytest.skip("this kernel has soft-dirty (tested in the VM)")
    with pytest.raises(TiermemError, match="CONFIG_MEM_SOFT_DIRTY"):
        PagemapSampler("soft-dirty").start(Target([os.getpid()]))


def test_idle_missing_is_precise():
    ok, why = IdleSampler.available()
    if ok:
        pytest.skip("this kernel has idle page tracking")
    assert "CONFIG_IDLE_PAGE_TRACKING" in why and "/sys/kernel/mm/page_idle/bitmap" in why
    with pytest.raises(TiermemError, match="CONFIG_IDLE_PAGE_TRACKING"):
        IdleSampler().start(Target([os.getpid()]))


@pytest.mark.parametrize("name", ["ebpf", "pagemap"])
def test_unknown_pid_is_refused(name):
    s = FaultSampler() if name == "ebpf" else PagemapSampler("present")
    ok, why = s.available()
    if not ok:
        pytest.skip(why)
    with pytest.raises(TiermemError, match="no process with pid 999999"):
        s.start(Target([999999]))


@root
@needs_bcc
def test_ebpf_delay_weights_need_kprobes(hot_binary):
    """Hint-fault delay weights need kprobes on change_prot_numa: where the kernel has none
    (this host), 'delay' is one precise error and 'auto' falls back to counts, saying why."""
    from tiermem.samplers.ebpf import hint_delay_available
    ok, why = hint_delay_available()
    if ok:
        pytest.skip("this kernel has kprobes and NUMA balancing (tested in the VM tests)")
    p, _, _ = _spawn(hot_binary, size_mb=4, seconds=5)
    try:
        with pytest.raises(TiermemError) as ei:
            FaultSampler("delay").start(Target([p.pid]))
        assert str(ei.value) == f"eBPF delay weights not available: {why}"
        with FaultSampler() as s:
            s.start(Target([p.pid]))
            ids = s.prog_ids()
            m = s.metadata()
        assert m["weights"] == "fault count" and m["weights_note"] == why
        assert not any(prog_loaded(i) for i in ids)
    finally:
        p.kill()
        p.wait()
    with pytest.raises(TiermemError, match="eBPF weights must be one of auto, delay, count"):
        FaultSampler("often")


def test_list_samplers_names_the_result_modes():
    """--list-samplers says whether DAMON results can come from the tracepoint and whether
    hint faults can be delay-weighted, with the reason when not."""
    import json
    r = subprocess.run([sys.executable, "-m", "tiermem.cli", "record", "--list-samplers",
                        "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    modes = json.loads(r.stdout)["modes"]
    assert set(modes) == {"damon results from damon_aggregated + BPF",
                          "ebpf hint-fault delay weights (kprobes)"}
    for m in modes.values():
        assert m["available"] or m["reason"], m


def test_ebpf_maps_sized_to_the_target():
    """The eBPF maps hold one entry per page of the target's writable memory (mapped but
    untouched counts: a sampler starts before its target faults), within floor and cap."""
    import mmap
    from tiermem.samplers.ebpf import map_size
    before = map_size([os.getpid()], 16, 1 << 24)
    m = mmap.mmap(-1, 256 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        after = map_size([os.getpid()], 16, 1 << 24)
        assert after - before >= (256 << 20) // 4096          # 65536 more pages
        assert map_size([os.getpid()], 16, 4096) == 4096      # capped
        assert map_size([os.getpid()], 1 << 23, 1 << 24) == 1 << 23   # floored
    finally:
        m.close()


@root
@needs_bcc
def test_damon_prewarmed_program_is_reused_and_released():
    """tiermemd prewarms DAMON's aggregation program (a clang compile: tens of seconds
    under TCG, the whole start-up delay of a new target before): a sampler takes the loaded
    program, gives it back with zeroed maps on stop, the next takes the same one; release()
    unloads it."""
    from tiermem.samplers import damon as dm
    running = [k for k in ds.running_kdamonds() if k["operations"] == "paddr"]
    if not running:
        pytest.skip("no running paddr kdamond to attach to")
    try:
        assert DamonSampler.prewarm() is True
        assert dm.pooled() == 1
        assert DamonSampler.prewarm() is False          # one is pooled already
        ids = []
        for _ in range(2):
            s = DamonSampler(attach=running[0]["index"])
            with s:
                s.start(Target())
                assert dm.pooled() == 0
                ids.append(s.prog_ids())
                assert ids[-1] and all(prog_loaded(i) for i in ids[-1])
            assert dm.pooled() == 1 and all(prog_loaded(i) for i in ids[-1])
            b = dm._POOL[0]
            import ctypes as ct
            assert b[b"kdpid"][ct.c_int(0)].value == 0 and len(b[b"regions"].items()) == 0
        assert ids[0] == ids[1]                         # the same program, not a new compile
    finally:
        DamonSampler.release()
    assert dm.pooled() == 0 and not any(prog_loaded(i) for i in ids[0])

"""Samplers inside the emulated CXL machine (Debian 6.12 kernel: DAMON vaddr+paddr,
soft-dirty, NUMA balancing): the sampler_hot workload's hot region (1 of 8) must come out on
top, and stopping must leave no kdamond and no BPF program behind."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
CHECK = os.path.join(ROOT, "emulation/workloads/sampler_hotcheck.py")

pytestmark = pytest.mark.vm

# numpy's AVX2 (x86-64-v3) argsort of 64-bit integers returns wrong orders under QEMU TCG's
# AVX2 emulation (np.unique(..., return_inverse=True) then keeps duplicates); run numpy in
# the guest on its baseline code paths.
NUMPY_TCG = ["env", "NPY_DISABLE_CPU_FEATURES=X86_V3"]


@pytest.fixture(scope="module")
def hot_binary(cxl_vm):
    out = os.path.join(cxl_vm.workdir, "sampler_hot")
    subprocess.run(["gcc", "-O2", "-pthread", "-o", out,
                    os.path.join(ROOT, "emulation/workloads/sampler_hot.c")], check=True)
    return out


def _check(vm, binary, sampler, *extra, timeout=300):
    r = vm.run([*NUMPY_TCG, PY, CHECK, "--binary", binary, "--sampler", sampler, *extra],
               timeout=timeout)
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def _msg(res):
    return json.dumps({k: v for k, v in res.items() if k != "sampler_meta"})


def _no_leftovers(res):
    assert res["kdamonds_after"] == res["kdamonds_before"], res
    assert res["bpf_progs_left"] == [], res


# DAMON sees an access when a cleared accessed bit is set again, which takes a TLB miss;
# TCG's software TLB can hold the whole hot region, so the workload flushes its TLB every
# pass as a real CPU's small TLB would (without: 2 of 10 runs failed, see sampler_hot.c).
def test_damon_vaddr_finds_hot_region(cxl_vm, hot_binary):
    res = _check(cxl_vm, hot_binary, "damon", "--seconds", "4", "--interval", "0.2",
                 "--sample-us", "10000", "--aggr-us", "200000", "--pass-us", "10000",
                 "--tlb-flush")
    assert res["batches"] >= 3, _msg(res)
    assert res["top_inside_hot"], _msg(res)
    # 4 s under TCG: recall was 0.66-1.0 across full-suite runs (the 0.8 goal is the 10 s
    # benchmark's figure); 0.5 is 4x the 1/8 that a sampler blind to the hot range gives
    assert res["recall"] >= 0.5, _msg(res)
    # bcc and the damon_aggregated tracepoint are there: results come through BPF
    assert res["sampler_meta"]["results"] == "damon:damon_aggregated (BPF)", res["sampler_meta"]
    _no_leftovers(res)


def test_damon_paddr_sees_hot_pages(cxl_vm, hot_binary):
    res = _check(cxl_vm, hot_binary, "damon-paddr", "--seconds", "4", "--interval", "0.2",
                 "--sample-us", "10000", "--aggr-us", "200000", "--pass-us", "10000",
                 "--min-regions", "100", "--max-regions", "400", "--tlb-flush")
    # Results come from the damon_aggregated tracepoint: a read is one BPF map drain, so
    # CPU starvation of the reader no longer costs batches (a tried-regions snapshot of a
    # whole node took seconds of sysfs reads under TCG, and the test once saw too few).
    assert res["sampler_meta"]["results"] == "damon:damon_aggregated (BPF)", res["sampler_meta"]
    assert res["batches"] >= 10, _msg(res)
    assert res["pages_seen"] > 0, _msg(res)
    # physical pages of the hot region are scattered among other memory: DAMON's regions
    # mix them with cold pages, so ask for better than the 1/8 base rate (vaddr and
    # soft-dirty reach 0.99, see docs), and for the hot pages' mean weight to be above the
    # cold pages' (the weights, not only the top-k cut).
    assert res["precision"] > 0.125, _msg(res)
    assert res["mean_score_hot"] > res["mean_score_cold"], _msg(res)
    _no_leftovers(res)


def test_pagemap_soft_dirty_finds_hot_region(cxl_vm, hot_binary):
    res = _check(cxl_vm, hot_binary, "pagemap", "--seconds", "3", "--interval", "0.05",
                 "--pass-us", "100000", "--cold-ppm", "20000")
    assert res["top_inside_hot"], _msg(res)
    assert res["recall"] >= 0.8, _msg(res)
    _no_leftovers(res)


NB = "/sys/kernel/debug/sched/numa_balancing"


def test_ebpf_hint_faults_find_hot_region(cxl_vm, hot_binary):
    # NUMA balancing on, with a short scan period, so the kernel's hinting faults sample
    # accesses; restored afterwards.
    saved = cxl_vm.run(f"cat /proc/sys/kernel/numa_balancing {NB}/scan_period_min_ms "
                       f"{NB}/scan_period_max_ms {NB}/scan_delay_ms", timeout=30)
    assert saved.returncode == 0, saved.stderr
    old = saved.stdout.split()
    # scan_delay_ms 1000: 6.x forgets which VMAs a task used every 4 x scan_delay_ms.
    cxl_vm.run(f"echo 1 > /proc/sys/kernel/numa_balancing; echo 100 > {NB}/scan_period_min_ms;"
               f" echo 200 > {NB}/scan_period_max_ms; echo 1000 > {NB}/scan_delay_ms",
               timeout=30, check=True)
    try:
        # Hint faults say "touched since the last NUMA scan": a page touched at least once
        # per scan window faults once per window however often it is touched, so they can
        # rank hot above cold only when cold pages go untouched for a window. Here cold
        # pages are not touched after the warm-up (cold-ppm 0); see docs/sampling.md. The
        # workload is busy (pass-us 0): the scan window is counted in its CPU time.
        res = _check(cxl_vm, hot_binary, "ebpf", "--seconds", "8", "--interval", "0.5",
                     "--pass-us", "0", "--cold-ppm", "0", "--warmup", "1")
    finally:
        cxl_vm.run(f"echo {old[0]} > /proc/sys/kernel/numa_balancing; "
                   f"echo {old[1]} > {NB}/scan_period_min_ms; "
                   f"echo {old[2]} > {NB}/scan_period_max_ms; echo {old[3]} > {NB}/scan_delay_ms",
                   timeout=30)
    assert res["sampler_meta"]["numa_balancing"] == "1"
    # the guest kernel has kprobes: faults weighted by their delay after the NUMA scan
    assert res["sampler_meta"]["weights"].startswith("hint-fault delay"), res["sampler_meta"]
    assert res["pages_seen"] > 0, _msg(res)
    assert res["recall"] >= 0.8, _msg(res)
    assert res["bpf_prog_ids"], res
    _no_leftovers(res)


def test_damon_target_exit_leaves_nothing(cxl_vm, hot_binary):
    """The target exits while DAMON vaddr samples it: the record keeps what was read, the
    CLI exits non-zero with one line, and no kdamond is left. (Snapshot results here: the
    other DAMON tests cover the tracepoint path.)"""
    out = os.path.join(cxl_vm.workdir, "exit.rec")
    r = cxl_vm.run(f"{hot_binary} 16 8 3 25 >/dev/null & sleep 0.3; "
                   f"{PY} -m tiermem.cli record $! -s damon --damon-results snapshot "
                   f"-d 60 -i 0.2 -o {out}; "
                   f"echo rc=$?; cat /sys/kernel/mm/damon/admin/kdamonds/nr_kdamonds",
                   timeout=120)
    lines = r.stdout.strip().splitlines()
    assert "rc=1" in lines, r.stdout + r.stderr
    assert lines[-1] == "0", "kdamond directories left behind: " + r.stdout
    err = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("tiermem:")]
    assert len(err) == 1 and ("exited" in err[0] or "stopped" in err[0]), r.stderr
    assert os.path.exists(out)
    from tiermem import record
    rec = record.load(out)
    assert rec.nr_batches >= 1 and "ended_early" in rec.meta


def test_damon_stale_kdamond_refused_then_forced(cxl_vm):
    """A kdamond left running by a 'crashed' run is named and refused; --force takes over."""
    script = r"""
import json, os, subprocess, sys, time
from tiermem import damon_sysfs as ds
from tiermem.errors import TiermemError
cfg = ds.DamonConfig(ops="vaddr", pids=[os.getpid()])
k = ds.Kdamond(cfg); k.start()
# simulate a crash: forget it, pretend the owner is a dead pid
st = ds._read_state(); st["owner_pid"] = 999999; ds._write_state(st)
out = {}
try:
    ds.Kdamond(ds.DamonConfig(ops="vaddr", pids=[os.getpid()])).start()
    out["refused"] = ""
except TiermemError as e:
    out["refused"] = str(e)
k2 = ds.Kdamond(ds.DamonConfig(ops="vaddr", pids=[os.getpid()]), force=True)
k2.start(); out["forced_running"] = k2.running; k2.stop()
out["left"] = ds.nr_kdamonds(); out["running"] = ds.running_kdamonds()
print(json.dumps(out))
"""
    r = cxl_vm.run([PY, "-c", script], timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "kdamond 0" in out["refused"] and "stale" in out["refused"], out
    assert "--force" in out["refused"]
    assert out["forced_running"] and out["running"] == [], out


def test_damon_intervals_out_of_range(cxl_vm):
    r = cxl_vm.run([PY, "-m", "tiermem.cli", "record", "1", "-s", "damon", "--sample-us", "5",
                    "-d", "1", "-o", os.path.join(cxl_vm.workdir, "x.rec")], timeout=60)
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "sampling interval 5 us out of range" in err[0], r.stderr
    assert not os.path.exists(os.path.join(cxl_vm.workdir, "x.rec"))


def test_damon_silent_kdamond_is_an_error(cxl_vm):
    """The sampler's kdamond pid is a real kdamond thread, and a kdamond whose
    damon_aggregated events stop reaching the reader (here: the BPF filter pointed at
    another pid) is an error after the patience, not a quiet "nothing was accessed"."""
    script = r"""
import ctypes as ct, json, os, time
from tiermem.errors import TiermemError
from tiermem.samplers.base import Target
from tiermem.samplers.damon import DamonSampler
s = DamonSampler(5000, 100000, results="tracepoint")
s.start(Target(pids=[os.getpid()]))
out = {"comm": open(f"/proc/{s.kdamond_pid()}/comm").read().strip()}
buf = bytearray(64 << 20)
t = time.monotonic()
while time.monotonic() - t < 1.0:                    # accesses for DAMON to see
    buf[::4096] = b"x" * len(buf[::4096])
out["first"] = len(s.read_spans())
s.bpf[b"kdpid"][ct.c_int(0)] = ct.c_uint32(1)       # listen to init instead
s.read_spans()                                       # drain what came before
s._agg_patience = lambda: 1.0
time.sleep(1.5)
try:
    s.read_spans()
    out["error"] = ""
except TiermemError as e:
    out["error"] = str(e)
s.stop()
out["meta_pid"] = s.metadata()["kdamond_pid"]
print(json.dumps(out))
"""
    r = cxl_vm.run([*NUMPY_TCG, PY, "-c", script], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["comm"].startswith("kdamond"), out
    assert out["first"] > 0, out
    assert "delivered no damon_aggregated events" in out["error"], out
    assert out["meta_pid"] > 0, out

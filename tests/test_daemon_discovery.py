"""tiermemd's process discovery against real processes: identity (start time, exe), kernel
threads and zombies never targets, command lines, cgroup-free resolution."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from tiermemd import discovery


def test_identity_of_a_live_process_and_its_exec():
    p = subprocess.Popen(["sh", "-c", "read x; exec sleep 600"], stdin=subprocess.PIPE)
    try:
        ident = discovery.proc_identity(p.pid)
        assert ident is not None and ident[1] == os.path.realpath(psutil.Process(p.pid).exe())
        p.stdin.write(b"\n")
        p.stdin.flush()
        while discovery.proc_identity(p.pid)[1] == ident[1]:   # until the exec happened
            time.sleep(0.02)
        after = discovery.proc_identity(p.pid)
        assert after[0] == ident[0]                   # same process: same start time
        assert after[1].endswith("sleep")
        assert discovery.cmdline(p.pid) == "sleep 600"
    finally:
        p.kill()
        p.wait()
    assert discovery.proc_identity(p.pid) is None and discovery.cmdline(p.pid) == ""


def test_kernel_threads_and_zombies_are_never_targets():
    assert discovery.proc_identity(2) is None                     # kthreadd
    z = subprocess.Popen(["true"])
    try:
        while psutil.Process(z.pid).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.02)
        assert discovery.proc_identity(z.pid) is None
    finally:
        z.wait()


def test_start_time_is_the_kernels_not_the_wall_clocks():
    """The identity's start time is /proc/PID/stat's clock ticks (psutil's create_time
    moves with the wall clock's boot time): stable across calls and equal to the kernel's."""
    with open(f"/proc/{os.getpid()}/stat") as f:
        ticks = int(f.read().rpartition(")")[2].split()[19])
    assert discovery.proc_identity(os.getpid()) == (ticks, os.path.realpath(sys.executable))


def test_resolve_by_cmdline_and_pids():
    class T:
        pids = []
        cmdline = "sleep 6[0-9]{2}1$"
        cgroup = None

        @property
        def cmdline_re(self):
            import re
            return re.compile(self.cmdline)

    p = subprocess.Popen(["sleep", "6001"])
    try:
        cache = discovery.CmdlineCache()
        assert discovery.resolve(T(), set(), cache) == {p.pid}
        assert discovery.resolve(T(), {p.pid}, cache) == set()
        t = T()
        t.cmdline, t.pids = None, [p.pid, 2]                       # kthreadd is dropped
        assert discovery.resolve(t, set()) == {p.pid}
    finally:
        p.kill()
        p.wait()

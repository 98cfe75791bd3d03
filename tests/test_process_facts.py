"""Process facts the library takes from psutil (record.process_alive,
damon_sysfs.thread_cpu_seconds), checked on real processes: a zombie is gone, CPU time of a
busy process grows, a vanished pid gives 0."""
from __future__ import annotations

import subprocess
import sys
import time

from tiermem.damon_sysfs import thread_cpu_seconds
from tiermem.record import process_alive


def test_process_alive_and_zombie():
    p = subprocess.Popen(["sleep", "60"])
    try:
        assert process_alive(p.pid)
    finally:
        p.kill()
    end = time.monotonic() + 30              # killed but not reaped: a zombie, 'gone'
    while process_alive(p.pid):
        assert time.monotonic() < end, "the killed child never showed as gone"
        time.sleep(0.05)
    p.wait()
    assert not process_alive(p.pid)


def test_thread_cpu_seconds_of_a_busy_process():
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        end = time.monotonic() + 60
        while thread_cpu_seconds(p.pid) < 0.05:
            assert time.monotonic() < end, "no CPU time seen for a busy loop"
            time.sleep(0.05)
    finally:
        p.kill()
        p.wait()
    assert thread_cpu_seconds(p.pid) == 0.0  # reaped: gone

"""Which processes a target covers right now: fixed PIDs, command-line patterns, cgroup v2.

Called every loop, so processes that start later and match are picked up. A process is
identified by (pid, start time): a reused PID is a new process. Kernel threads, zombies
and tiermemd itself are never targets.
"""
from __future__ import annotations

import os

import psutil

from tiermem import kfs

PF_KTHREAD = 0x00200000


def proc_identity(pid: int) -> tuple[int, str] | None:
    """(start time in clock ticks since boot, exe path) of a live user process, None if
    gone, a kernel thread or a zombie. exe changes on execve, start time on PID reuse.

    psutil gives the status and the exe. Two facts come from /proc/PID/stat, which psutil
    lacks: the task flags (PF_KTHREAD) and the start time as the kernel keeps it (psutil's
    create_time adds the boot time of the wall clock, which moves when the clock is set, and
    would read as a reused PID)."""
    try:
        p = psutil.Process(pid)
        if p.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return None
        exe = p.exe()
    except psutil.Error:
        return None
    rest = kfs.read(f"/proc/{pid}/stat", "").rpartition(")")[2].split()
    # fields after comm: state(0) ppid(1) ... flags(6) ... starttime(19)
    if not exe or len(rest) < 20 or int(rest[6]) & PF_KTHREAD:
        return None
    return int(rest[19]), exe


def cmdline(pid: int) -> str:
    """The arguments of pid joined by spaces ("" if gone or unreadable)."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def all_pids() -> list[int]:
    return psutil.pids()


def cgroup_pids(path: str) -> list[int]:
    """Processes of a cgroup v2 directory and of every cgroup below it."""
    out = []
    for d, _dirs, files in os.walk(kfs.path(path)):
        if "cgroup.procs" in files:
            try:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    out.extend(int(x) for x in f.read().split())
            except OSError:
                continue
    return out


class CmdlineCache:
    """Command lines of the processes seen, so a loop reads only those of new PIDs;
    ``refresh()`` forgets them all (a process may exec into a matching command line)."""

    def __init__(self):
        self.lines: dict[int, str] = {}

    def refresh(self) -> None:
        self.lines.clear()

    def current(self) -> dict[int, str]:
        live = all_pids()
        lines = {p: self.lines[p] if p in self.lines else cmdline(p) for p in live}
        self.lines = lines
        return lines


def resolve(target, exclude: set[int], cache: CmdlineCache | None = None) -> set[int]:
    """PIDs of live user processes the target selects now (pids + cmdline + cgroup)."""
    pids: set[int] = set(target.pids)
    if target.cmdline:
        rx = target.cmdline_re
        lines = cache.current() if cache is not None else {p: cmdline(p) for p in all_pids()}
        for p, line in lines.items():
            if p not in exclude and rx.search(line):
                pids.add(p)
    if target.cgroup:
        pids.update(cgroup_pids(target.cgroup))
    return {p for p in pids - exclude if proc_identity(p) is not None}

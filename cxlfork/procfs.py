"""What /proc says about a process that psutil does not: mappings with smaps flags, status
fields (signal masks, umask, credentials), stat fields (mm layout), fds with fdinfo, auxv,
timers, rlimits (/proc/PID/limits: psutil's prlimit() needs CAP_SYS_RESOURCE for a process
of another uid, which root may lack, while the file is world-readable). (Children, threads
and process status come from psutil.)

Read-only and side-effect free; called while the process is frozen by ptrace.
"""
from __future__ import annotations

import os
import re
import resource

from cxlfork.errors import CxlforkError

_MAP_RE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) ([0-9a-f]+:[0-9a-f]+) (\d+)"
                     r"\s*(.*)$")

RLIMITS = {name[7:].lower(): getattr(resource, name) for name in dir(resource)
           if name.startswith("RLIMIT_")}


def _read(pid: int, name: str, binary: bool = False):
    try:
        with open(f"/proc/{pid}/{name}", "rb" if binary else "r") as f:
            return f.read()
    except FileNotFoundError as e:
        raise CxlforkError(f"process {pid} exited (/proc/{pid}/{name} is gone)") from e
    except PermissionError as e:
        raise CxlforkError(f"cannot read /proc/{pid}/{name}: permission denied") from e
    except ProcessLookupError as e:
        raise CxlforkError(f"process {pid} exited while being read") from e


def read_text(pid: int, name: str) -> str:
    """/proc/PID/NAME as text (a clear error if the process is gone or not ours)."""
    return _read(pid, name)


def smaps(pid: int) -> list[dict]:
    """Every mapping: start, end, perms, pgoff, dev, inode, path, vmflags (set), rss_kb."""
    out: list[dict] = []
    cur = None
    for line in _read(pid, "smaps").splitlines():
        m = _MAP_RE.match(line)
        if m:
            cur = {"start": int(m[1], 16), "end": int(m[2], 16), "perms": m[3],
                   "pgoff": int(m[4], 16)  # bytes, as /proc shows it
                  , "dev": m[5], "inode": int(m[6]), "path": m[7],
                   "vmflags": set(), "rss_kb": 0, "anon_huge_kb": 0}
            out.append(cur)
        elif cur is not None:
            key, _, val = line.partition(":")
            if key == "VmFlags":
                cur["vmflags"] = set(val.split())
            elif key == "Rss":
                cur["rss_kb"] = int(val.split()[0])
            elif key == "AnonHugePages":
                cur["anon_huge_kb"] = int(val.split()[0])
    return out


def maps(pid: int) -> list[dict]:
    """Every mapping from /proc/PID/maps: start, end, perms, path (no page-table walk, as
    smaps makes)."""
    out = []
    for line in _read(pid, "maps").splitlines():
        m = _MAP_RE.match(line)
        if m:
            out.append({"start": int(m[1], 16), "end": int(m[2], 16), "perms": m[3],
                        "path": m[7]})
    return out


def children(pid: int) -> list[int]:
    """PIDs of PID's children (of any of its threads), from /proc/PID/task/*/children: no
    scan of every process's stat, as a parent-PID map takes. []: PID is gone."""
    out: set[int] = set()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return []
    for t in tids:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out.update(int(x) for x in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return sorted(out)


def status(pid: int) -> dict[str, str]:
    out = {}
    for line in _read(pid, "status").splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat, 1-based as in proc(5): stat(pid)[n] is field n."""
    s = _read(pid, "stat")
    lp, rp = s.index("("), s.rindex(")")
    return [None, s[:lp].strip(), s[lp + 1:rp]] + s[rp + 2:].split()


def fds(pid: int) -> list[dict]:
    """Open fds: fd, link (readlink of /proc/PID/fd/N), fdinfo (pos, flags, other keys)."""
    out = []
    try:
        names = sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError as e:
        raise CxlforkError(f"process {pid} exited") from e
    for n in names:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{n}")
            info = {}
            with open(f"/proc/{pid}/fdinfo/{n}") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    info[k.strip()] = v.strip()
        except FileNotFoundError:
            continue
        out.append({"fd": n, "link": link, "pos": int(info.get("pos", "0")),
                    "flags": int(info.get("flags", "0"), 8), "info": info})
    return out


# /proc/PID/limits rows, in the kernel's order (the resource number), by their label
LIMIT_LABELS = ("Max cpu time", "Max file size", "Max data size", "Max stack size",
                "Max core file size", "Max resident set", "Max processes", "Max open files",
                "Max locked memory", "Max address space", "Max file locks",
                "Max pending signals", "Max msgqueue size", "Max nice priority",
                "Max realtime priority", "Max realtime timeout")


def limits(pid: int) -> dict[int, tuple[int, int]]:
    """{resource number: (soft, hard)} from /proc/PID/limits (unlimited: RLIM_INFINITY)."""
    out = {}
    for line in _read(pid, "limits").splitlines()[1:]:
        label = line[:26].strip()
        if label not in LIMIT_LABELS:
            raise CxlforkError(f"/proc/{pid}/limits: unknown row {label!r}")
        vals = line[26:].split()
        try:
            soft, hard = (resource.RLIM_INFINITY if x == "unlimited" else int(x)
                          for x in vals[:2])
        except ValueError:
            raise CxlforkError(f"/proc/{pid}/limits: cannot read row {line!r}") from None
        out[LIMIT_LABELS.index(label)] = (soft, hard)
    return out


def auxv(pid: int) -> bytes:
    return _read(pid, "auxv", binary=True)

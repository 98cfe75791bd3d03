"""The porter's memory cgroup: the kernel enforces `local_memory_limit_mib` on the instances.

Layout (at the root of the memory hierarchy, so that a porter's cgroup is found again after
a crash whatever cgroup the next porter runs in):

    <root>/cxlfork-porter/<porter pid>.<its start time>/      the limit (all functions)
    <root>/cxlfork-porter/<porter pid>.<its start time>/fn-<NAME>/   one child per function

One limit for all functions, because the config's limit is the porter's total; one child per
function, without a limit of its own, so that the porter reads each function's usage and
knows whose instance the kernel OOM-killed. The porter itself is not in the cgroup: the page
store pages it writes at checkpoint are charged to the porter's own cgroup (see
docs/porter.md, "Memory cgroup").

cgroup v2 (`memory.max`, `memory.current`, `memory.stat`, `memory.events`) is preferred when
a cgroup2 mount has the memory controller; else cgroup v1 (`memory.limit_in_bytes`,
`memory.usage_in_bytes`, `memory.stat`, `memory.oom_control`). Swap is limited to nothing
where the kernel has the knob, so the limit is on memory, not memory + swap.
"""
from __future__ import annotations

import errno
import os
import signal
import time

from tiermem.errors import TiermemError

TOP = "cxlfork-porter"


class CgroupError(TiermemError):
    """No writable memory cgroup, or a cgroup operation failed."""


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks), None if PID is gone."""
    try:
        return _read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def find_hierarchies() -> dict[int, str]:
    """{2: mount point} of a cgroup2 mount with the memory controller and {1: mount point}
    of a cgroup v1 memory mount, from /proc/self/mountinfo."""
    found: dict[int, str] = {}
    for line in _read("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        mnt, fstype, opts = fields[4], rfields[0], rfields[2].split(",")
        if fstype == "cgroup2" and 2 not in found:
            try:
                if "memory" in _read(os.path.join(mnt, "cgroup.controllers")).split():
                    found[2] = mnt
            except OSError:
                pass
        elif fstype == "cgroup" and "memory" in opts and 1 not in found:
            found[1] = mnt
    return found


class MemoryCgroup:
    """The porter's cgroup with the limit, and its per-function children."""

    def __init__(self, version: int, mount: str, limit: int, log=None):
        self.version, self.mount, self.limit = version, mount, limit
        self.log = log or (lambda msg: None)
        me = os.getpid()
        self.top = os.path.join(mount, TOP)
        self.path = os.path.join(self.top, f"{me}.{_start_time(me)}")
        self.functions: dict[str, str] = {}
        self._procs_fds: dict[str, int] = {}

    # -- creation ------------------------------------------------------------------------
    @classmethod
    def create(cls, limit: int, log=None) -> "MemoryCgroup":
        """Detect the hierarchy, remove leftovers of dead porters, make this porter's
        cgroup with the limit. One CgroupError naming every reason when none is usable."""
        found = find_hierarchies()
        if not found:
            raise CgroupError("local_memory_limit_mib needs a memory cgroup, and this host "
                              "mounts none (no cgroup2 mount with the memory controller, no "
                              "cgroup v1 memory mount in /proc/self/mountinfo)")
        why = []
        for version in (2, 1):
            if version not in found:
                continue
            cg = cls(version, found[version], limit, log)
            try:
                cg._make()
                return cg
            except OSError as e:
                cg.remove()
                why.append(f"cgroup v{version} at {found[version]}: {e.strerror} "
                           f"({e.filename})")
        raise CgroupError("local_memory_limit_mib needs a writable memory cgroup (run the "
                          "porter as root): " + "; ".join(why))

    def _file(self, name: str, d: str | None = None) -> str:
        return os.path.join(d or self.path, name)

    def _make(self) -> None:
        if self.version == 2:
            ctl = _read(os.path.join(self.mount, "cgroup.subtree_control")).split()
            if "memory" not in ctl:
                _write(os.path.join(self.mount, "cgroup.subtree_control"), "+memory")
        os.makedirs(self.top, exist_ok=True)
        self.clean_leftovers()
        try:
            os.mkdir(self.path)
        except FileNotFoundError:          # the last other porter removed the empty top
            os.makedirs(self.path)
        if self.version == 2:
            for d in (self.top, self.path):
                if "memory" not in _read(self._file("cgroup.subtree_control", d)).split():
                    _write(self._file("cgroup.subtree_control", d), "+memory")
            _write(self._file("memory.max"), str(self.limit))
            if os.path.exists(self._file("memory.swap.max")):
                _write(self._file("memory.swap.max"), "0")
        else:
            _write(self._file("memory.limit_in_bytes"), str(self.limit))
            if os.path.exists(self._file("memory.memsw.limit_in_bytes")):
                _write(self._file("memory.memsw.limit_in_bytes"), str(self.limit))

    def add_function(self, name: str) -> str:
        """Make (idempotently) the function's child cgroup; its path."""
        if name in self.functions:
            return self.functions[name]
        d = os.path.join(self.path, f"fn-{name}")
        try:
            os.mkdir(d)
            self._procs_fds[name] = os.open(os.path.join(d, "cgroup.procs"),
                                            os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            raise CgroupError(f"making the memory cgroup of function {name} ({d}): "
                              f"{e.strerror}") from e
        self.functions[name] = d
        return d

    # -- membership ----------------------------------------------------------------------
    def procs_fd(self, name: str) -> int:
        """An open fd on the function's cgroup.procs: writing b"0" to it moves the writer
        (a child between fork and exec uses it, so a cold start is charged from its first
        page)."""
        return self._procs_fds[name]

    def move(self, name: str, pid: int) -> None:
        """Move PID into the function's cgroup (pages it already has stay charged where
        they were: the kernel no longer moves charges)."""
        try:
            os.write(self._procs_fds[name], str(pid).encode())
        except OSError as e:
            raise CgroupError(f"moving PID {pid} into the memory cgroup of function {name}: "
                              f"{e.strerror}") from e

    # -- reading -------------------------------------------------------------------------
    def _stat(self, d: str) -> dict[str, int]:
        out = {}
        for line in _read(self._file("memory.stat", d)).splitlines():
            k, _, v = line.partition(" ")
            if v.isdigit():
                out[k] = int(v)
        return out

    def usage(self, d: str | None = None) -> dict:
        """Usage of the porter's cgroup (or of one function's child d): bytes charged
        (`usage`), of which anonymous, file (page cache, tmpfs included) and shmem, and the
        working set (usage - inactive file: what reclaim cannot take without swap), and the
        OOM kills counted there."""
        d = d or self.path
        st = self._stat(d)
        if self.version == 2:
            usage = int(_read(self._file("memory.current", d)))
            anon, file, shmem, inactive = (st.get("anon", 0), st.get("file", 0),
                                           st.get("shmem", 0), st.get("inactive_file", 0))
            events = dict(line.split() for line in
                          _read(self._file("memory.events", d)).splitlines())
            ooms = int(events.get("oom_kill", 0))
        else:
            usage = int(_read(self._file("memory.usage_in_bytes", d)))
            anon, file, shmem, inactive = (st.get("total_rss", 0), st.get("total_cache", 0),
                                           st.get("total_shmem", 0),
                                           st.get("total_inactive_file", 0))
            ctl = dict(line.split() for line in
                       _read(self._file("memory.oom_control", d)).splitlines())
            ooms = int(ctl.get("oom_kill", 0))
        return {"usage_bytes": usage, "working_set_bytes": max(0, usage - inactive),
                "anon_bytes": anon, "file_bytes": file, "shmem_bytes": shmem,
                "oom_kills": ooms}

    def oom_kills(self, name: str) -> int:
        """OOM kills of the function's instances so far."""
        try:
            return self.usage(self.functions[name])["oom_kills"]
        except (KeyError, OSError, ValueError):
            return 0

    def stats(self) -> dict:
        d = {"version": self.version, "path": self.path, "limit_bytes": self.limit}
        try:
            d.update(self.usage())
            d["functions"] = {n: self.usage(p) for n, p in sorted(self.functions.items())}
            # v1 counts an OOM kill in the victim's cgroup only, v2 in its ancestors too
            d["oom_kills"] = max(d["oom_kills"],
                                 sum(f["oom_kills"] for f in d["functions"].values()))
        except (OSError, ValueError) as e:
            d["error"] = str(e)
        return d

    # -- removal -------------------------------------------------------------------------
    def remove(self) -> None:
        """SIGKILL whatever is left in the cgroup and remove it (children first)."""
        for fd in self._procs_fds.values():
            os.close(fd)
        self._procs_fds.clear()
        _remove_tree(self.path, self.log)
        try:
            os.rmdir(self.top)             # the shared top, when no other porter uses it
        except OSError:
            pass

    def clean_leftovers(self) -> None:
        """Remove the cgroups of porters that are gone (crashed, SIGKILLed)."""
        try:
            names = os.listdir(self.top)
        except OSError:
            return
        for n in names:
            d = os.path.join(self.top, n)
            pid, _, start = n.partition(".")
            if not os.path.isdir(d) or not pid.isdigit():
                continue
            if start and _start_time(int(pid)) == start:
                continue                                  # its porter is alive
            self.log(f"removing the memory cgroup of a porter that is gone: {d}")
            _remove_tree(d, self.log)


def _remove_tree(d: str, log, wait_s: float = 5.0) -> None:
    """Kill the processes of d and its children, wait for them to leave, rmdir bottom-up."""
    if not os.path.isdir(d):
        return
    dirs = [r for r, _, _ in os.walk(d)]
    deadline = time.monotonic() + wait_s
    for sub in reversed(dirs):                             # deepest first
        while True:
            try:
                pids = [int(x) for x in _read(os.path.join(sub, "cgroup.procs")).split()]
            except OSError:
                pids = []
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.rmdir(sub)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    log(f"cannot remove memory cgroup {sub}: {e.strerror}")
                    break
                time.sleep(0.02)

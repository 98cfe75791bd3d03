"""Parsing of /proc/PID/maps and smaps: the VMAs of a process, with their RSS."""
from __future__ import annotations

import re
from dataclasses import dataclass

from tiermem import kfs
from tiermem.errors import TiermemError

_MAPS_RE = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) (\S+) (\d+)\s*(.*)$")


@dataclass
class Vma:
    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str
    rss_kb: int = -1          # from smaps; -1 when not read

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def kind(self) -> str:
        p = self.path
        if p == "[heap]":
            return "heap"
        if p.startswith("[stack"):
            return "stack"
        if p in ("[vdso]", "[vvar]", "[vsyscall]", "[vvar_vclock]", "[uprobes]"):
            return "special"
        if p.startswith("[anon:") or p == "":
            return "anon"
        if p.startswith("/memfd:") or p.startswith("/SYSV") or p.startswith("/dev/shm"):
            return "shmem"
        return "file"

    def label(self) -> str:
        return self.path or "[anon]"


def parse_maps(text: str) -> list[Vma]:
    vmas = []
    for line in text.splitlines():
        m = _MAPS_RE.match(line)
        if not m:
            if line.strip():
                raise TiermemError(f"unexpected line in maps: {line[:80]!r}")
            continue
        vmas.append(Vma(int(m.group(1), 16), int(m.group(2), 16), m.group(3),
                        int(m.group(4), 16), m.group(5), int(m.group(6)), m.group(7)))
    return vmas


def parse_smaps_rss(text: str) -> dict[int, int]:
    """VMA start -> Rss in kB."""
    out, cur = {}, None
    for line in text.splitlines():
        m = _MAPS_RE.match(line)
        if m:
            cur = int(m.group(1), 16)
        elif cur is not None and line.startswith("Rss:"):
            out[cur] = int(line.split()[1])
    return out


def _read_proc(pid: int, name: str) -> str:
    try:
        with open(kfs.path(f"/proc/{pid}/{name}")) as f:
            return f.read()
    except FileNotFoundError:
        raise TiermemError(f"no process with PID {pid}") from None
    except ProcessLookupError:
        raise TiermemError(f"process {pid} exited") from None
    except PermissionError:
        raise TiermemError(f"not allowed to read /proc/{pid}/{name}: run as root "
                           f"or as the process's owner") from None


def read_vmas(pid: int, with_rss: bool = True) -> list[Vma]:
    if pid <= 0:
        raise TiermemError(f"invalid PID {pid}")
    vmas = parse_maps(_read_proc(pid, "maps"))
    if with_rss:
        rss = parse_smaps_rss(_read_proc(pid, "smaps"))
        for v in vmas:
            v.rss_kb = rss.get(v.start, 0)
    return vmas


def process_exists(pid: int) -> bool:
    return kfs.exists(f"/proc/{pid}/stat")


def pid_alive(pid: int) -> bool:
    """True while a process with this PID exists (signal 0; EPERM still means it exists)."""
    import os
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True

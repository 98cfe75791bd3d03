"""Memory of one process, split the way the porter accounts it:

    local   anonymous pages (`Anonymous` of /proc/PID/smaps_rollup): the process's own
            heap/stack pages and the pages it copied on write from the store; these live in
            local DRAM
    shared  resident pages mapped from a cxlfork page-store file (`Rss - Anonymous` of the
            /proc/PID/smaps entries whose path is under the store directory): shared by all
            clones of a checkpoint, they live in the store on the CXL tier

The porter samples its instances 4 times a second, on the same cores as the requests, so the
local figure comes from the rollup and the shared one (once a second, restored instances only)
looks at the store's entries of smaps only, instead of parsing every smaps line in Python
while holding the GIL (`bench/bench_porter.py --sampling-only` times both).
"""
from __future__ import annotations

_GONE = (FileNotFoundError, ProcessLookupError, PermissionError)


def _field(data: bytes, name: bytes, start: int = 0) -> int:
    """The value in bytes of the first `name` line (in kB) at or after start; 0 if none."""
    i = data.find(b"\n" + name, max(start - 1, 0))
    if i < 0:
        return 0
    j = i + len(name) + 1
    return int(data[j:data.index(b"kB", j)]) * 1024


def local_memory(pid: int) -> int:
    """Anonymous bytes of PID; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            return _field(b"\n" + f.read(), b"Anonymous:")
    except _GONE:
        return 0


def store_memory(pid: int, store_dir: str) -> int:
    """Resident, not copied-on-write bytes of PID's mappings of files under store_dir."""
    try:
        with open(f"/proc/{pid}/smaps", "rb") as f:
            data = f.read()
    except _GONE:
        return 0
    key = b" " + store_dir.encode()
    shared = 0
    i = data.find(key)
    while i >= 0:
        end = data.find(b"\n", i)
        shared += _field(data, b"Rss:", end) - _field(data, b"Anonymous:", end)
        i = data.find(key, end)
    return shared


def process_memory(pid: int, store_dir: str | None) -> tuple[int, int]:
    """(local bytes, shared store bytes) of PID; (0, 0) when it is gone."""
    local = local_memory(pid)
    return local, (store_memory(pid, store_dir) if store_dir and local else 0)

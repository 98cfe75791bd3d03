"""Memory of one process, split the way the porter accounts it:

    local   anonymous pages (smaps `Anonymous`): the process's own heap/stack pages and the
            pages it copied on write from the store; these live in local DRAM
    shared  resident pages mapped from a cxlfork page-store file (`Rss - Anonymous` of
            mappings whose path is under the store directory): shared by all clones of a
            checkpoint, they live in the store on the CXL tier
"""
from __future__ import annotations


def process_memory(pid: int, store_dir: str | None) -> tuple[int, int]:
    """(local bytes, shared store bytes) of PID; (0, 0) when it is gone."""
    local = shared = 0
    in_store = False
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/smaps", "rb") as f:
            for line in f:
                if line[:1].islower() or line[:1].isdigit():     # a mapping's header line
                    if in_store:
                        shared += rss - anon
                    parts = line.split(None, 5)
                    path = parts[5].strip().decode(errors="replace") if len(parts) > 5 else ""
                    in_store = bool(store_dir) and path.startswith(store_dir)
                    rss = anon = 0
                elif line.startswith(b"Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"Anonymous:"):
                    anon = int(line.split()[1]) * 1024
                    local += anon
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0, 0
    if in_store:
        shared += rss - anon
    return local, shared

"""First-request write profile: the pages a clone's first request writes, done ahead of it.

A mow clone's first request pays a page fault for every page it writes: a store page it
copies on write (a fault, a 4 KiB copy), or an anonymous page it touches for the first time
outside the store (a zero-filled page), besides the store pages it only reads (minor faults,
removed by a prefaulting warm ghost, MADV_POPULATE_READ). `record(image, pids)` looks at
running clones that served their first request and writes IMAGE/first.json: the address
ranges, inside the image's own writable private mappings, whose pages are present in the
clone and not the store's (pagemap: present, not a file page), i.e. copied on write or newly
made. A prefaulting warm ghost (cxlfork.ghosts, `prefault=True`) then runs
madvise(MADV_POPULATE_WRITE) over them before it waits for its clone: the copies and zero
pages are made in the idle ghost, off the request path; what the clone's request writes next
is already private. The bytes are the same as without it (a copy-on-write copy is the store
page; a new anonymous page is zeros), only the time of the fault moves; local memory is what
the first request would have made anyway.

    first.json   {"id": image id, "ranges": [[address, bytes], ...]}   (page-aligned, sorted)

`load(image, m)` checks it against the image: every range inside one writable private VMA of
the manifest, else the file is refused (ImageError naming it).
"""
from __future__ import annotations

import json
import os

import numpy as np

from cxlfork.errors import CxlforkError, ImageError
from tiermem.native import PM_FILE, PM_PRESENT, pagemap_read

FIRST = "first.json"
PAGE = 4096
PROT_W = 2
MAX_RANGES = 1 << 16


def _writable(m: dict) -> list[dict]:
    """The image's VMAs a clone may have written privately (anonymous or private file)."""
    return [v for v in m["vmas"] if v["prot"] & PROT_W and v["kind"] in ("anon", "file")
            and not v.get("shared")]


def _ranges(mask: np.ndarray, start: int) -> list[list[int]]:
    """[address, bytes] of each run of True in mask (page i at start + i pages)."""
    if not mask.any():
        return []
    d = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    s, e = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    return [[start + int(a) * PAGE, int(b - a) * PAGE] for a, b in zip(s, e)]


def record(image: str, pids: list[int]) -> dict:
    """Union over the clones PIDS of the pages present and not the store's in the image's
    writable private VMAs; writes IMAGE/first.json. Returns counts: written_pages (store
    pages copied on write), zero_pages (pages outside the stored runs), ranges, file."""
    from cxlfork import image as image_mod
    from cxlfork.profile import _check_clone
    m = image_mod.load(image)
    for pid in pids:
        _check_clone(pid, image, m)
    out, written, zero = [], 0, 0
    for v in _writable(m):
        n = (v["end"] - v["start"]) // PAGE
        hit = np.zeros(n, dtype=bool)
        for pid in pids:
            try:
                pm = pagemap_read(pid, v["start"], n)
            except OSError as e:
                raise CxlforkError(f"pagemap of PID {pid}: {e.strerror}") from e
            pm = pm[:n]
            hit[:len(pm)] |= ((pm & np.uint64(PM_PRESENT)) != 0) & \
                ((pm & np.uint64(PM_FILE)) == 0)
        stored = np.zeros(n, dtype=bool)
        for addr, cnt, _ in v["runs"]:
            i = (addr - v["start"]) // PAGE
            stored[i:i + cnt] = True
        written += int((hit & stored).sum())
        zero += int((hit & ~stored).sum())
        out += _ranges(hit, v["start"])
    if len(out) > MAX_RANGES:
        raise CxlforkError(f"first-request profile of {image}: {len(out)} ranges (at most "
                           f"{MAX_RANGES})")
    path = os.path.join(image, FIRST)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"id": m["id"], "ranges": out}, f)
    os.rename(tmp, path)
    return {"image": image, "written_pages": written, "zero_pages": zero,
            "ranges": len(out), "file": path}


def load(image: str, m: dict) -> list[tuple[int, int]] | None:
    """The ranges of IMAGE/first.json, checked against the manifest m; None when absent."""
    path = os.path.join(image, FIRST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            h = json.load(f)
        ok_id = h["id"] == m["id"]
        ranges = [(int(a), int(b)) for a, b in h["ranges"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ImageError(f"image {image}: corrupt {FIRST} ({e})") from e
    if not ok_id:
        raise ImageError(f"image {image}: {FIRST} is for another image (id)")
    vmas = _writable(m)
    for a, b in ranges:
        if a % PAGE or b % PAGE or b <= 0 or \
                not any(v["start"] <= a and a + b <= v["end"] for v in vmas):
            raise ImageError(f"image {image}: {FIRST} range {a:#x}+{b:#x} is not inside one "
                             "writable private mapping of the image")
    return ranges

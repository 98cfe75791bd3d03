"""Hot-page record for the hybrid policy: which store pages clones actually touched.

For each running clone of an image, the pages of every stored anonymous run that are present
in its page table (pagemap; a page mapped from the store, read or copied-on-write) are marked.
The union is written to IMAGE/hot.json (a bitmap over the page file, with its SHA-256).
"""
from __future__ import annotations

import os

import numpy as np
import psutil

from cxlfork import image as image_mod
from cxlfork.errors import CxlforkError
from tiermem.native import PM_PRESENT, PM_SWAP, pagemap_read

PAGE = 4096


def _check_clone(pid: int, image: str, m: dict) -> None:
    """Refuse a PID that is not a running clone of the image (its record would be empty or
    the pages of an unrelated process): it must have started after the checkpoint, run
    the image's executable and have the image's anonymous mappings at their addresses."""
    try:
        p = psutil.Process(pid)
        started, exe = p.create_time(), p.exe()
        maps = [tuple(int(x, 16) for x in r.addr.split("-"))
                for r in p.memory_maps(grouped=False)]
    except psutil.NoSuchProcess:
        raise CxlforkError(f"no process with PID {pid} to profile") from None
    except psutil.AccessDenied:
        raise CxlforkError(f"cannot read the mappings of PID {pid}: permission denied "
                           "(profile clones as root or as their owner)") from None
    why = None
    ref = m["process"]["exe"]
    if started + 1.0 < m["created"]:          # create_time is good to the second (btime)
        why = "it started before the image was checkpointed"
    else:
        try:
            st = os.stat(exe) if exe else None
        except OSError:
            st = None
        if st is None or (st.st_dev, st.st_ino) != (ref["dev"], ref["ino"]):
            why = f"it runs {exe or 'no executable'}, the image {ref['path']}"
        else:
            runs = [v for v in m["vmas"] if v["kind"] == "anon" and v["runs"]]
            missing = [v for v in runs
                       if not any(s <= v["start"] < e for s, e in maps)]
            if missing:
                why = (f"{len(missing)} of the image's {len(runs)} memory areas are not "
                       f"mapped in it (first: {missing[0]['start']:#x}-{missing[0]['end']:#x})")
    if why:
        raise CxlforkError(f"PID {pid} is not a clone of {image}: {why}")


def record(image: str, pids: list[int]) -> dict:
    m = image_mod.load(image)
    n = m["store"]["pages"]
    old = image_mod.load_hot(image, m)
    hot = np.zeros(n, dtype=bool)
    if old is not None:
        hot |= np.unpackbits(np.frombuffer(old, dtype=np.uint8), bitorder="little")[:n] \
            .astype(bool)
    for pid in pids:
        _check_clone(pid, image, m)
    for pid in pids:
        for v in m["vmas"]:
            if v["kind"] != "anon":
                continue
            for addr, cnt, sp in v["runs"]:
                try:
                    pm = pagemap_read(pid, addr, cnt)
                except OSError as e:
                    raise CxlforkError(f"pagemap of PID {pid}: {e.strerror}") from e
                if len(pm) < cnt:
                    continue                       # the clone unmapped it since
                hot[sp:sp + cnt] |= (pm & np.uint64(PM_PRESENT | PM_SWAP)) != 0
    bits = np.packbits(hot, bitorder="little").tobytes()
    image_mod.write_hot(image, m, bits)
    return {"image": image, "pages": n, "hot_pages": int(hot.sum()),
            "file": f"{image}/{image_mod.HOT}"}

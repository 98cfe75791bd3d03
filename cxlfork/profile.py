"""Hot-page record for the hybrid policy: which store pages clones actually touched.

For each running clone of an image, the pages of every stored anonymous run that are present
in its page table (pagemap; a page mapped from the store, read or copied-on-write) are marked.
The union is written to IMAGE/hot.json (a bitmap over the page file, with its SHA-256).
"""
from __future__ import annotations

import numpy as np

from cxlfork import image as image_mod
from cxlfork.errors import CxlforkError
from tiermem.native import PM_PRESENT, PM_SWAP, pagemap_read

PAGE = 4096


def record(image: str, pids: list[int]) -> dict:
    m = image_mod.load(image)
    n = m["store"]["pages"]
    old = image_mod.load_hot(image, m)
    hot = np.zeros(n, dtype=bool)
    if old is not None:
        hot |= np.unpackbits(np.frombuffer(old, dtype=np.uint8), bitorder="little")[:n] \
            .astype(bool)
    for pid in pids:
        try:
            with open(f"/proc/{pid}/exe"):
                pass
        except OSError as e:
            raise CxlforkError(f"no process with PID {pid} to profile") from e
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

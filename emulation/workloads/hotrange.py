"""hotrange: a workload whose memory starts on the slow node, with one hot range in it.

Maps --size-mb of anonymous memory, binds it (mbind MPOL_BIND) to --node (the CXL node),
fills it with a known pattern, then reads its first --hot-mb over and over (the hot range)
while the rest stays cold. It writes {pid, start, end, hot_start, hot_end, ...} to --info
as JSON once populated. On SIGUSR1 it re-checks every word of the buffer against the
pattern and writes {ok, bad_words, nodes...} to --info with ".verify" appended; on SIGTERM
it exits. Used by `python -m emulation demo` to show a hot range moved to the fast node
with its contents intact.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import signal
import time

import numpy as np

from tiermem import native

MULT = np.uint64(0x9E3779B97F4A7C15)


def pattern(n: int, seed: int) -> np.ndarray:
    return np.arange(n, dtype=np.uint64) * MULT + np.uint64(seed)


def write_json(path: str, obj: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=128)
    ap.add_argument("--hot-mb", type=int, default=16)
    ap.add_argument("--node", type=int, default=1)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--info", required=True)
    a = ap.parse_args()
    if not 0 < a.hot_mb <= a.size_mb:
        ap.error("need 0 < --hot-mb <= --size-mb")
    size = a.size_mb << 20
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    words = np.frombuffer(buf, dtype=np.uint64)
    start = words.ctypes.data
    native.mbind(start, size, native.MPOL_BIND, [a.node])
    words[:] = pattern(len(words), a.seed)      # first touch: pages land on a.node
    hot_end = start + (a.hot_mb << 20)
    pages = np.arange(start, start + size, native.PAGE_SIZE, dtype=np.uint64)
    where = native.query_nodes(0, pages)
    write_json(a.info, {"pid": os.getpid(), "start": start, "end": start + size,
                        "hot_start": start, "hot_end": hot_end, "node": a.node,
                        "pages": len(pages), "pages_on_node": int((where == a.node).sum())})

    flags = {"verify": False, "stop": False}
    signal.signal(signal.SIGUSR1, lambda *_: flags.__setitem__("verify", True))
    signal.signal(signal.SIGTERM, lambda *_: flags.__setitem__("stop", True))
    hot = words[: (a.hot_mb << 20) // 8]
    passes = 0
    while not flags["stop"]:
        int(hot.sum())          # read the hot range
        passes += 1
        if flags["verify"]:
            flags["verify"] = False
            bad = int((words != pattern(len(words), a.seed)).sum())
            where = native.query_nodes(0, pages)
            nodes, counts = np.unique(where[where >= 0], return_counts=True)
            write_json(a.info + ".verify", {
                "ok": bad == 0, "bad_words": bad, "words": len(words), "hot_passes": passes,
                "pages_per_node": {int(n): int(c) for n, c in zip(nodes, counts)}})
        time.sleep(0.01)


if __name__ == "__main__":
    main()

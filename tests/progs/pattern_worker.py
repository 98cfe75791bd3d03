"""Test workload: maps SIZE MiB, binds it to NODE (mbind), fills a per-page pattern, prints
{"pid", "start", "end"} as JSON, then answers commands on stdin: 'verify' -> 'ok'/'bad N',
'exit'. Used to check that page moves never lose or corrupt data."""
import json
import mmap
import os
import sys

import numpy as np

from tiermem import native


def main():
    size = int(sys.argv[1]) << 20
    node = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2] != "-" else None
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arr = np.frombuffer(buf, dtype=np.uint64)
    addr = arr.ctypes.data
    if node is not None:
        native.mbind(addr, size, native.MPOL_BIND, [node])
    words_per_page = native.PAGE_SIZE // 8
    pattern = (np.arange(len(arr), dtype=np.uint64) * np.uint64(2654435761)) ^ np.uint64(0xABCD)
    arr[:] = pattern
    print(json.dumps({"pid": os.getpid(), "start": addr, "end": addr + size,
                      "pages": size // native.PAGE_SIZE}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "verify":
            bad = int(np.count_nonzero(arr != pattern))
            print("ok" if bad == 0 else f"bad {bad // words_per_page + 1}", flush=True)
        elif cmd == "exit":
            break


if __name__ == "__main__":
    main()

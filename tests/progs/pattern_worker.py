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
    chunk = 1 << 20

    def pattern(i):                     # the expected words [i, i + chunk), never stored whole
        idx = np.arange(i, min(i + chunk, len(arr)), dtype=np.uint64)
        return (idx * np.uint64(2654435761)) ^ np.uint64(0xABCD)

    for i in range(0, len(arr), chunk):
        arr[i:i + chunk] = pattern(i)
    print(json.dumps({"pid": os.getpid(), "start": addr, "end": addr + size,
                      "pages": size // native.PAGE_SIZE}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "verify":
            bad = sum(int(np.count_nonzero(arr[i:i + chunk] != pattern(i)))
                      for i in range(0, len(arr), chunk))
            print("ok" if bad == 0 else f"bad {bad // words_per_page + 1}", flush=True)
        elif cmd == "exit":
            break


if __name__ == "__main__":
    main()

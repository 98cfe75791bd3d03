"""Workload for the tiermemd tests, bench and demo (python -m tiermemd.workload TOTAL HOT NODE
[TAG]): TOTAL MiB of anonymous memory filled with a per-word
pattern, placed on NODE, of which HOT MiB (starting at a quarter of the way in) is read in a
loop by a thread. Prints {"pid", "start", "end", "hot_start", "hot_end"} as JSON, then answers
commands on stdin:
  verify -> ok | bad N      (pages whose contents differ from the pattern)
  where  -> {"hot": {node: pages}, "all": {node: pages}}
  fork   -> the PID of a child that keeps running the same loop (CoW-shares the memory)
  exit
WorkloadProcess starts one and asks it these questions.
"""
import json
import mmap
import os
import subprocess
import sys
import threading
import time

import numpy as np

from tiermem import native


def main():
    total, hot_mb, node = int(sys.argv[1]) << 20, int(sys.argv[2]) << 20, int(sys.argv[3])
    buf = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arr = np.frombuffer(buf, dtype=np.uint64)
    addr = arr.ctypes.data
    native.mbind(addr, total, native.MPOL_BIND, [node])
    chunk = 1 << 20                       # words: the pattern is made per chunk, no copy

    def pattern(i):
        return (np.arange(i, min(i + chunk, len(arr)), dtype=np.uint64)
                * np.uint64(2654435761)) ^ np.uint64(0x5A5A)

    for i in range(0, len(arr), chunk):
        arr[i:i + chunk] = pattern(i)
    native.mbind(addr, total, native.MPOL_DEFAULT)      # later moves are free to go anywhere
    h0 = (total // 4) // 8
    hot = arr[h0:h0 + hot_mb // 8]
    stop = threading.Event()

    def touch():
        while not stop.is_set():
            hot.sum()                     # reads every page of the hot set
            time.sleep(0.01)

    threading.Thread(target=touch, daemon=True).start()
    pages = np.arange(addr, addr + total, native.PAGE_SIZE, dtype=np.uint64)
    hot_pages = pages[h0 * 8 // native.PAGE_SIZE:(h0 * 8 + hot_mb) // native.PAGE_SIZE]
    print(json.dumps({"pid": os.getpid(), "start": addr, "end": addr + total,
                      "hot_start": int(hot_pages[0]), "hot_end": int(hot_pages[-1]) + 4096}),
          flush=True)

    def count(p):
        st = native.query_nodes(0, p)
        n, c = np.unique(st, return_counts=True)
        return {str(int(a)): int(b) for a, b in zip(n, c)}

    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "verify":
            bad = sum(int(np.count_nonzero((arr[i:i + chunk] != pattern(i))
                                           .reshape(-1, native.PAGE_SIZE // 8).any(1)))
                      for i in range(0, len(arr), chunk))
            print("ok" if bad == 0 else f"bad {bad}", flush=True)
        elif cmd == "where":
            print(json.dumps({"hot": count(hot_pages), "all": count(pages)}), flush=True)
        elif cmd == "fork":
            pid = os.fork()
            if pid == 0:
                sys.stdin = open(os.devnull)
                while True:
                    time.sleep(1)        # the touch thread is gone in the child: idle holder
            print(pid, flush=True)
        elif cmd == "exit":
            break
    stop.set()


class WorkloadProcess:
    """A running workload (TOTAL MiB on NODE, HOT MiB read in a loop, TAG last on its command
    line so a cmdline target can select it). wait=False returns at once: call ready() before
    using it (to start several side by side)."""

    def __init__(self, total_mb: int, hot_mb: int, node: int, tag: str = "", wait=True):
        self.p = subprocess.Popen([sys.executable, "-m", "tiermemd.workload", str(total_mb),
                                   str(hot_mb), str(node), tag],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info, self.pid = None, self.p.pid
        if wait:
            self.ready()

    def ready(self) -> "WorkloadProcess":
        """Waits until the workload's memory is filled and placed."""
        if self.info is not None:
            return self
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"the workload exited at start (status {self.p.wait()})")
        self.info = json.loads(line)
        return self

    def ask(self, cmd: str) -> str:
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def where(self) -> dict:
        return json.loads(self.ask("where"))

    def hot_share(self, fast_nodes=(0,)) -> float:
        """Share of the hot set's present pages on the given (fast) nodes."""
        h = self.where()["hot"]
        return sum(v for k, v in h.items() if int(k) in fast_nodes) / max(1, sum(h.values()))

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.ask("exit")
            except OSError:
                pass
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


if __name__ == "__main__":
    main()

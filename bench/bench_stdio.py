"""What `--stdio original` costs a restore: a daemon logging on fds 1 and 2
(tests/cxlfork_progs/stdlog.c, stdin /dev/null, `>>log 2>&1`) restored from one prepared
restore with stdio "inherit" (the baseline) and "original" (its log reopened as the
checkpointed process: a thread taking its fsuid/fsgid/groups, O_PATH open, reopen, fstat
checks), alternating, medians of --runs; then the reopening alone (stdio.original_fds).

"restore" = Prepared.restore(1, stdio=...) until it returns (the clone handed over).
Run as root:  .venv/bin/python bench/bench_stdio.py [--runs 20]
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from cxlfork.checkpoint import checkpoint  # noqa: E402
from cxlfork.restore import prepare_restore  # noqa: E402
from cxlfork.state import stdio as stdio_mod  # noqa: E402

PROG = os.path.join(os.path.dirname(HERE), "tests", "cxlfork_progs", "stdlog.c")


def _restore_ms(p, stdio) -> float:
    t = time.perf_counter()
    pid, = p.restore(1, stdio=stdio)
    dt = (time.perf_counter() - t) * 1e3
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_stdio: needs root (ptrace, PR_SET_MM_MAP)")
    work = tempfile.mkdtemp(prefix="bench-stdio-")
    store = tempfile.mkdtemp(prefix="bench-stdio-store-", dir="/dev/shm")
    exe = os.path.join(work, "stdlog")
    subprocess.run(["gcc", "-O1", "-o", exe, PROG], check=True)
    log = os.path.join(work, "daemon.log")
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    orig = subprocess.Popen([exe], stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                            close_fds=True)
    os.close(fd)
    try:
        while os.path.getsize(log) == 0:
            time.sleep(0.01)
        img = os.path.join(work, "d.img")
        checkpoint(orig.pid, img, store_dir=store)
        res: dict[str, list[float]] = {"inherit": [], "original": []}
        with prepare_restore(img) as p:
            _restore_ms(p, "inherit")                      # warm-up, not counted
            for i in range(a.runs):
                order = ("inherit", "original") if i % 2 == 0 else ("original", "inherit")
                for mode in order:
                    res[mode].append(_restore_ms(p, mode))
            alone = []
            for _ in range(a.runs * 5):
                opened: list[int] = []
                t = time.perf_counter()
                stdio_mod.original_fds(p.m, opened)
                alone.append((time.perf_counter() - t) * 1e6)
                for x in opened:
                    os.close(x)
        load = os.getloadavg()[0]
        inh, ori = statistics.median(res["inherit"]), statistics.median(res["original"])
        print("restore of a daemon with its log on fds 1-2, medians of %d alternating runs, "
              "load average %.1f" % (a.runs, load))
        print(f"{'inherit (baseline)':>20} | {'original':>10} | {'difference':>10} | "
              f"{'min inherit':>11} | {'min original':>12} | {'reopen alone':>12}")
        print(f"{inh:>17.2f} ms | {ori:>7.2f} ms | {ori - inh:>+7.2f} ms | "
              f"{min(res['inherit']):>8.2f} ms | {min(res['original']):>9.2f} ms | "
              f"{statistics.median(alone):>9.0f} us")
    finally:
        orig.kill()
        orig.wait()
        import shutil
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()

"""tiermemd against the kernel's own tiering on live workloads, inside the emulated CXL machine.

    python -m emulation.tierdemo --workloads dense,sparse --seconds 40 --out runs.json

For each workload (emulation/workloads/tierload.py: dense, sparse, shifting; competing = a
dense and a sparse tierload process sharing one fast-tier room) and each mode:

  tiermemd-m5  tiermemd (DAMON vaddr sampler, m5 policy, 64 MB/s budget) starts first, as a
               service runs before the programs it tiers (numa_balancing=0 meanwhile);
  kernel       NUMA balancing in tiering mode (numa_balancing=2, demotion on, promotion
               rate limit = tiermemd's budget), settings restored afterwards;

then the workload starts and fills its memory on the slow node; where its fast-tier room is
limited (sparse, shifting), a hog then takes the fast node's free memory down to that room (mbind to node 0, populated and mlock'ed, so the
kernel cannot demote it either; the room is counted above the kernel's promo watermark,
which both keep free), and the workload runs --seconds from there. Every figure is the workload's own (one JSON line a second):
time_to_90_s = first second its hot-access fast share was >= 0.9 (null: never),
hot_fast_share = mean of that share over the second half of the run, work_rate = its
accesses per second over the second half (see tierload.py for how slow accesses are
charged under TCG); for competing, accesses are added over the processes and the share is
weighted by each one's accesses (per process figures under "processes"). The workload
checks every word of its memory at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import signal
import subprocess
import sys
import tempfile
import time

from tiermem.errors import TiermemError
from tiermem.topology import _meminfo_kb, read_topology, zone_watermarks
from tiermemd.kernel_tiering import kernel_tiering, kernel_tiering_off

HERE = os.path.dirname(os.path.abspath(__file__))
TIERLOAD = os.path.join(HERE, "workloads", "tierload.py")
BUDGET_MBPS = 64
MODES = ("tiermemd-m5", "kernel")
# workload -> (tierload arguments, fast-tier room in MiB or None = the whole fast node)
WORKLOADS = {
    "dense": (["--total-mb", "96", "--hot-mb", "24"], None),
    "sparse": (["--total-mb", "128", "--hot-mb", "16", "--sparse-mb", "64", "--words", "2"],
               24),
    "shifting": (["--total-mb", "64", "--hot-mb", "16", "--shift-s", "10"], 24),
    # two processes share a 24 MiB room: a dense 12 MiB hot set, and a process with a
    # dense 8 MiB hot set plus 48 MiB of sparse pages (2 hot words each); 68 MiB of hot
    # pages in all, 20 MiB of them dense
    "competing": ([("dense", ["--total-mb", "64", "--hot-mb", "12", "--seed", "5"]),
                   ("sparse", ["--total-mb", "96", "--hot-mb", "8", "--sparse-mb", "48",
                               "--words", "2", "--seed", "6"])], 24),
}
DAEMON_CONFIG = """[daemon]
interval = "1s"
socket = "{sock}"
state_dir = "{state}"
metrics = ""
[migration]
bandwidth = "{bw}MB/s"
[[targets]]
name = "w"
cmdline = "tierload.py"
sampler = "damon"
policy = "m5"
[targets.sampler_params]
sample_us = 5000
aggr_us = 100000
min_nr_regions = 200
[targets.policy_params]
top_k = 65536
hot_min = 0.25
rate_init_pct = 100.0
break_even = 0.05
"""


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def hog(mb: int) -> None:
    """python -m emulation.tierdemo --hog MB: hold MB MiB on node 0, unevictable."""
    import ctypes
    import numpy as np
    from tiermem import native
    size = mb << 20
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    a = np.frombuffer(buf, np.uint8).ctypes.data
    native.mbind(a, size, native.MPOL_BIND, [0])
    buf.madvise(23)                                   # MADV_POPULATE_WRITE
    if ctypes.CDLL(None, use_errno=True).mlock(ctypes.c_void_p(a), ctypes.c_size_t(size)):
        raise SystemExit(f"hog: mlock failed: {os.strerror(ctypes.get_errno())}")
    print("ready", flush=True)
    sys.stdin.read()


@contextlib.contextmanager
def fast_room(room_mb):
    """Leaves about room_mb MiB free on node 0 above the kernel's promo watermark."""
    if room_mb is None:
        yield None
        return
    free_mb = _meminfo_kb(0)[1] // 1024
    # tiermemd and the kernel both keep the kernel's promo watermark free (tiermemd raises
    # its own watermarks to it): the room is what lies above it
    keep = zone_watermarks(0).get("promo", zone_watermarks(0).get("high", 0)) >> 20
    mb = free_mb - room_mb - keep - 8
    if mb <= 0:
        raise TiermemError(f"node 0 has only {free_mb} MiB free: cannot leave {room_mb} MiB")
    p = subprocess.Popen([sys.executable, "-m", "emulation.tierdemo", "--hog", str(mb)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=HERE + "/..")
    try:
        if p.stdout.readline().strip() != "ready":
            raise TiermemError(f"the memory hog did not start (status {p.wait()})")
        yield mb
    finally:
        p.stdin.close()
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()


def _procs(kind: str) -> tuple[list[tuple[str, list[str]]], int | None]:
    """(tierload processes as (tierload kind, arguments), room) of a workload."""
    args, room = WORKLOADS[kind]
    if args and isinstance(args[0], tuple):          # several competing processes
        return list(args), room
    return [(kind, args)], room


def run_workload(kind: str, seconds: float, wd: str) -> dict:
    """Starts the workload's processes (their memory filled on the slow node), then the hog
    that leaves the fast-tier room (sized after the workloads' own runtimes took their
    share of node 0), then lets them run `seconds`."""
    procs, room = _procs(kind)
    ws, stats = [], []
    with contextlib.ExitStack() as stack:
        try:
            for i, (tk, args) in enumerate(procs):
                st = os.path.join(wd, f"{kind}-{i}.stats")
                for f in (st, st + ".verify"):
                    if os.path.exists(f):
                        os.unlink(f)
                stats.append(st)
                ws.append(subprocess.Popen([sys.executable, TIERLOAD, tk, *args, "--node",
                                            str(slow_node()), "--stats", st, "--wait-go"],
                                           stdout=subprocess.PIPE, text=True,
                                           stdin=subprocess.PIPE))
            for w in ws:
                if not w.stdout.readline():
                    raise TiermemError(f"workload {kind} exited at start (status {w.wait()})")
            stack.enter_context(fast_room(room))
            for w in ws:
                w.stdin.write("go\n")
                w.stdin.flush()
            return _measure(ws, kind, seconds, stats)
        finally:
            for w in ws:
                if w.poll() is None:
                    w.terminate()
                    try:
                        w.wait(30)
                    except subprocess.TimeoutExpired:
                        w.kill()


def _measure(ws, kind: str, seconds: float, stats: list[str]) -> dict:
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end and all(w.poll() is None for w in ws):
        time.sleep(0.5)
    for w in ws:
        if w.poll() is not None:
            raise TiermemError(f"workload {kind} exited mid-run (status {w.returncode})")
        os.kill(w.pid, signal.SIGUSR1)
    verify = {"ok": True, "bad_words": 0}
    for st in stats:
        for _ in range(600):
            if os.path.exists(st + ".verify"):
                break
            time.sleep(0.2)
        v = json.load(open(st + ".verify")) if os.path.exists(st + ".verify") \
            else {"ok": False, "bad_words": -1}
        verify = {"ok": verify["ok"] and bool(v.get("ok")),
                  "bad_words": verify["bad_words"] + v.get("bad_words", 0)}
    rows = [[json.loads(x) for x in open(st) if x.strip()] for st in stats]
    res = summarize(combine(rows) if len(rows) > 1 else rows[0], verify)
    if len(rows) > 1:
        res["processes"] = [summarize(r, verify) for r in rows]
        for p in res["processes"]:
            p.pop("series")
    return res


def combine(per_proc: list[list[dict]]) -> list[dict]:
    """One row a second for several processes: the i-th lines of each, accesses added, the
    fast share weighted by each process's accesses in that second."""
    n = min(len(r) for r in per_proc)
    out = []
    for i in range(n):
        rs = [r[i] for r in per_proc]
        d = [r[i]["ops"] - (r[i - 1]["ops"] if i else 0) for r in per_proc]
        tot = sum(d)
        out.append({"t": max(x["t"] for x in rs), "ops": sum(x["ops"] for x in rs),
                    "fast_share": sum(x["fast_share"] * di for x, di in zip(rs, d)) / tot
                    if tot else 0.0})
    return out


def summarize(rows: list[dict], verify: dict) -> dict:
    """The run's figures from the workload's own per-second lines."""
    if len(rows) < 4:
        raise TiermemError(f"the workload reported only {len(rows)} time(s)")
    t_end = rows[-1]["t"]
    second = [r for r in rows if r["t"] >= t_end / 2]
    first = second[0] if len(second) > 1 else rows[-2]
    rate = (rows[-1]["ops"] - first["ops"]) / max(rows[-1]["t"] - first["t"], 1e-9)
    t90 = next((r["t"] for r in rows if r["fast_share"] >= 0.9), None)
    return {"time_to_90_s": t90,
            "hot_fast_share": sum(r["fast_share"] for r in second) / len(second),
            "work_rate": rate, "verify_ok": bool(verify.get("ok")),
            "series": [[r["t"], r["fast_share"]] for r in rows]}


def run_tiermemd(kind: str, seconds: float, wd: str) -> dict:
    sock = os.path.join("/run", f"tierdemo-{os.getpid()}.sock")
    cfg = os.path.join(wd, "tiermemd.toml")
    with open(cfg, "w") as f:
        f.write(DAEMON_CONFIG.format(sock=sock, state=f"/run/tierdemo-{os.getpid()}",
                                     bw=BUDGET_MBPS))
    log_path = os.path.join(wd, f"tiermemd-{kind}.log")
    log = open(log_path, "w+")
    d = subprocess.Popen([sys.executable, "-m", "tiermemd", "-f", "-v", "-c", cfg],
                         stderr=log, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and d.poll() is None:
            log.seek(0)
            if " prewarmed in " in log.read():
                break
            time.sleep(0.2)
        if d.poll() is not None:
            log.seek(0)
            raise TiermemError("tiermemd did not start: "
                               + (log.read().strip().splitlines() or ["no output"])[-1])
        res = run_workload(kind, seconds, wd)
        from tiermem.control import request
        st = request(sock, {"cmd": "stats"}, timeout=60)
        tg = st.get("out", st).get("targets", {}).get("w", {}) if isinstance(st, dict) else {}
        res["daemon"] = {k: tg.get(k) for k in ("pages_promoted", "pages_demoted",
                                                "failures_by_errno", "node_full_events",
                                                "processes", "sampler_cpu_seconds")}
        if isinstance(st, dict):
            res["daemon"]["daemon_cpu_seconds"] = st.get("out", st).get("daemon_cpu_seconds")
        res["daemon_log"] = log_path
        return res
    finally:
        d.send_signal(signal.SIGTERM)
        try:
            d.wait(60)
        except subprocess.TimeoutExpired:
            d.kill()


def run_kernel(kind: str, seconds: float, wd: str) -> dict:
    with kernel_tiering(rate_mbps=BUDGET_MBPS):
        return run_workload(kind, seconds, wd)


def slow_node() -> int:
    topo = read_topology()
    if not topo.slow_nodes:
        raise TiermemError("this machine has no slow memory tier: run inside the emulated "
                           "CXL machine (make demo)")
    return topo.slow_nodes[0]


def run_all(workloads, seconds: float, modes=MODES) -> list[dict]:
    wd = tempfile.mkdtemp(prefix="tierdemo-")
    runs = []
    for kind in workloads:
        for mode in modes:
            say(f"== {kind} workload under {mode} ({seconds:.0f} s)")
            if mode == "kernel":
                r = run_kernel(kind, seconds, wd)
            else:
                with kernel_tiering_off():
                    r = run_tiermemd(kind, seconds, wd)
            r.update(workload=kind, mode=mode)
            say(f"   time to 90 %: {r['time_to_90_s']} s, hot fast share "
                f"{r['hot_fast_share']:.3f}, work rate {r['work_rate']:.0f} accesses/s, "
                f"memory {'intact' if r['verify_ok'] else 'CHANGED'}")
            if not r["verify_ok"]:
                raise TiermemError(f"{kind}/{mode}: the workload's memory changed")
            runs.append(r)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="dense,sparse")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--seconds", type=float, default=40)
    ap.add_argument("--out", help="write the runs as JSON here")
    ap.add_argument("--hog", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.hog is not None:
        return hog(a.hog)
    try:
        if os.geteuid() != 0:
            raise TiermemError("needs root (it starts tiermemd and sets kernel knobs)")
        kinds = [k for k in a.workloads.split(",") if k]
        modes = [m for m in a.modes.split(",") if m]
        bad = [k for k in kinds if k not in WORKLOADS] + [m for m in modes if m not in MODES]
        if bad:
            raise TiermemError(f"unknown workload or mode {bad[0]!r} (workloads: "
                               f"{', '.join(WORKLOADS)}; modes: {', '.join(MODES)})")
        runs = run_all(kinds, a.seconds, modes)
        text = json.dumps({"runs": runs})
        if a.out:
            with open(a.out + ".tmp", "w") as f:
                f.write(text)
            os.replace(a.out + ".tmp", a.out)
        else:
            print(text)
    except (TiermemError, OSError) as e:
        print(f"tierdemo: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Remote fork figures: restore on host B of host A's checkpoint in the shared pool, against a
local restore on A and against the copy path (the image copied to B through a shared
filesystem, then restored there: what CRIU-based systems do). Two emulated hosts (TCG: use
the ratios, not the times), medians of --runs, in one run of this script.

    .venv/bin/python bench/bench_remote.py [--sizes 64,256] [--runs 5]

Per size, the numpy worker (tests/cxlfork_progs/worker.py) is started on A and checkpointed
twice while it runs: into A's local store (tmpfs, `cxlfork checkpoint`) and into the pool
(`cxlfork pool checkpoint`). Then, alternating, each run measures in the guests (Python API,
no CLI start-up):

    local     on A: prepare_restore(local image) + restore 1 clone + its answer to "ping"
    remote    on B: lease + manifest from the pool + prepare_restore + restore + answer
    copy      on A: copy page file and manifest into the shared work folder (9p), then on
              B: copy them into B's local store, then prepare_restore + restore + answer
    prepared  the same clone start with the restore already prepared (per-clone cost):
              local on A, remote on B

and, once per size, the anonymous memory and RSS of one clone (local on A, remote on B)
after it read its whole state. The guest side of this script runs as
`bench_remote.py --guest STEP ...` inside the hosts.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(ROOT, "tests", "cxlfork_progs", "worker.py")
STORE = "/dev/shm/bench-remote-store"


# -- guest side --------------------------------------------------------------------------------
def _clone_cycle(p, measure_mem: bool = False) -> tuple[float, dict]:
    """Restore one clone from prepared p, ping it; returns (seconds from start of this call,
    memory after a full read if asked). The clone is checked ("go" -> "ok") and reaped."""
    r0, w0 = os.pipe()
    r1, w1 = os.pipe()
    t0 = time.perf_counter()
    pid = p.restore(1, stdio=(r0, w1, 2))[0]
    os.close(r0)
    os.close(w1)
    os.write(w0, b"ping\n")
    got = _readline(r1)
    dt = time.perf_counter() - t0
    assert got == "pong", got
    with open(f"/proc/{pid}/stat") as f:        # page faults of its start and the ping
        st = f.read().rpartition(")")[2].split()
    mem = {"minflt": int(st[7]), "majflt": int(st[9])}
    if measure_mem:
        os.write(w0, b"read\n")
        assert _readline(r1) == "done"
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for ln in f:
                parts = ln.split()
                if len(parts) >= 3 and parts[-1] == "kB":
                    mem[parts[0].rstrip(":")] = int(parts[1])
    os.write(w0, b"go\n")
    ok = _readline(r1)
    os.waitpid(pid, 0)
    os.close(w0)
    os.close(r1)
    assert ok == "ok", ok
    return dt, mem


def _readline(fd: int) -> str:
    out = b""
    while not out.endswith(b"\n"):
        c = os.read(fd, 1)
        if not c:
            break
        out += c
    return out.decode().strip()


def guest(argv: list[str]) -> dict:
    import subprocess
    from cxlfork import image as image_mod, poolstore, restore as restore_mod
    from cxlfork.restore import prepare_restore
    step = argv[0]
    if step == "ckpt":                    # SIZE NAME: worker, local checkpoint, pool checkpoint
        mib, name = int(argv[1]), argv[2]
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
        w = subprocess.Popen([sys.executable, WORKER, str(mib)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, close_fds=True, env=env)
        assert w.stdout.readline().strip() == b"ready"
        from cxlfork.checkpoint import checkpoint
        img = f"/tmp/{name}.img"
        shutil.rmtree(img, ignore_errors=True)
        os.makedirs(STORE, exist_ok=True)
        t = time.perf_counter()
        checkpoint(w.pid, img, STORE)
        t_local = time.perf_counter() - t
        t = time.perf_counter()
        r = poolstore.checkpoint(w.pid, name)
        t_pool = time.perf_counter() - t
        w.kill()
        w.wait()
        return {"local_ckpt_s": t_local, "pool_ckpt_s": t_pool, "pages": r["pages"]}
    if step == "local":                   # NAME RUNS
        img, runs = f"/tmp/{argv[1]}.img", int(argv[2])
        first, prep, faults = [], [], []
        for _ in range(runs):
            restore_mod._CACHE.clear()
            t = time.perf_counter()
            with prepare_restore(img) as p:
                t_prep = time.perf_counter() - t
                dt, _ = _clone_cycle(p)         # up to the ping's answer (not the clone's
                first.append(t_prep + dt)       # full read and exit that follow)
                dt, mm = _clone_cycle(p)
                prep.append(dt)
                faults.append(mm["minflt"])
        with prepare_restore(img) as p:
            mem = _clone_cycle(p, True)[1]
        return {"first": first, "prepared": prep, "faults": faults, "mem": mem}
    if step == "remote":                  # NAME RUNS
        ref, runs = argv[1], int(argv[2])
        first, prep, faults = [], [], []
        for _ in range(runs):
            restore_mod._CACHE.clear()
            shutil.rmtree(poolstore.LOCAL_IMAGES, ignore_errors=True)
            t = time.perf_counter()
            pool, rec, img = poolstore.acquire(ref)
            try:
                with prepare_restore(img) as p:
                    t_prep = time.perf_counter() - t
                    dt, _ = _clone_cycle(p)
                    first.append(t_prep + dt)
                    dt, mm = _clone_cycle(p)
                    prep.append(dt)
                    faults.append(mm["minflt"])
            finally:
                poolstore.release(pool, rec)
        pool, rec, img = poolstore.acquire(ref)
        with prepare_restore(img) as p:
            mem = _clone_cycle(p, True)[1]
        poolstore.release(pool, rec)
        return {"first": first, "prepared": prep, "faults": faults, "mem": mem}
    if step == "send":                    # NAME DIR: local image -> shared folder
        img, d = f"/tmp/{argv[1]}.img", argv[2]
        t = time.perf_counter()
        m = image_mod.load(img)
        os.makedirs(d)
        shutil.copyfile(image_mod.store_file(m), os.path.join(d, m["store"]["file"]))
        shutil.copyfile(os.path.join(img, image_mod.MANIFEST), os.path.join(d, "manifest.json"))
        for f in (m["store"]["file"], "manifest.json"):
            with open(os.path.join(d, f), "rb+") as fh:
                os.fsync(fh.fileno())
        return {"send_s": time.perf_counter() - t}
    if step == "receive":                 # DIR: shared folder -> local store, restore
        d = argv[1]
        t = time.perf_counter()
        with open(os.path.join(d, "manifest.json")) as f:
            m = json.load(f)
        os.makedirs(STORE, exist_ok=True)
        dst = os.path.join(STORE, m["store"]["file"])
        shutil.copyfile(os.path.join(d, m["store"]["file"]), dst)
        m["store"]["dir"] = STORE
        m["store"]["pin"] = image_mod.pin_of(os.stat(dst))   # B pins its own copy
        img = f"/tmp/recv-{os.path.basename(d)}.img"
        shutil.rmtree(img, ignore_errors=True)
        tmp = image_mod.write_tmp(img, {k: v for k, v in m.items() if k != "checksum"})
        os.rename(tmp, img)
        restore_mod._CACHE.clear()
        with prepare_restore(img) as p:
            t_prep = time.perf_counter() - t
            dt = t_prep + _clone_cycle(p)[0]
        os.unlink(dst)
        shutil.rmtree(img)
        shutil.rmtree(d)
        return {"receive_restore_s": dt}
    raise SystemExit(f"unknown guest step {step}")


# -- host side ---------------------------------------------------------------------------------
def med(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="64,256", help="worker state sizes, MiB")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--guest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.guest:
        print(json.dumps(guest(a.guest)))
        return 0
    sys.path.insert(0, ROOT)
    import tempfile
    from emulation import hosts
    from emulation.config import MachineConfig
    sizes = [int(x) for x in a.sizes.split(",")]
    need = sum(s + 32 for s in sizes)
    rundir = tempfile.mkdtemp(prefix="bench-remote-")
    work = tempfile.mkdtemp(prefix="bench-remote-work-", dir="/var/tmp")
    pool_mib = max(1024, 2 * (need + 64))
    st = hosts.start(2, pool_mib, MachineConfig(cpus=1, fast_mem_mib=1024,
                                                slow_mem_mib=max(256, need * 2 + 64)),
                     work, rundir=rundir, log=lambda m: print(f"# {m}", file=sys.stderr))
    a_m, b_m = hosts.attach(st, 0), hosts.attach(st, 1)

    def g(m, *args, timeout=1800):
        r = m.run([m.python, os.path.abspath(__file__), "--guest", *map(str, args)],
                  timeout=timeout)
        if r.returncode != 0:
            raise SystemExit(f"guest step {args[0]} failed: {r.stderr.strip()[-2000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    rows = []
    try:
        for mib in sizes:
            name = f"w{mib}"
            ck = g(a_m, "ckpt", mib, name)
            loc = {"first": [], "prepared": [], "faults": []}
            rem = {"first": [], "prepared": [], "faults": []}
            cp = []
            for i in range(a.runs):          # alternate, so that all see the same load
                x = g(a_m, "local", name, 1)
                y = g(b_m, "remote", name, 1)
                for k in loc:
                    loc[k] += x[k]
                    rem[k] += y[k]
                d = os.path.join(work, f"xfer-{mib}-{i}")
                s = g(a_m, "send", name, d)["send_s"]
                cp.append(s + g(b_m, "receive", d)["receive_restore_s"])
            mem_l = g(a_m, "local", name, 1)["mem"]
            mem_r = g(b_m, "remote", name, 1)["mem"]
            rows.append((mib, ck, loc, rem, cp, mem_l, mem_r))
            print(f"# {mib} MiB done", file=sys.stderr)
    finally:
        a_m.close_connection()
        b_m.close_connection()
        hosts.stop(st, rundir)
        shutil.rmtree(rundir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"remote fork on two emulated hosts (QEMU TCG, 1 vCPU each), medians of {a.runs}; "
          f"load average {os.getloadavg()[0]:.1f}")
    hdr = ("state", "ckpt local", "ckpt pool", "local mow", "remote mow", "remote/local",
           "copy path", "copy/remote", "local prep.", "remote prep.", "rem/loc prep.")
    print(" | ".join(f"{h:>13}" for h in hdr))
    for mib, ck, loc, rem, cp, _, _ in rows:
        lf, rf, c = med(loc["first"]), med(rem["first"]), med(cp)
        lp, rp = med(loc["prepared"]), med(rem["prepared"])
        cells = (f"{mib} MiB", f"{ck['local_ckpt_s'] * 1e3:.0f} ms",
                 f"{ck['pool_ckpt_s'] * 1e3:.0f} ms", f"{lf * 1e3:.0f} ms", f"{rf * 1e3:.0f} ms",
                 f"{rf / lf:.2f}x", f"{c * 1e3:.0f} ms", f"{c / rf:.1f}x", f"{lp * 1e3:.1f} ms",
                 f"{rp * 1e3:.1f} ms", f"{rp / lp:.2f}x")
        print(" | ".join(f"{x:>13}" for x in cells))
    print()
    print("page faults of one prepared clone (its start and the ping; /proc/PID/stat minflt), "
          "medians")
    print(" | ".join(f"{h:>13}" for h in ("state", "local", "remote", "remote/local")))
    for mib, _, loc, rem, _, _, _ in rows:
        lf, rf = med(loc["faults"]), med(rem["faults"])
        print(" | ".join(f"{x:>13}" for x in (f"{mib} MiB", f"{lf:.0f}", f"{rf:.0f}",
                                               f"{rf / lf:.2f}x")))
    print()
    print("memory of one clone after reading its whole state (smaps_rollup)")
    hdr = ("state", "local anon", "local RSS", "remote anon", "remote RSS", "remote anon/state")
    print(" | ".join(f"{h:>17}" for h in hdr))
    for mib, _, _, _, _, ml, mr in rows:
        cells = (f"{mib} MiB", f"{ml.get('Anonymous', 0) / 1024:.1f} MiB",
                 f"{ml.get('Rss', 0) / 1024:.1f} MiB", f"{mr.get('Anonymous', 0) / 1024:.1f} MiB",
                 f"{mr.get('Rss', 0) / 1024:.1f} MiB",
                 f"{100 * mr.get('Anonymous', 0) / 1024 / mib:.1f}%")
        print(" | ".join(f"{x:>17}" for x in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())

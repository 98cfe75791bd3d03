"""Run inside an emulated host by tests/test_remote_vm.py and bench/bench_remote.py: the
steps of a remote fork on one host, each printing one JSON line.

    python tests/remote_guest.py ckpt NAME MIB [--kill]     start the numpy worker, checkpoint
    python tests/remote_guest.py clones NAME N [POLICY]     N clones: read all, memory, go
    python tests/remote_guest.py hold NAME N DIR            N clones kept until DIR/go exists
    python tests/remote_guest.py porter K N [BALLAST_MIB]   a porter with the pool registry:
                                                            N invocations of `echo`, the
                                                            checkpoint after K, then stop
    python tests/remote_guest.py forge NAME HOW             rewrite a published image as an
                                                            attacker or a foreign pool would
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "cxlfork_progs", "worker.py")
CXLFORK = [sys.executable, "-m", "cxlfork"]
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1")


def line(f) -> str:
    return f.readline().decode().strip()


def start_worker(mib: int) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, WORKER, str(mib)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, close_fds=True, env=ENV)
    assert line(p.stdout) == "ready"
    return p


def node_used_kib() -> dict:
    out = {}
    for n in sorted(os.listdir("/sys/devices/system/node")):
        if n.startswith("node"):
            with open(f"/sys/devices/system/node/{n}/meminfo") as f:
                for ln in f:
                    if "MemUsed:" in ln:
                        out[n] = int(ln.split()[-2])
    return out


def rollup(pid: int) -> dict:
    d = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for ln in f:
            parts = ln.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                d[parts[0].rstrip(":")] = int(parts[1])
    return d


def ckpt(name: str, mib: int, kill: bool) -> dict:
    w = start_worker(mib)
    t = time.perf_counter()
    r = subprocess.run(CXLFORK + ["pool", "checkpoint", str(w.pid), name, "--json"]
                       + (["--kill"] if kill else []), capture_output=True, text=True)
    dt = time.perf_counter() - t
    out = {"rc": r.returncode, "stderr": r.stderr.strip(), "seconds": dt}
    if r.returncode == 0:
        out.update(json.loads(r.stdout))
    else:                        # a refused checkpoint leaves the worker as it was: end it
        w.kill()
        w.wait()
        return out
    if kill:
        w.wait()
    else:                        # the original still answers
        w.stdin.write(b"go\n")
        w.stdin.flush()
        out["original"] = line(w.stdout)
        w.wait()
    return out


def clones(name: str, n: int, policy: str = "mow") -> dict:
    before = node_used_kib()
    pidfile = f"/tmp/pids.{os.getpid()}"
    t = time.perf_counter()
    pol = ["--policy", "moa", "--eager"] if policy == "moa-eager" else ["--policy", policy]
    r = subprocess.Popen(CXLFORK + ["pool", "restore", name, "-n", str(n), *pol,
                                    "--pidfile", pidfile], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True)
    while not os.path.exists(pidfile):
        if r.poll() is not None:
            return {"rc": r.returncode, "stderr": r.stderr.read().decode().strip()}
        time.sleep(0.01)
    with open(pidfile) as f:
        pids = [int(x) for x in f.read().split()]
    restore_s = time.perf_counter() - t
    answers = []
    for _ in pids:                       # each clone reads its whole state once
        r.stdin.write(b"read\n")
        r.stdin.flush()
        answers.append(line(r.stdout))
    after = node_used_kib()
    mem = [rollup(p) for p in pids]
    maps = open(f"/proc/{pids[0]}/maps").read()
    for _ in pids:
        r.stdin.write(b"go\n")
        r.stdin.flush()
        answers.append(line(r.stdout))
    r.communicate(timeout=120)
    return {"rc": r.returncode, "pids": pids, "answers": answers, "restore_s": restore_s,
            "node_used_delta_kib": {k: after[k] - before[k] for k in after},
            "anon_kib": sum(m.get("Anonymous", 0) for m in mem),
            "private_dirty_kib": sum(m.get("Private_Dirty", 0) for m in mem),
            "rss_kib": sum(m.get("Rss", 0) for m in mem),
            "maps_pool": "/run/cxlpool/" in maps}


def hold(name: str, n: int, d: str) -> None:
    pidfile = os.path.join(d, "pids")
    r = subprocess.Popen(CXLFORK + ["pool", "restore", name, "-n", str(n), "--pidfile",
                                    pidfile], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, close_fds=True)
    while not os.path.exists(pidfile):
        if r.poll() is not None:
            with open(os.path.join(d, "result"), "w") as f:
                json.dump({"rc": r.returncode, "stderr": r.stderr.read().decode()}, f)
            return
        time.sleep(0.05)
    answers = []
    for _ in range(n):
        r.stdin.write(b"ping\n")
        r.stdin.flush()
        answers.append(line(r.stdout))
    with open(os.path.join(d, "ready"), "w") as f:
        f.write(" ".join(answers))
    while not os.path.exists(os.path.join(d, "go")):
        time.sleep(0.2)
    for _ in range(n):
        r.stdin.write(b"read\n")
        r.stdin.flush()
        answers.append(line(r.stdout))
        r.stdin.write(b"go\n")
        r.stdin.flush()
        answers.append(line(r.stdout))
    r.communicate(timeout=120)
    with open(os.path.join(d, "result.tmp"), "w") as f:
        json.dump({"rc": r.returncode, "answers": answers}, f)
    os.rename(os.path.join(d, "result.tmp"), os.path.join(d, "result"))


def forge(name: str, how: str) -> dict:
    """Rewrite this host's published image NAME in the pool, as someone who can write the
    pool would: `foreign` manifest and record sealed under another pool's key; `record` a
    record field edited (its frame SHA-256 fixed, no key); `manifest` the manifest edited, the
    record's manifest hash and frame fixed (no key); `manifest-seal` the manifest sealed
    under another key, its record properly sealed (the record seal passes, the manifest's
    must not)."""
    import hashlib
    import secrets
    from cxlfork import image as image_mod
    from cxlfork.poollog import MAGIC, PAGE, SLOT, Pool, record_seal
    pool = Pool()
    rec = next(r for r in pool.records(pool.host) if r["name"] == name)
    pages = pool.path(pool.host, "pages")
    with open(pages, "rb") as f:
        f.seek((rec["base"] + rec["npages"]) * PAGE)
        m = json.loads(f.read(rec["manifest_len"]))
    other = secrets.token_bytes(32)
    if how in ("foreign", "manifest-seal"):
        m["checksum"] = image_mod.checksum(m, key=other)
    elif how == "manifest":
        m["process"]["cwd"] = "/root"                # what a forger would point elsewhere
    if how != "record":
        mb = json.dumps(m, sort_keys=True).encode()
        fd = os.open(pages, os.O_RDWR)
        os.pwrite(fd, mb.ljust(rec["mpages"] * PAGE, b"\0"), (rec["base"] + rec["npages"]) * PAGE)
        os.close(fd)
        rec.update(manifest_len=len(mb), manifest_sha256=hashlib.sha256(mb).hexdigest())
    else:
        rec["npages"] -= 1
    rec["seal"] = record_seal(rec, other if how in ("foreign", "record", "manifest")
                              else pool.key)
    if how in ("record", "manifest"):
        rec["seal"] = rec["seal"][::-1]          # no key: whatever it writes, not the seal
    body = json.dumps(rec, sort_keys=True).encode()
    blob = MAGIC + len(body).to_bytes(4, "little") + body + hashlib.sha256(body).digest()
    fd = os.open(pool.path(pool.host, "log"), os.O_RDWR)
    os.pwrite(fd, blob.ljust(SLOT, b"\0"), rec["slot"] * SLOT)
    os.close(fd)
    return {"slot": rec["slot"], "how": how}


def porter(k: int, n: int, ballast_mib: int = 8) -> dict:
    """The porter with `[porter] pool = true`, its housekeeping jobs run here (main thread):
    n invocations of the echo function; its checkpoint (after k) goes to the pool."""
    from cxlfork.porter.config import from_dict
    from cxlfork.porter.service import Porter
    cfg = from_dict({"porter": {"pool": True, "port": 0},
                     "functions": {"echo": {"command": ["python", "-m", "cxlfork.workers.echo"],
                                            "init": {"ballast_mib": ballast_mib},
                                            "policy": "mow", "checkpoint_after": k}}},
                    "remote_guest")
    logs: list[str] = []
    p = Porter(cfg, log=logs.append)
    try:
        fn = p.pool("echo")
        looked_up = fn.image is not None
        answers, starts = [], []
        for _ in range(n):
            out, start, _, _ = fn.invoke("x")
            answers.append(out["n"])
            starts.append(start)
            while not p.jobs.empty():
                job = p.jobs.get_nowait()
                if job:
                    p._run_job(job)
        st = fn.stats()
    finally:
        p.stop()
    return {"looked_up": looked_up, "answers": answers, "starts": starts,
            "checkpoint": st["checkpoint"], "log": logs}


if __name__ == "__main__":
    a = sys.argv[1:]
    if a[0] == "ckpt":
        print(json.dumps(ckpt(a[1], int(a[2]), "--kill" in a)))
    elif a[0] == "clones":
        print(json.dumps(clones(a[1], int(a[2]), *(a[3:4] or ["mow"]))))
    elif a[0] == "hold":
        hold(a[1], int(a[2]), a[3])
    elif a[0] == "porter":
        print(json.dumps(porter(int(a[1]), int(a[2]), *map(int, a[3:4]))))
    elif a[0] == "forge":
        print(json.dumps(forge(a[1], a[2])))

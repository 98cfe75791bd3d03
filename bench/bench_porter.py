"""Benchmark of the cxlfork porter: a bursty, Azure-Functions-like arrival trace replayed at a
fixed rate against three functions (the real LLM worker, SmolLM2-135M on llama.cpp, 4 new
tokens per request; the numpy thumbnail worker; the C wordcount worker), once per start mode,
side by side, measured in the same run:

    cold       every new instance is a cold start (spawn + init), never a checkpoint
    moa-eager  restore by copying every page into local memory (CRIU-like eager restore)
    moa        cxlfork lazy migrate-on-access: store mapped, blocks copied on first touch
    mow-spawn  mow without a ghost pool: each restore spawns its restorer (the baseline of
               the ghost pool)
    mow        cxlfork restore mapping the page store copy-on-write
    hybrid     cxlfork restore copying the pages clones touched (hot-page profile), mapping the rest

The restore modes but mow-spawn keep --ghost-pool pre-spawned restorers per function. Then
all modes again with local memory limited to 25% of the footprint (`local_memory_limit_mib`
= 25% of the peak local memory of the unlimited cold run): a memory cgroup the kernel
enforces (instances over it are OOM-killed), the porter's pressure signal (the cgroup's
working set) and its admission limit. Memory columns are the porter's accounting from smaps
(local = anonymous pages of all instances; shared = resident page-store pages they map), and
in the limited runs the cgroup's working set and its OOM kills.

    .venv/bin/python bench/bench_porter.py [--duration 10] [--rate 5] [--seed 1] [--repeat 2]
        [--ghost-pool 2]

Needs root (cxlfork). Bounded: per run the trace lasts --duration seconds, each request has
a 60 s client timeout, and the porter is stopped (SIGTERM) after every run.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
PY = sys.executable
MODES = ("cold", "moa-eager", "moa", "mow-spawn", "mow", "mow-prefault", "hybrid")
PHASES = ("queue", "prepare", "restore", "spawn_init", "first_request")


def policy_of(mode: str) -> str:
    return "mow" if mode in ("mow-spawn", "mow-prefault") else mode
FUNCS = ("llm", "thumb", "wc")
WEIGHT = {"llm": 0.4, "thumb": 0.3, "wc": 0.3}


def payload(fn: str, i: int):
    if fn == "llm":
        return {"prompt": f"request {i}: the CXL tier", "max_new_tokens": 4}
    if fn == "thumb":
        return {"width": 96, "height": 64, "seed": i, "size": [48, 32]}
    return f"request {i} counts these words\nand lines " * 8


# -- the trace ---------------------------------------------------------------------------
def azure_like_trace(duration: float, rate: float, seed: int) -> list[tuple[float, str]]:
    """(time s, function) arrivals. Per function an ON/OFF modulated Poisson process (ON
    bursts ~0.6 s at a high rate, OFF gaps ~2.5 s nearly idle): the bursty, heavy-tailed
    shape of the Azure Functions traces. Scaled so that the total mean rate is `rate`/s."""
    rng = np.random.default_rng(seed)
    out = []
    for fn in FUNCS:
        t, on = 0.0, bool(rng.random() < 0.3)
        while t < duration:
            length = rng.exponential(0.6 if on else 2.5)
            lam = 12.0 if on else 0.15
            n = rng.poisson(lam * length)
            out += [(float(x), fn) for x in t + np.sort(rng.random(n)) * length
                    if x < duration]
            t += length
            on = not on
    out.sort()
    want = int(round(rate * duration))
    if len(out) > want:                          # thin uniformly to the fixed rate
        keep = np.sort(rng.choice(len(out), size=want, replace=False))
        out = [out[i] for i in keep]
    return out


# -- one porter run ----------------------------------------------------------------------
class PorterRun:
    def __init__(self, mode: str, wc: str, limit_mib: float, k: int,
                 ghosts: int):
        self.dir = tempfile.mkdtemp(prefix="bench-porter-")
        self.store = tempfile.mkdtemp(prefix="bench-porter-store-", dir="/dev/shm")
        cfg = os.path.join(self.dir, "porter.toml")
        fns = {"llm": '["python", "-m", "cxlfork.workers.llm"]',
               "thumb": '["python", "-m", "cxlfork.workers.thumbnail"]',
               "wc": f'["{wc}"]'}
        with open(cfg, "w") as f:
            f.write(f'[porter]\nport = 0\nstore = "{self.store}"\nkeepalive_s = 1.5\n'
                    f'pressure_keepalive_s = 0.5\ncheckpoint_after = {k}\n'
                    f'local_memory_limit_mib = {limit_mib}\n'
                    f'ghost_pool = {0 if mode == "mow-spawn" else ghosts}\n'
                    f'ghost_prefault = {"true" if mode == "mow-prefault" else "false"}\n')
            for fn, cmd in fns.items():
                f.write(f'\n[functions.{fn}]\ncommand = {cmd}\npolicy = "{policy_of(mode)}"\n'
                        'max_instances = 4\nqueue_timeout_s = 30\ntimeout_s = 30\n')
        self.log = os.path.join(self.dir, "porter.log")
        with open(self.log, "w") as err:
            self.p = subprocess.Popen([PY, "-m", "cxlfork", "porter", "--config", cfg],
                                      stdout=subprocess.PIPE, stderr=err, text=True)
        line = self.p.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"porter did not start: {line} {self.log_tail()}")
        self.port = int(line.rsplit(":", 1)[1])

    def request(self, method, path, body=None, timeout=60.0):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        c.request(method, path, body=None if body is None else json.dumps(body).encode(),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, json.loads(data), r.getheader("X-Porter-Start")

    def stats(self):
        return self.request("GET", "/stats")[1]

    def invoke_ok(self, fn, body, tries=3):
        """One warm-up request; under a memory limit an instance can be OOM-killed (502):
        retried, and said so."""
        for t in range(tries):
            code, out, _ = self.request("POST", f"/functions/{fn}/invoke", body)
            if code == 200:
                return
            if code != 502 or t == tries - 1:
                raise RuntimeError(f"warm-up request to {fn} failed ({code}): {out}")
            print(f"  warm-up request to {fn}: {code} {out.get('error', '')[:160]}; again",
                  file=sys.stderr)

    def wait(self, pred, timeout, what):
        t = time.monotonic()
        while time.monotonic() - t < timeout:
            if pred(self.stats()):
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}")

    def log_tail(self) -> str:
        with open(self.log) as f:
            return "".join(f.readlines()[-40:]) + f"(porter exit status {self.p.poll()})"

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        try:
            self.p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.communicate()
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.store, ignore_errors=True)


def warm_up(run: PorterRun, mode: str, k: int) -> None:
    """K invocations per function (checkpoint), one restored instance serving two requests
    (hot-page profile for hybrid), then scale to zero: every mode starts the trace from zero
    instances with its checkpoints ready."""
    for fn in FUNCS:              # one function at a time: its checkpoint is taken before
        for i in range(k):        # the next function starts (under a limit, a cold start
            run.invoke_ok(fn, payload(fn, 10000 + i))  # can OOM-kill an instance)
        if mode != "cold":
            run.wait(lambda s: s["functions"][fn]["checkpoint"]["image"]
                     or s["functions"][fn]["checkpoint"]["error"], 120, f"{fn}'s checkpoint")
    if mode == "cold":
        run.wait(lambda s: all(f["instances"] == 0 for f in s["functions"].values()), 60,
                 "scale to zero")
        return
    run.wait(lambda s: all(f["checkpoint"]["image"] for f in s["functions"].values()), 120,
             "the checkpoints")
    run.wait(lambda s: all(f["instances"] == 0 for f in s["functions"].values()), 60,
             "scale to zero")
    for fn in FUNCS:
        for i in range(2):
            run.invoke_ok(fn, payload(fn, 20000 + i))
    if mode == "hybrid":
        run.wait(lambda s: all(f["hot_profile"] for f in s["functions"].values()), 60,
                 "the hot-page profiles")
    run.wait(lambda s: all(f["instances"] == 0 for f in s["functions"].values()), 60,
             "scale to zero")


def replay(run: PorterRun, trace) -> tuple[list[dict], list[dict]]:
    """Send every arrival at its time (open loop); sample /stats every 0.25 s meanwhile."""
    results, samples = [], []
    done = threading.Event()

    def sampler():
        while not done.is_set():
            try:
                samples.append(run.stats())
            except OSError:
                pass
            done.wait(0.25)

    def one(i, at, fn):
        delay = t0 + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        s = time.monotonic()
        try:
            code, body, start = run.request("POST", f"/functions/{fn}/invoke", payload(fn, i))
        except OSError as e:
            code, body, start = 0, {"error": str(e)}, None
        ms = (time.monotonic() - s) * 1e3
        return {"fn": fn, "code": code, "ms": ms, "start": start,
                "worker_ms": (body.get("total_ms", 0) - body.get("ttft_ms", 0))
                if fn == "llm" and code == 200 else 0.0}

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    t0 = time.monotonic() + 0.2
    with cf.ThreadPoolExecutor(max_workers=64) as ex:
        futs = [ex.submit(one, i, at, fn) for i, (at, fn) in enumerate(trace)]
        results = [f.result() for f in futs]
    done.set()
    th.join()
    return results, samples


def pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def summarise(mode, limit, results, samples, inst_starts, ooms) -> dict:
    """Pooled over the repetitions of one (mode, limit)."""
    ok = [r for r in results if r["code"] == 200]
    starts = [r for r in ok if r["start"] in ("cold", "restored")]
    local = [s["porter"]["local_memory_bytes"] / 2**20 for s in samples] or [0]
    cg = [s["porter"]["cgroup"]["working_set_bytes"] / 2**20 for s in samples
          if s["porter"].get("cgroup") and "working_set_bytes" in s["porter"]["cgroup"]]
    shared = [s["porter"]["shared_memory_bytes"] / 2**20 for s in samples] or [0]
    per_fn = {}
    for fn in FUNCS:
        fr = [r for r in ok if r["fn"] == fn]
        fs = [r["ms"] for r in fr if r["start"] in ("cold", "restored")]
        per_fn[fn] = {"n": sum(r["fn"] == fn for r in results), "ok": len(fr),
                      "p50": pct([r["ms"] for r in fr], 50), "p99": pct([r["ms"] for r in fr], 99),
                      "start_p99": pct(fs, 99), "starts": len(fs)}
    llm_inst = {}
    for s in samples:
        for i in s["functions"]["llm"]["instance_list"]:
            key = i["policy"]
            cur = llm_inst.get(key, (0, 0))
            if i["served"] >= 1:
                llm_inst[key] = (max(cur[0], i["local_bytes"]), max(cur[1], i["shared_bytes"]))
    ttft = {k: [r["ms"] - r["worker_ms"] for r in ok if r["fn"] == "llm" and r["start"] == k]
            for k in ("cold", "restored", "warm")}
    kinds = {k: sum(r["start"] == k for r in ok) for k in ("cold", "restored", "warm")}
    return {"mode": mode, "limit": limit, "n": len(results), "ok": len(ok),
            "errors": len(results) - len(ok), "kinds": kinds,
            "p50": pct([r["ms"] for r in ok], 50), "p99": pct([r["ms"] for r in ok], 99),
            "start_p50": pct([r["ms"] for r in starts], 50),
            "start_p99": pct([r["ms"] for r in starts], 99),
            "local_mean": float(np.mean(local)), "local_peak": float(np.max(local)),
            "shared_mean": float(np.mean(shared)), "per_fn": per_fn, "llm_inst": llm_inst,
            "cgroup_mean": float(np.mean(cg)) if cg else None,
            "cgroup_peak": float(np.max(cg)) if cg else None, "oom_kills": sum(ooms),
            "phases": {ph: [x[3][ph] for x in inst_starts if ph in x[3]] for ph in PHASES},
            "llm_first_request": [x[3]["first_request"] for x in inst_starts
                                  if x[0] == "llm" and x[1] == "restored"
                                  and "first_request" in x[3]],
            "ttft": {k: (pct(v, 50), len(v)) for k, v in ttft.items()},
            "porter_start_ms": {fn: {kind: {"n": len(v), "p50": pct(v, 50), "p99": pct(v, 99)}
                                     for kind in ("cold", "restored")
                                     for v in [[x[2] for x in inst_starts
                                                if x[0] == fn and x[1] == kind]]}
                                for fn in FUNCS}}


def run_mode(mode, limit_mib, trace, wc, k, ghosts) -> dict:
    """One porter run: warm-up, the trace; returns the raw results, /stats samples, the
    start time and phases of every instance started during the trace (porter side) and the
    OOM kills of the run."""
    run = PorterRun(mode, wc, limit_mib, k, ghosts)
    try:
        warm_up(run, mode, k)
        before = {i["pid"] for smp in [run.stats()] for f in smp["functions"].values()
                  for i in f["instance_list"]}
        results, samples = replay(run, trace)
    except BaseException:
        print(f"porter log ({mode}, limit {limit_mib} MiB):\n{run.log_tail()}", file=sys.stderr)
        raise
    finally:
        run.stop()
    seen = {}
    for smp in samples:
        for fn, f in smp["functions"].items():
            for i in f["instance_list"]:
                if i["pid"] not in before:
                    seen[i["pid"]] = (fn, i["kind"], i["start_ms"], i["start_phases_ms"])
    last = samples[-1] if samples else {"functions": {}}
    failures = {fn: f["restore_failures"] for fn, f in last["functions"].items()
                if f["restore_failures"]}
    if failures:
        print(f"  {mode} (limit {limit_mib}): restore failures: {failures}", file=sys.stderr)
    ooms = max([(smp["porter"].get("cgroup") or {}).get("oom_kills", 0) for smp in samples]
               or [0])
    return {"results": results, "samples": samples, "starts": list(seen.values()),
            "ooms": [ooms]}


# -- the cost of the porter's memory sample ----------------------------------------------
def _smaps_line_parse(pid: int, store_dir: str) -> tuple[int, int]:
    """The baseline: every line of /proc/PID/smaps parsed in Python (how the porter sampled
    before it used smaps_rollup)."""
    local = shared = rss = anon = 0
    in_store = False
    with open(f"/proc/{pid}/smaps", "rb") as f:
        for line in f:
            if line[:1].islower() or line[:1].isdigit():
                if in_store:
                    shared += rss - anon
                parts = line.split(None, 5)
                in_store = len(parts) > 5 and parts[5].strip().decode().startswith(store_dir)
                rss = anon = 0
            elif line.startswith(b"Rss:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith(b"Anonymous:"):
                anon = int(line.split()[1]) * 1024
                local += anon
    return local, shared + (rss - anon if in_store else 0)


@contextlib.contextmanager
def worker_checkpoint(module: str = "cxlfork.workers.llm", init: dict | None = None,
                      warm: dict | None = None):
    """An initialised worker (after one warm request, if given) checkpointed into a store in
    /dev/shm: yields (image, store, worker pid, checkpoint summary, cold start ms); removes
    all of it afterwards. The worker gets close_fds and stdin/stdout pipes only."""
    from cxlfork import image as image_mod
    from cxlfork.checkpoint import checkpoint
    work = tempfile.mkdtemp(prefix="bench-porter-sample-")
    store = tempfile.mkdtemp(prefix="bench-porter-store-", dir="/dev/shm")
    t0 = time.perf_counter()
    w = subprocess.Popen([PY, "-m", module], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, close_fds=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1"))
    img = os.path.join(work, "w.img")
    try:
        w.stdin.write(json.dumps({"init": init or {}}).encode() + b"\n")
        w.stdin.flush()
        ready = json.loads(w.stdout.readline())
        if ready.get("ready") is not True:
            raise RuntimeError(f"{module} did not start: {ready}")
        cold_ms = (time.perf_counter() - t0) * 1e3
        if warm is not None:
            w.stdin.write(json.dumps({"id": 0, "input": warm}).encode() + b"\n")
            w.stdin.flush()
            w.stdout.readline()
        summary = checkpoint(w.pid, img, store, kill=False)
        yield img, store, w, summary, cold_ms
    finally:
        w.kill()
        w.wait()
        if os.path.exists(img):
            image_mod.remove(img)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)


@contextlib.contextmanager
def llm_checkpoint(init: dict | None = None):
    """The LLM worker checkpointed: yields (image, store, worker pid)."""
    with worker_checkpoint("cxlfork.workers.llm", init) as (img, store, w, _, _):
        yield img, store, w.pid


def sampling_cost(reps: int = 30) -> None:
    """Median time of one memory sample of an LLM instance (cold) and of a mow clone of it:
    the baseline line-by-line smaps parse next to what the porter does now."""
    from cxlfork.porter.memory import local_memory, store_memory
    from cxlfork.restore import restore
    fds, clone = [], None
    try:
        with llm_checkpoint() as (img, store, worker):
            ir, iw = os.pipe()
            orr, ow = os.pipe()
            fds = [ir, iw, orr, ow]
            clone = restore(img, policy="mow", n=1, stdio=(ir, ow, 2))[0]
            os.write(iw, b'{"id": 1, "input": {"prompt": "warm", "max_new_tokens": 2}}\n')
            os.read(orr, 1 << 16)
            rows = []
            for what, pid in (("LLM cold instance", worker), ("LLM mow clone", clone)):
                cells = [what]
                for fn in (lambda: _smaps_line_parse(pid, store), lambda: local_memory(pid),
                           lambda: store_memory(pid, store)):
                    ts = []
                    for _ in range(reps):
                        t = time.perf_counter()
                        fn()
                        ts.append((time.perf_counter() - t) * 1e3)
                    cells.append(f"{np.median(ts):.2f}")
                cells.append(f"{_smaps_line_parse(pid, store)[1] / 2**20:.1f} / "
                             f"{store_memory(pid, store) / 2**20:.1f}")
                rows.append(cells)
    finally:
        for fd in fds:
            os.close(fd)
        if clone:
            os.kill(clone, signal.SIGKILL)
            os.waitpid(clone, 0)
    print(f"\nmemory sample of one instance, median ms of {reps}: the baseline (every smaps "
          "line parsed in Python) and what the porter does (local: smaps_rollup each "
          "tick; store pages: only the store's smaps entries, restored instances, once a "
          "second); shared MiB by both ways")
    cols = ["instance", "smaps line parse", "rollup (local)", "store entries",
            "shared MiB base / now"]
    wd = [18, 16, 14, 13, 21]
    print(row(cols, wd))
    for r in rows:
        print(row(r, wd))


def ghost_cost() -> None:
    """What an idle warm mow ghost of the LLM worker holds, without and with prefault (its
    store pages in its page tables): resident, PSS, page tables (/proc status, smaps_rollup)."""
    from cxlfork.ghosts import GhostPool
    from cxlfork.restore import prepare_restore

    def kib(pid, path, key):
        with open(f"/proc/{pid}/{path}") as f:
            return [int(x.split()[1]) for x in f if x.startswith(key + ":")][0]

    from cxlfork.firstreq import record
    print("\nidle warm mow ghost of the LLM worker, KiB: resident / PSS / page tables (VmPTE) / "
          "anonymous (local memory)")

    def show(p, prefault, what):
        with GhostPool(1, refill="manual", prepared=p, prefault=prefault) as pool:
            g = pool.pids()[0]
            print(f"  {what:>38}: {kib(g, 'status', 'VmRSS')} / "
                  f"{kib(g, 'smaps_rollup', 'Pss')} / {kib(g, 'status', 'VmPTE')} / "
                  f"{kib(g, 'smaps_rollup', 'Anonymous')}")

    req = REAL_FUNCS["llm"][1]
    with llm_checkpoint() as (img, _, _):
        with prepare_restore(img, "mow") as p:
            show(p, False, "prefault off")
            show(p, True, "prefault on")
            ir, iw = os.pipe()
            orr, ow = os.pipe()
            pid = p.restore(1, stdio=(ir, ow, 2))[0]
            os.close(ir)
            os.close(ow)
            try:
                _ask(iw, orr, req)
                prof = record(img, [pid])
            finally:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                os.close(iw)
                os.close(orr)
        with prepare_restore(img, "mow") as p:
            show(p, True, f"prefault on + first-request profile "
                          f"({prof['written_pages'] + prof['zero_pages']} pages)")


def _mapped_rss(pid: int, path: str) -> int:
    """Resident bytes of PID's mappings of the file `path` (page cache pages it maps)."""
    with open(f"/proc/{pid}/smaps") as f:
        lines = f.read().splitlines()
    total, inside = 0, False
    for ln in lines:
        if ln[:1].isalnum() and "-" in ln.split(" ", 1)[0] and not ln.endswith("kB"):
            inside = ln.endswith(path)
        elif inside and ln.startswith("Rss:"):
            total += int(ln.split()[1]) * 1024
    return total


def _minflt(pid: int) -> int:
    """Minor page faults of PID so far (/proc/PID/stat field 10)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(") ", 1)[1].split()[7])


def _ask(fd_in: int, fd_out: int, req: dict) -> tuple[dict, float]:
    """One request over raw pipe fds: (answer, ms)."""
    t = time.perf_counter()
    os.write(fd_in, json.dumps({"id": 1, "input": req}).encode() + b"\n")
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = os.read(fd_out, 1 << 16)
        if not chunk:
            raise RuntimeError("the clone closed its stdout")
        buf += chunk
    return json.loads(buf), (time.perf_counter() - t) * 1e3


def llm_weight_placement(reps: int = 3) -> None:
    """The LLM worker's weights in anonymous memory (use_mmap false: the checkpoint carries
    them into the page store) against mmapped from the GGUF (page cache), side by side:
    cold start, checkpoint size and time, mow restore, the clone's first request, its local
    memory (anonymous + page cache pages it maps) and whether it answers like the original."""
    from cxlfork.porter.memory import local_memory
    from cxlfork.restore import restore
    from cxlfork.workers.models import smollm2_gguf
    gguf = smollm2_gguf()
    req = {"prompt": "What is the capital of France?", "max_new_tokens": 16}
    res = {}
    for rep in range(reps):
        for mmap in ((False, True) if rep % 2 == 0 else (True, False)):
            with worker_checkpoint("cxlfork.workers.llm", {"mmap": mmap}, req) as \
                    (img, store, w, summ, cold_ms):
                w.stdin.write(json.dumps({"id": 1, "input": req}).encode() + b"\n")
                w.stdin.flush()
                t = time.perf_counter()
                ref = json.loads(w.stdout.readline())
                warm_ms = (time.perf_counter() - t) * 1e3
                ir, iw = os.pipe()
                orr, ow = os.pipe()
                t = time.perf_counter()
                pid = restore(img, policy="mow", n=1, stdio=(ir, ow, 2))[0]
                restore_ms = (time.perf_counter() - t) * 1e3
                os.close(ir)
                os.close(ow)
                try:
                    f0 = _minflt(pid)
                    ans, first_ms = _ask(iw, orr, req)
                    faults = _minflt(pid) - f0
                    local = local_memory(pid) + _mapped_rss(pid, gguf)
                finally:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    os.close(iw)
                    os.close(orr)
                same = ans["output"]["tokens"] == ref["output"]["tokens"]
                r = res.setdefault(mmap, {k: [] for k in ("cold", "ck_ms", "ck_mib", "restore",
                                                          "first", "faults", "warm", "local",
                                                          "same")})
                for k, v in (("cold", cold_ms), ("ck_ms", summ["total_s"] * 1e3),
                             ("ck_mib", summ["bytes"] / 2**20), ("restore", restore_ms),
                             ("first", first_ms), ("faults", faults), ("warm", warm_ms),
                             ("local", local / 2**20), ("same", same)):
                    r[k].append(v)
    print(f"\nLLM weights: anonymous (use_mmap false) vs mmapped GGUF; medians of {reps} "
          "(mow clone, 16 greedy tokens; local = anonymous + page-cache pages mapped)")
    cols = ["weights", "cold start ms", "checkpoint ms", "checkpoint MiB", "restore ms",
            "clone 1st req ms", "its minor faults", "warm req ms", "clone local MiB",
            "same tokens"]
    wd = [10] + [max(len(c), 9) for c in cols[1:]]
    print(row(cols, wd))
    for mmap, r in res.items():
        print(row(["mmap" if mmap else "anonymous"] +
                  [f"{np.median(r[k]):.1f}" for k in ("cold", "ck_ms", "ck_mib", "restore",
                                                      "first", "faults", "warm", "local")] +
                  [f"{sum(r['same'])}/{len(r['same'])}"], wd))


REAL_KINDS = (("cold", "cold", 0), ("restored mow", "mow", 0), ("lazy moa", "moa", 0),
              ("warm ghost", "mow", 1), ("ghost+prefault", "mow", 1), ("warm", "mow", 0))
REAL_FUNCS = {"llm": ('["python", "-m", "cxlfork.workers.llm"]',
                      {"prompt": "What is the capital of France?", "max_new_tokens": 16}),
              "embed": ('["python", "-m", "cxlfork.workers.embed"]',
                        {"texts": ["How do I bake bread at home?",
                                   "What is the way to make a loaf of bread?"]})}


OW_ACTION = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "tests", "progs", "ow_action.py")
# HTTP functions (protocol = "openwhisk", each instance in its own network namespace) beside
# the same LLM as a stdio worker, the baseline of the same run
HTTP_FUNCS = {
    "llm": REAL_FUNCS["llm"],
    "llm-ow": ('["python", "-m", "cxlfork.workers.http_action", "cxlfork.workers.llm"]',
               REAL_FUNCS["llm"][1], 'protocol = "openwhisk"\n'),
    "ow": (f'["python", "{OW_ACTION}"]', {"name": "bench"},
           'protocol = "openwhisk"\ninit = { name = "ow", main = "main", code = '
           '"def main(a):\\n    return {\'hello\': a.get(\'name\')}\\n" }\n')}
HTTP_KINDS = (("cold", "cold", 0), ("restored mow", "mow", 0), ("warm ghost", "mow", 2))


def real_model_starts(rounds: int = 8, fleet: int = 8, funcs=None, kinds=REAL_KINDS,
                      what: str = "real models") -> None:
    """The real LLM and embedder through the porter, per start kind: the end-to-end latency
    of the request that started the instance (cold: spawn + init; restored: mow, lazy moa,
    mow from a warm ghost; warm: an instance already up), the LLM's time to first token as
    the client sees it and its decode rate against the warm instance's, the local memory of
    one instance and of `fleet` instances started at once (porter-side smaps: anonymous
    bytes, plus the store pages they share)."""
    from cxlfork.porter.memory import process_memory
    res = {}
    for fn, (cmd, req, *extra) in (funcs or REAL_FUNCS).items():
        for kind, policy, ghosts in kinds:
            d = tempfile.mkdtemp(prefix="bench-real-")
            store = tempfile.mkdtemp(prefix="bench-real-store-", dir="/dev/shm")
            cfg = os.path.join(d, "porter.toml")
            warm = kind == "warm"
            with open(cfg, "w") as f:
                f.write(f'[porter]\nport = 0\nstore = "{store}"\nghost_pool = {ghosts}\n'
                        f'ghost_prefault = {"true" if kind == "ghost+prefault" else "false"}\n'
                        f'\n[functions.{fn}]\ncommand = {cmd}\npolicy = "{policy}"\n'
                        f'checkpoint_after = 2\nkeepalive_s = {60 if warm else 0.5}\n'
                        f'max_instances = {fleet}\nqueue_timeout_s = 60\ntimeout_s = 60\n'
                        + "".join(extra))
            with open(os.path.join(d, "porter.log"), "w") as err:
                p = subprocess.Popen([PY, "-m", "cxlfork", "porter", "--config", cfg],
                                     stdout=subprocess.PIPE, stderr=err, text=True)
            run = PorterRun.__new__(PorterRun)
            try:
                line = p.stdout.readline()
                if "listening on" not in line:
                    raise RuntimeError(f"porter did not start: {line}")
                run.port = int(line.rsplit(":", 1)[1])

                def invoke():
                    t = time.perf_counter()
                    code, out, start = run.request("POST", f"/functions/{fn}/invoke", req)
                    return code, out, start, (time.perf_counter() - t) * 1e3

                def idle():
                    return run.stats()["functions"][fn]["instances"] == 0

                for _ in range(3):                        # K = 2 invocations + checkpoint
                    invoke()
                t = time.monotonic()
                while policy != "cold" and not run.stats()["functions"][fn]["checkpoint"]["image"]:
                    if time.monotonic() - t > 120:
                        raise RuntimeError(f"{fn}: no checkpoint in 120 s")
                    time.sleep(0.2)
                want = "warm" if warm else ("cold" if policy == "cold" else "restored")
                if want == "restored":              # one start before the measured ones (each
                    t = time.monotonic()            # restored kind alike): with prefault it
                    while not idle() and time.monotonic() - t < 30:    # records the first-
                        time.sleep(0.1)             # request profile, the next ghosts use it
                    invoke()
                    t = time.monotonic()
                    while kind == "ghost+prefault" and time.monotonic() - t < 60:
                        st = run.stats()["functions"][fn]
                        g = st["ghosts"] or {}
                        if "first_request_pages" in st["checkpoint"] and \
                                g.get("idle") == g.get("size"):
                            break
                        time.sleep(0.2)
                r = res.setdefault((fn, kind), {"ms": [], "ttft": [], "rate": [], "mem": [],
                                                "fleet": None, "bad": 0})
                for _ in range(rounds):
                    t = time.monotonic()
                    while not warm and not idle() and time.monotonic() - t < 30:
                        time.sleep(0.1)
                    while ghosts and time.monotonic() - t < 30:   # a start from a full pool:
                        g = run.stats()["functions"][fn]["ghosts"] or {}  # the refill of the
                        if g.get("idle") == g.get("size"):       # last start is done, not
                            break                                # competing for the cores
                        time.sleep(0.1)
                    code, out, start, ms = invoke()
                    if code != 200 or start != want:
                        r["bad"] += 1
                        continue
                    r["ms"].append(ms)
                    if fn.startswith("llm"):
                        n, rate = len(out["tokens"]), out["tokens_per_s"]
                        r["ttft"].append(ms - ((n - 1) / rate * 1e3 if rate and n > 1 else 0))
                        r["rate"].append(rate)
                    pids = [i["pid"] for i in run.stats()["functions"][fn]["instance_list"]]
                    r["mem"].append(sum(process_memory(pid, store)[0] for pid in pids[:1]))
                # `fleet` instances at once (scale out from zero, or from the warm one)
                t = time.monotonic()
                while not warm and not idle() and time.monotonic() - t < 30:
                    time.sleep(0.1)
                with cf.ThreadPoolExecutor(fleet) as ex:
                    list(ex.map(lambda _: invoke(), range(fleet)))
                fst = run.stats()["functions"][fn]
                r["phases"] = fst["start_phases_ms"]     # porter side, all starts of the run
                insts = fst["instance_list"]
                mem = [process_memory(i["pid"], store) for i in insts]
                r["fleet"] = (len(insts), sum(m[0] for m in mem), max((m[1] for m in mem),
                                                                       default=0))
            finally:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                shutil.rmtree(d, ignore_errors=True)
                shutil.rmtree(store, ignore_errors=True)
            print(f"  ran {fn} {kind}", file=sys.stderr, flush=True)
    print(f"\n{what} through the porter, per start kind ({rounds} starts each; K = 2; "
          f"llm 16 greedy tokens, embed 2 texts): latency of the request that started the "
          f"instance, p50 / p99 ms; LLM time to first token seen by the client and decode "
          f"rate against warm; local MiB of one instance; {fleet} instances started at once: "
          "how many came up, their local MiB in all, the store MiB one maps")
    cols = ["function", "start kind", "n", "p50 ms", "p99 ms", "TTFT p50 ms", "tok/s p50",
            "tok/s vs warm", "local MiB", f"{fleet} inst: n / local MiB / shared MiB"]
    wd = [8, 14, 3, 9, 9, 11, 9, 13, 9, 36]
    print(row(cols, wd))
    for (fn, kind), r in res.items():
        warm_rate = res.get((fn, "warm"), {}).get("rate")
        rate = f"{np.median(r['rate']):.1f}" if r["rate"] else "-"
        vs = (f"{np.median(r['rate']) / np.median(warm_rate):.2f}x"
              if r["rate"] and warm_rate else "-")
        fl = r["fleet"]
        print(row([fn, kind, len(r["ms"]),
                   f"{pct(r['ms'], 50):.1f}" if r["ms"] else "-",
                   f"{pct(r['ms'], 99):.1f}" if r["ms"] else "-",
                   f"{np.median(r['ttft']):.1f}" if r["ttft"] else "-", rate, vs,
                   f"{np.median(r['mem']) / 2**20:.1f}" if r["mem"] else "-",
                   f"{fl[0]} / {fl[1] / 2**20:.1f} / {fl[2] / 2**20:.1f}" if fl else "-"], wd))
        if r["bad"]:
            print(f"    ({r['bad']} starts were not of this kind or failed)")
    for fn in dict.fromkeys(f for f, _ in res):
        c = res.get((fn, "cold"))
        if not (c and c["ms"]):
            continue
        for kind, _, _ in kinds:
            rs = res.get((fn, kind))
            if kind == "cold" or not (rs and rs["ms"]):
                continue
            what = "the cap (no start at all)" if kind == "warm" else "goal 10x"
            ttft = (f"; TTFT p50 {np.median(c['ttft']):.1f} vs {np.median(rs['ttft']):.1f} ms "
                    f"({np.median(c['ttft']) / np.median(rs['ttft']):.1f}x)"
                    if c["ttft"] and rs["ttft"] else "")
            print(f"{fn}: starting request cold vs {kind}: p50 {pct(c['ms'], 50):.1f} vs "
                  f"{pct(rs['ms'], 50):.1f} ms ({pct(c['ms'], 50) / pct(rs['ms'], 50):.1f}x), "
                  f"p99 {pct(c['ms'], 99):.1f} vs {pct(rs['ms'], 99):.1f} ms "
                  f"({pct(c['ms'], 99) / pct(rs['ms'], 99):.1f}x, {what}){ttft}")
        w = res.get((fn, "warm"))
        if w and w["ms"]:                   # what a start adds to the request itself
            base = pct(w["ms"], 50)
            for kind, _, _ in kinds:
                rs = res.get((fn, kind))
                if kind in ("cold", "warm") or not (rs and rs["ms"]):
                    continue
                add_c, add_r = pct(c["ms"], 50) - base, pct(rs["ms"], 50) - base
                print(f"{fn}: p50 added over a warm request: cold {add_c:.1f} ms, {kind} "
                      f"{add_r:.1f} ms" + (f" ({add_c / add_r:.0f}x less)" if add_r > 0 else
                                           " (within the warm request's spread)"))
    print(f"load average {os.getloadavg()[0]:.1f}")
    return res


def http_starts(repeat: int = 3) -> None:
    """HTTP functions: the request that started a cold or a restored (mow) instance of an
    OpenWhisk action (the LLM through http_action, the stdlib test action) and of the stdio
    LLM, `repeat` runs of 6 starts each (a run's table each; the medians over runs are the
    figures)."""
    runs = [real_model_starts(rounds=6, fleet=2, funcs=HTTP_FUNCS, kinds=HTTP_KINDS,
                              what=f"HTTP functions (run {i + 1} of {repeat})")
            for i in range(repeat)]
    print(f"\nHTTP functions, medians over {repeat} runs of the per-run p50 / p99 of the "
          "request that started the instance (ms), and cold / restored")
    for fn in HTTP_FUNCS:
        med = {}
        for kind, _, _ in HTTP_KINDS:
            xs = [r[(fn, kind)]["ms"] for r in runs if r.get((fn, kind), {}).get("ms")]
            med[kind] = (float(np.median([pct(x, 50) for x in xs])),
                         float(np.median([pct(x, 99) for x in xs]))) if xs else None
        c = med["cold"]
        cells = [f"cold {c[0]:7.1f} / {c[1]:7.1f}" if c else "cold -"]
        for kind, _, _ in HTTP_KINDS[1:]:
            m = med[kind]
            cells.append(f"{kind} {m[0]:7.1f} / {m[1]:7.1f} (cold / it: p50 {c[0] / m[0]:.1f}x,"
                         f" p99 {c[1] / m[1]:.1f}x)" if m and c else f"{kind} -")
        print(f"  {fn:7s} " + "   ".join(cells))
    print("\ninside the porter (/stats start_phases_ms), medians over the runs of p50 / p99 ms: "
          "cold spawn_init (spawn, listen, /init); restored restore + connect (to the clone's "
          "listener); first_request")
    for fn in HTTP_FUNCS:
        cells = []
        for kind, kk, phs in (("cold", "cold", ("spawn_init", "first_request")),
                              ("restored mow", "restored", ("restore", "connect",
                                                            "first_request")),
                              ("warm ghost", "restored", ("restore", "connect",
                                                          "first_request"))):
            for ph in phs:
                xs = [r[(fn, kind)]["phases"][kk].get(ph) for r in runs
                      if r.get((fn, kind), {}).get("phases")]
                xs = [x for x in xs if x and x["n"]]
                cells.append(f"{kind} {ph} " + (f"{np.median([x['p50'] for x in xs]):.1f} / "
                                              f"{np.median([x['p99'] for x in xs]):.1f}"
                                              if xs else "-"))
        print(f"  {fn:7s} " + "; ".join(cells))


# -- tables ------------------------------------------------------------------------------
def row(cells, widths):
    return " | ".join(str(c).rjust(w) for c, w in zip(cells, widths))


def print_tables(rows):
    cols = ["mode", "local limit", "requests", "ok", "cold/restored/warm", "p50 ms", "p99 ms",
            "start p50 ms", "start p99 ms", "local MiB mean", "local MiB peak",
            "shared MiB mean", "cgroup MiB mean/peak", "OOM kills"]
    w = [max(len(c), 8) for c in cols]
    print(row(cols, w))
    for r in rows:
        lim = f"{r['limit']:.0f} MiB" if r["limit"] else "none"
        k = r["kinds"]
        print(row([r["mode"], lim, r["n"], r["ok"], f"{k['cold']}/{k['restored']}/{k['warm']}",
                   f"{r['p50']:.1f}", f"{r['p99']:.1f}", f"{r['start_p50']:.1f}",
                   f"{r['start_p99']:.1f}", f"{r['local_mean']:.1f}",
                   f"{r['local_peak']:.1f}", f"{r['shared_mean']:.1f}",
                   f"{r['cgroup_mean']:.1f} / {r['cgroup_peak']:.1f}"
                   if r["cgroup_mean"] is not None else "-", r["oom_kills"]], w))
    print("\nper function: p50 / p99 ms of all invocations, p99 ms of those that started an "
          "instance (count)")
    cols = ["mode", "local limit"] + [f"{fn} p50/p99/start-p99 (n)" for fn in FUNCS]
    w = [9, 11] + [30] * len(FUNCS)
    print(row(cols, w))
    for r in rows:
        lim = f"{r['limit']:.0f} MiB" if r["limit"] else "none"
        cells = [r["mode"], lim]
        for fn in FUNCS:
            f = r["per_fn"][fn]
            cells.append(f"{f['p50']:.0f}/{f['p99']:.0f}/{f['start_p99']:.0f} ({f['starts']})")
        print(row(cells, w))
    print("\nLLM worker: time to first token seen by the client (latency minus the decode of "
          "the later tokens), p50 ms (count), and memory of one instance (max over samples)")
    cols = ["mode", "local limit", "TTFT cold start", "TTFT restored", "TTFT warm",
            "instance local MiB", "instance shared MiB"]
    w = [9, 11, 16, 16, 16, 20, 20]
    print(row(cols, w))
    for r in rows:
        lim = f"{r['limit']:.0f} MiB" if r["limit"] else "none"
        t = r["ttft"]
        mem = r["llm_inst"].get(policy_of(r["mode"])) or r["llm_inst"].get("cold") or (0, 0)
        if r["mode"] == "hybrid" and "hybrid" not in r["llm_inst"]:
            mem = r["llm_inst"].get("mow", mem)
        print(row([r["mode"], lim] + [f"{t[k][0]:.1f} ({t[k][1]})" for k in
                                       ("cold", "restored", "warm")] +
                  [f"{mem[0] / 2**20:.1f}", f"{mem[1] / 2**20:.1f}"], w))


def print_start_table(rows):
    print("\ninstance start inside the porter (cold: spawn + init; restored: cxlfork restore "
          "call), p50 / p99 ms (count of instances)")
    cols = ["mode", "local limit"] + [f"{fn} cold" for fn in FUNCS] + \
        [f"{fn} restored" for fn in FUNCS]
    w = [9, 11] + [20] * (2 * len(FUNCS))
    print(row(cols, w))
    for r in rows:
        lim = f"{r['limit']:.0f} MiB" if r["limit"] else "none"
        cells = [r["mode"], lim]
        for kind in ("cold", "restored"):
            for fn in FUNCS:
                d = r["porter_start_ms"].get(fn, {}).get(kind, {})
                cells.append(f"{d['p50']:.0f} / {d['p99']:.0f} ({d['n']})" if d.get("n")
                             else "-")
        print(row(cells, w))
    print("\nwhere an instance start's time goes inside the porter, all functions, p50 / p99 "
          "ms: queue (lock, admission, waiting for a slot), prepare (the planned restore "
          "looked up), restore (the cxlfork restore call) or spawn_init (cold), "
          "first_request (the request on the new instance)")
    cols = ["mode", "local limit", "starts"] + list(PHASES)
    w = [9, 11, 6] + [15] * len(PHASES)
    print(row(cols, w))
    for r in rows:
        lim = f"{r['limit']:.0f} MiB" if r["limit"] else "none"
        n = max(len(v) for v in r["phases"].values())
        print(row([r["mode"], lim, n] + [
            f"{pct(r['phases'][ph], 50):.1f} / {pct(r['phases'][ph], 99):.1f}"
            if r["phases"][ph] else "-" for ph in PHASES], w))


def print_first_request(rows):
    """The first request on a new restored LLM instance, per mode (mow-prefault: the warm
    ghosts filled their store page tables before the restore)."""
    print("\nfirst request on a restored LLM instance (porter side), ms: p50 / p99 (count)")
    for r in rows:
        xs = r["llm_first_request"]
        if xs:
            lim = f"{r['limit']:.0f} MiB" if r["limit"] else "none"
            print(f"  {r['mode']:>12} limit {lim:>8}: {pct(xs, 50):7.1f} / {pct(xs, 99):7.1f} "
                  f"({len(xs)})")


def burst(sizes=(200, 1000, 2000), reps: int = 3) -> None:
    """Connections answered / sent when N clients connect at once to one porter (C worker,
    4 instances, queue_timeout_s 30): the porter's listen backlog against socketserver's 5,
    measured in the same run by a porter whose HTTP server is patched back to 5."""
    import threading
    wc = __import__("cxlfork.workers.build_c", fromlist=["build"]).build()
    print("burst: N clients connect at once and send one request each; answered = any HTTP "
          f"answer (200 or 503); medians of {reps}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'clients':>8} | {'backlog 1024: answered/sent':>28} | {'backlog 5: answered/sent':>25}")
    for n in sizes:
        cells = []
        for backlog in (1024, 5):
            got = []
            for _ in range(reps):
                d = tempfile.mkdtemp(prefix="bench-burst-")
                cfg = os.path.join(d, "porter.toml")
                with open(cfg, "w") as f:
                    f.write(f'[porter]\nport = 0\n[functions.wc]\ncommand = ["{wc}"]\n'
                            'policy = "cold"\nmax_instances = 4\nqueue_timeout_s = 30\n')
                code = ("import sys, socketserver; from cxlfork.porter import server; "
                        f"server._Server.request_queue_size = {backlog}; "
                        "from cxlfork.cli import main; sys.argv[0] = 'cxlfork'; main()")
                p = subprocess.Popen([PY, "-c", code, "porter", "--config", cfg],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                port = int(p.stdout.readline().rsplit(":", 1)[1])
                answered, go = [], threading.Event()

                def one():
                    try:
                        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                        go.wait()
                        c.request("POST", "/functions/wc/invoke", body=b'"a b c"',
                                  headers={"Content-Type": "application/json"})
                        c.getresponse().read()
                        answered.append(1)
                        c.close()
                    except OSError:
                        pass
                ts = [threading.Thread(target=one) for _ in range(n)]
                for t in ts:
                    t.start()
                go.set()
                for t in ts:
                    t.join(180)
                p.terminate()
                p.wait(30)
                shutil.rmtree(d, ignore_errors=True)
                got.append(len(answered))
            cells.append(f"{statistics.median(got):.0f}/{n}")
        print(f"{n:>8} | {cells[0]:>28} | {cells[1]:>25}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0, help="trace seconds per run")
    ap.add_argument("--rate", type=float, default=5.0, help="mean arrivals per second")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2, help="runs per mode (pooled; the mode "
                    "order rotates between repetitions)")
    ap.add_argument("-k", type=int, default=4, help="invocations before the checkpoint")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--no-limited", action="store_true", help="skip the 25%% runs")
    ap.add_argument("--limit-mib", type=float, default=0,
                    help="local memory limit of the limited runs (default: 25%% of the peak "
                         "local memory of the unlimited cold run)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--sampling-only", action="store_true", help="only the table of the "
                    "memory sample's cost")
    ap.add_argument("--ghost-cost-only", action="store_true", help="only what an idle warm "
                    "LLM ghost holds, without and with prefault")
    ap.add_argument("--ghost-pool", type=int, default=2, help="ghosts per function in the "
                    "restore modes (mow-spawn: none)")
    ap.add_argument("--llm-placement-only", action="store_true", help="only the LLM "
                    "weights table: anonymous memory vs mmapped GGUF")
    ap.add_argument("--real-models-only", action="store_true", help="only the real LLM and "
                    "embedder per start kind")
    ap.add_argument("--real-funcs", default="", help="with --real-models-only: llm,embed "
                    "(default both)")
    ap.add_argument("--real-kinds", default="", help="with --real-models-only: start kinds, "
                    "comma-separated (default all)")
    ap.add_argument("--http-only", action="store_true", help="only the HTTP-function table "
                    "(OpenWhisk actions cold vs restored, beside the stdio LLM); --repeat runs")
    ap.add_argument("--trace-only", action="store_true", help="only the trace-driven "
                    "tables (not the sampling, ghost, real-model and HTTP tables after them)")
    ap.add_argument("--burst-only", action="store_true", help="only the connection-burst "
                    "table (answered / sent)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_porter: needs root (cxlfork checkpoint/restore)")
    # SIGTERM unwinds like Ctrl-C, so the running porter is stopped (no process left behind)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from cxlfork.workers.build_c import build
    wc = build()
    if a.burst_only:
        burst()
        return
    if a.real_models_only:
        fs = a.real_funcs.split(",") if a.real_funcs else list(REAL_FUNCS)
        ks = a.real_kinds.split(",") if a.real_kinds else [k for k, _, _ in REAL_KINDS]
        bad = [f for f in fs if f not in REAL_FUNCS] + \
            [k for k in ks if k not in [x for x, _, _ in REAL_KINDS]]
        if bad:
            sys.exit(f"bench_porter: unknown function or start kind {', '.join(bad)} "
                     f"(functions {', '.join(REAL_FUNCS)}; kinds "
                     f"{', '.join(k for k, _, _ in REAL_KINDS)})")
        real_model_starts(funcs={f: REAL_FUNCS[f] for f in fs},
                          kinds=tuple(next(x for x in REAL_KINDS if x[0] == k)
                                      for k in ks))      # in the order given (drift)
        return
    if a.http_only:
        http_starts(a.repeat)
        return
    if a.llm_placement_only:
        llm_weight_placement()
        return
    if a.sampling_only:
        sampling_cost()
        return
    if a.ghost_cost_only:
        ghost_cost()
        return
    modes = a.modes.split(",")
    trace = azure_like_trace(a.duration, a.rate, a.seed)
    counts = {fn: sum(f == fn for _, f in trace) for fn in FUNCS}
    print(f"trace: {len(trace)} arrivals in {a.duration:g} s (seed {a.seed}; "
          f"{', '.join(f'{k} {v}' for k, v in counts.items())}); keep-alive 1.5 s, "
          f"K = {a.k}, max 4 instances per function, ghost pool {a.ghost_pool}; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    t0 = time.monotonic()
    raw: dict = {}

    def add(key, limit, data):
        r = raw.setdefault(key, {"limit": limit, "results": [], "samples": [], "starts": [],
                                 "ooms": []})
        for k in ("results", "samples", "starts", "ooms"):
            r[k] += data[k]

    limit = None
    failed: list[str] = []
    for rep in range(a.repeat):
        order = modes[rep % len(modes):] + modes[:rep % len(modes)]    # rotate against drift
        for m in order:
            add((m, False), 0, run_mode(m, 0, trace, wc, a.k, a.ghost_pool))
            print(f"  rep {rep + 1}: ran {m}: {time.monotonic() - t0:.0f} s", file=sys.stderr,
                  flush=True)
        if a.no_limited:
            continue
        if limit is None:
            base = raw.get(("cold", False)) or raw[(modes[0], False)]
            peak = max(smp["porter"]["local_memory_bytes"] for smp in base["samples"]) / 2**20
            limit = a.limit_mib or round(0.25 * peak, 1)
        for m in order:
            try:
                add((m, True), limit, run_mode(m, limit, trace, wc, a.k, a.ghost_pool))
            except RuntimeError as e:         # e.g. the LLM cannot even warm up under it
                failed.append(f"{m} limited to {limit:.0f} MiB (rep {rep + 1}): {e}")
                print(f"  rep {rep + 1}: {m} limited: no run: {e}", file=sys.stderr,
                      flush=True)
                continue
            print(f"  rep {rep + 1}: ran {m} limited: {time.monotonic() - t0:.0f} s",
                  file=sys.stderr, flush=True)
    rows = [summarise(m, raw[(m, lim)]["limit"], raw[(m, lim)]["results"],
                      raw[(m, lim)]["samples"], raw[(m, lim)]["starts"], raw[(m, lim)]["ooms"])
            for lim in (False, True) for m in modes if (m, lim) in raw]
    print()
    for f in failed:
        print(f"not measured: {f}")
    print_tables(rows)
    print_start_table(rows)
    print_first_request(rows)
    if not a.trace_only:
        sampling_cost()
        ghost_cost()
        real_model_starts()
        http_starts(1)
    print(f"\nload average after the runs {os.getloadavg()[0]:.1f}; total "
          f"{time.monotonic() - t0:.0f} s")
    unl = {r["mode"]: r for r in rows if not r["limit"]}
    if "cold" in unl:
        for m in ("mow", "mow-spawn", "hybrid", "moa", "moa-eager"):
            if m in unl:
                print(f"goal: restored-start p99 {m} {unl[m]['start_p99']:.1f} ms vs cold-start "
                      f"p99 {unl['cold']['start_p99']:.1f} ms: "
                      f"{unl['cold']['start_p99'] / unl[m]['start_p99']:.1f}x lower (goal 10x)")
    if "cold" in unl:
        c = unl["cold"]["porter_start_ms"]["llm"]["cold"]
        for m in ("mow", "mow-spawn", "hybrid", "moa", "moa-eager"):
            if m in unl:
                r = unl[m]["porter_start_ms"]["llm"]["restored"]
                print(f"goal: LLM instance start inside the porter, p99: restore ({m}) "
                      f"{r['p99']:.1f} ms vs cold start {c['p99']:.1f} ms: "
                      f"{c['p99'] / r['p99']:.1f}x lower (p50 {r['p50']:.1f} vs "
                      f"{c['p50']:.1f} ms)")
    if "moa-eager" in unl:
        for m in ("mow", "hybrid", "moa"):
            if m in unl:
                print(f"goal: mean local memory {m} {unl[m]['local_mean']:.1f} MiB vs copying "
                      f"restore (moa-eager) {unl['moa-eager']['local_mean']:.1f} MiB")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

"""Where a restored instance's first request spends its time, and what removes it.

The LLM worker (SmolLM2-135M on llama.cpp) and the embedder (all-MiniLM-L6-v2) are started,
given one warm request and checkpointed into a store in /dev/shm. Then, per restore variant,
`--clones` clones one after another; each gets the same request three times over its pipes.
Measured per clone: the restore call, each request end to end (client side), the clone's
minor page faults during it (/proc/PID/stat), the faults cxlfork's userfaultfd handler served
(lazy_stats), what its smaps gained (store pages newly mapped; store pages copied on write;
new anonymous pages elsewhere) and, for the LLM, the worker's own split (chat template +
tokenizer, prompt evaluation, decode). Side by side in the same run: the original's warm
request (the floor a clone can reach).

    variants   spawned          mow, the restorer spawned by the restore
               warm ghost       mow into a warm ghost (memory part of the plan run ahead)
               ghost+prefault   the warm ghost also filled its store page tables read-only
                                (MADV_POPULATE_READ)
               ghost+hot        the ghost also copied the store pages earlier clones' first
                                request wrote, and populated the anonymous pages it touched
                                outside the store (a first-request write profile)

    .venv/bin/python bench/bench_first_request.py [--clones 5] [--workers llm,embed]

Needs root. Everything it makes (workers, clones, stores) is removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from bench_porter import _ask, _minflt, row, worker_checkpoint  # noqa: E402
from cxlfork.firstreq import FIRST  # noqa: E402

REQ = {"llm": ("cxlfork.workers.llm",
               {"prompt": "What is the capital of France?", "max_new_tokens": 16}),
       "embed": ("cxlfork.workers.embed",
                 {"texts": ["How do I bake bread at home?",
                            "What is the way to make a loaf of bread?"]})}
VARIANTS = ("spawned", "warm ghost", "ghost+prefault", "ghost+hot")


def smaps_split(pid: int, store: str) -> tuple[int, int, int]:
    """(store pages mapped, not copied; store pages copied on write; anonymous pages outside
    the store mappings), bytes."""
    mapped = cow = anon = 0
    in_store = False
    rss = 0
    with open(f"/proc/{pid}/smaps", "rb") as f:
        for ln in f:
            head = ln.split(b" ", 1)[0]
            if b"-" in head and not ln.rstrip().endswith(b"kB"):
                parts = ln.split(None, 5)
                in_store = len(parts) > 5 and parts[5].startswith(store.encode())
            elif ln.startswith(b"Rss:"):
                rss = int(ln.split()[1]) * 1024
            elif ln.startswith(b"Anonymous:"):
                a = int(ln.split()[1]) * 1024
                if in_store:
                    mapped += rss - a
                    cow += a
                else:
                    anon += a
    return mapped, cow, anon


def cpu_ms(pid: int) -> float:
    """CPU time PID's threads have run so far, ms (/proc/PID/task/*/schedstat: on-CPU ns):
    what a request costs the CPU whatever the load, where wall time on this shared machine
    also counts the time spent waiting for a core."""
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 1e6


def one_clone(p, pool, store: str, req: dict) -> dict:
    from cxlfork.restore import lazy_stats
    ir, iw = os.pipe()
    orr, ow = os.pipe()
    t = time.perf_counter()
    pid = p.restore(1, stdio=(ir, ow, 2), ghosts=pool)[0]
    out = {"restore": (time.perf_counter() - t) * 1e3}
    os.close(ir)
    os.close(ow)
    try:
        for k in range(3):
            m0, f0, u0 = smaps_split(pid, store), _minflt(pid), lazy_stats()["faults"]
            c0 = cpu_ms(pid)
            ans, ms = _ask(iw, orr, req)
            cpu = cpu_ms(pid) - c0
            if "output" not in ans:
                raise RuntimeError(f"clone {pid} answered {ans}")
            m1, f1, u1 = smaps_split(pid, store), _minflt(pid), lazy_stats()["faults"]
            out[k] = {"ms": ms, "cpu": cpu, "faults": f1 - f0, "uffd": u1 - u0,
                      "mapped": m1[0] - m0[0], "cow": m1[1] - m0[1], "anon": m1[2] - m0[2],
                      "out": ans["output"]}
        if pool is not None:
            out["hot"] = pid
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(iw)
        os.close(orr)
    return out


def record_first_request(img: str, p, store: str, req: dict) -> dict:
    """Restore one mow clone, give it the request once, record which store pages it wrote and
    which anonymous pages it touched outside the store (cxlfork.profile.record_written)."""
    from cxlfork.firstreq import record as record_written
    ir, iw = os.pipe()
    orr, ow = os.pipe()
    pid = p.restore(1, stdio=(ir, ow, 2))[0]
    os.close(ir)
    os.close(ow)
    try:
        _ask(iw, orr, req)
        return record_written(img, [pid])
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(iw)
        os.close(orr)


def measure(worker: str, clones: int) -> tuple[dict, list[float], dict]:
    from cxlfork.ghosts import GhostPool
    from cxlfork.restore import prepare_restore
    module, req = REQ[worker]
    res = {v: [] for v in VARIANTS}
    with worker_checkpoint(module, {}, req) as (img, store, w, summ, cold_ms):
        warm, warm_cpu = [], []
        for _ in range(clones):
            t, c0 = time.perf_counter(), cpu_ms(w.pid)
            w.stdin.write(json.dumps({"id": 1, "input": req}).encode() + b"\n")
            w.stdin.flush()
            ref = json.loads(w.stdout.readline())
            warm.append((time.perf_counter() - t) * 1e3)
            warm_cpu.append(cpu_ms(w.pid) - c0)
        with prepare_restore(img, "mow") as p:
            prof = record_first_request(img, p, store, req)
        first, off = os.path.join(img, FIRST), os.path.join(img, FIRST + ".off")
        os.rename(first, off)               # read by prepare_restore: only for ghost+hot
        for rnd in range(clones):           # variants interleaved, against drift
            for v in VARIANTS:
                if v == "ghost+hot":
                    os.rename(off, first)
                try:
                    p = prepare_restore(img, "mow")
                finally:
                    if v == "ghost+hot":
                        os.rename(first, off)
                with p:
                    pool = None if v == "spawned" else GhostPool(
                        1, refill="manual", prepared=p, prefault=v != "warm ghost")
                    try:
                        if pool is not None:
                            time.sleep(0.05)    # the ghost is idle, as in a pool
                        r = one_clone(p, pool, store, req)
                    finally:
                        if pool is not None:
                            pool.close()
                r["same"] = r[0]["out"].get("tokens", r[0]["out"].get("embeddings")) == \
                    ref["output"].get("tokens", ref["output"].get("embeddings"))
                res[v].append(r)
        info = {"warm_cpu": warm_cpu, "cold_ms": cold_ms, "ckpt_mib": summ["bytes"] / 2**20, "profile": prof,
                "ref": ref["output"]}
    return res, warm, info


def report(worker: str, res: dict, warm: list[float], info: dict) -> None:
    med = lambda xs: float(np.median(xs))   # noqa: E731
    prof = info["profile"]
    print(f"\n{worker}: cold start {info['cold_ms']:.0f} ms, checkpoint "
          f"{info['ckpt_mib']:.1f} MiB; first-request profile: {prof['written_pages']} store "
          f"pages written, {prof['zero_pages']} anonymous pages outside the store touched; "
          f"original's warm request {med(warm):.1f} ms, {med(info['warm_cpu']):.1f} ms on CPU "
          f"(median of {len(warm)})")
    cols = ["variant", "restore ms", "1st req ms", "2nd req ms", "3rd req ms", "1st-warm ms",
            "1st CPU ms", "2nd CPU ms", "1st-warm CPU ms",
            "1st faults", "uffd faults", "store MiB mapped", "CoW MiB", "new anon MiB",
            "same answer"]
    wd = [14] + [max(len(c), 8) for c in cols[1:]]
    print(row(cols, wd))
    for v, rs in res.items():
        if not rs:
            continue
        first = [r[0] for r in rs]
        print(row([v, f"{med([r['restore'] for r in rs]):.1f}",
                   f"{med([f['ms'] for f in first]):.1f}",
                   f"{med([r[1]['ms'] for r in rs]):.1f}",
                   f"{med([r[2]['ms'] for r in rs]):.1f}",
                   f"{med([f['ms'] for f in first]) - med(warm):.1f}",
                   f"{med([f['cpu'] for f in first]):.1f}",
                   f"{med([r[1]['cpu'] for r in rs]):.1f}",
                   f"{med([f['cpu'] for f in first]) - med(info['warm_cpu']):.1f}",
                   f"{med([f['faults'] for f in first]):.0f}",
                   f"{med([f['uffd'] for f in first]):.0f}",
                   f"{med([f['mapped'] for f in first]) / 2**20:.1f}",
                   f"{med([f['cow'] for f in first]) / 2**20:.1f}",
                   f"{med([f['anon'] for f in first]) / 2**20:.1f}",
                   f"{sum(r['same'] for r in rs)}/{len(rs)}"], wd))
    if worker == "llm":
        print("  LLM worker's own split of the request, median ms (template+tokenize / "
              "prompt eval / decode), 1st request of a clone and the original's warm one:")
        for v, rs in res.items():
            ts = [r[0]["out"]["timing_ms"] for r in rs]
            print(f"    {v:>14}: " + " / ".join(
                f"{med([t[k] for t in ts]):.1f}" for k in ("template_tokenize", "prompt_eval",
                                                           "decode")))
        t = info["ref"]["timing_ms"]
        print(f"    {'original warm':>14}: {t['template_tokenize']:.1f} / "
              f"{t['prompt_eval']:.1f} / {t['decode']:.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clones", type=int, default=5, help="clones per variant")
    ap.add_argument("--workers", default="llm,embed")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_first_request: needs root (cxlfork checkpoint/restore)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ws = a.workers.split(",")
    bad = [w for w in ws if w not in REQ]
    if bad or a.clones < 1:
        sys.exit(f"bench_first_request: workers are {', '.join(REQ)}; clones >= 1")
    print(f"first request of restored clones, {a.clones} clones per variant, medians; load "
          f"average {os.getloadavg()[0]:.1f}", flush=True)
    for w in ws:
        report(w, *measure(w, a.clones))
    print(f"\nload average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

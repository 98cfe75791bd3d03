"""Memory-access traces of real programs, captured under valgrind lackey, for bench_policies.

    python -m emulation.realtraces [--only NAME,...] [--cache DIR] [--list]   (make traces)

Each program is an unmodified Debian binary doing a real job (a recipe here only sets up its
input and, for a server, its load generator):

  redis      redis-server (jemalloc, its dict, 256 B values) under redis-benchmark over a
             unix socket: SET on 8k random keys, then GET/SET on a hot 800-key subset
             (a cache whose hot keys are scattered over the heap); the server is traced,
             the load generator runs natively.
  sqlite     sqlite3 on an in-memory database: a 12k-row table with an index, then a query
             mix (point lookups by key and by indexed name, updates, short range scans)
             over Pareto-skewed keys; the SQL is generated from a fixed seed.
  gcc        cc1 (gcc's compiler proper) at -O2 on this project's own
             cxlfork/native/hash.c (preprocessed natively first: 60 ms native, 32 MB).
  python     Debian's /usr/bin/python3 -S running emulation/programs/pybench.py (objects in
             a dict, skewed lookups, JSON round trips, sorting).

Traces are cached as DIR/NAME-vN-sS.npz (DIR: $TIERMEM_TRACE_CACHE, default
/var/cache/tiermem/traces; N = the recipe's version, S = 1 in S accesses kept) and captured
when missing; lackey runs a program ~2000x slower than native here, so each capture takes
minutes (the first bench run pays for it once); a run past MAX_ACCESSES data accesses is
traced as that prefix. A missing program is a clear error naming the Debian package.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from tiermem import trace as tracefmt
from tiermem.errors import TiermemError
from tiermem.trace_capture import capture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("TIERMEM_TRACE_CACHE", "/var/cache/tiermem/traces")
SAMPLE_EVERY = 8
# a run longer than this many data accesses is traced as its prefix (the program is stopped
# there; meta stopped_at_accesses): at 20-50 k accesses/s under lackey on a loaded machine
MAX_ACCESSES = 80_000_000


def _need(prog: str, package: str) -> str:
    path = shutil.which(prog)
    if not path:
        raise TiermemError(f"real trace: {prog} not found (Debian: apt-get install {package})")
    return path


def _sqlite_sql(path: str, rows: int = 12000, queries: int = 3000, seed: int = 7) -> None:
    rnd = random.Random(seed)
    out = ["PRAGMA cache_size=-65536;",
           "CREATE TABLE kv(k INTEGER PRIMARY KEY, name TEXT, v BLOB, n INTEGER);",
           f"WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM c WHERE i<{rows}) "
           f"INSERT INTO kv SELECT i, 'user'||(i*7919%{rows}), randomblob(96), i%97 FROM c;",
           "CREATE INDEX kv_name ON kv(name);"]
    for _ in range(queries):
        # Pareto-skewed keys, scattered over the table (a multiplicative permutation)
        k = 1 + (min(rows, int(rnd.paretovariate(1.2) * 3)) * 7919) % rows
        r = rnd.random()
        if r < 0.6:
            out.append(f"SELECT length(v) FROM kv WHERE k={k};")
        elif r < 0.8:
            out.append(f"SELECT k FROM kv WHERE name='user{k * 7919 % rows}';")
        elif r < 0.95:
            out.append(f"UPDATE kv SET n=n+1 WHERE k={k};")
        else:
            out.append(f"SELECT sum(n) FROM kv WHERE k BETWEEN {k} AND {k + 50};")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def _capture(cmd, every, progress):
    return capture(cmd, sample_every=every, stdout=subprocess.DEVNULL, progress=progress,
                   follow_exec=False, max_accesses=MAX_ACCESSES)


def sqlite(tmp: str, every: int, progress):
    exe = _need("sqlite3", "sqlite3")
    sql = os.path.join(tmp, "mix.sql")
    _sqlite_sql(sql)
    return _capture([exe, ":memory:", f".read {sql}"], every, progress)


def gcc(tmp: str, every: int, progress):
    _need("gcc", "gcc")
    cc1 = subprocess.run(["gcc", "-print-prog-name=cc1"], capture_output=True, text=True,
                         check=True).stdout.strip()
    if not os.path.isfile(cc1):
        raise TiermemError(f"real trace: gcc's cc1 not found ({cc1!r}; apt-get install gcc)")
    src = os.path.join(ROOT, "cxlfork", "native", "hash.c")
    pre = os.path.join(tmp, "hash.i")
    subprocess.run(["gcc", "-E", "-o", pre, src], check=True)
    return _capture([cc1, "-fpreprocessed", "-quiet", "-O2", pre, "-o", os.devnull],
                    every, progress)


def python(tmp: str, every: int, progress):
    exe = "/usr/bin/python3"
    if not os.access(exe, os.X_OK):
        raise TiermemError("real trace: /usr/bin/python3 not found (apt-get install python3)")
    return _capture([exe, "-S", "-E", os.path.join(ROOT, "emulation", "programs",
                                                    "pybench.py")], every, progress)


def redis(tmp: str, every: int, progress):
    server = _need("redis-server", "redis-server")
    bench = _need("redis-benchmark", "redis-tools")
    cli = _need("redis-cli", "redis-tools")
    sock = os.path.join(tmp, "redis.sock")
    box: dict = {}

    def run():
        try:
            box["trace"] = _capture([server, "--port", "0", "--unixsocket", sock,
                                     "--save", "", "--appendonly", "no", "--daemonize", "no",
                                     "--loglevel", "warning", "--dir", tmp], every, progress)
        except BaseException as e:          # noqa: BLE001 - handed to the caller below
            box["error"] = e
    th = threading.Thread(target=run, daemon=True)
    th.start()
    end = time.monotonic() + 3600          # its start-up alone is ~7 M accesses
    while not os.path.exists(sock):
        if not th.is_alive() or time.monotonic() > end:
            th.join(5)
            raise TiermemError(f"real trace: redis-server did not open {sock}: "
                               f"{box.get('error', 'timed out')}")
        time.sleep(0.5)
    try:
        for args in (["-n", "8000", "-r", "8000", "-t", "set"],
                     ["-n", "8000", "-r", "800", "-t", "get,set"]):
            r = subprocess.run([bench, "-s", sock, "-d", "256", "-P", "16", "-q", *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=3600)
            if r.returncode != 0:
                th.join(60)                   # the capture stopped the server at its cap
                if th.is_alive() or "trace" not in box:
                    raise TiermemError(f"real trace: redis-benchmark {' '.join(args)} failed "
                                       f"(status {r.returncode})")
                break
    finally:
        if th.is_alive():
            subprocess.run([cli, "-s", sock, "shutdown", "nosave"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
        th.join(600)
    if "error" in box:
        raise box["error"]
    return box["trace"]


# name: (recipe, version: bump when the recipe changes, so a cached trace is captured anew)
PROGRAMS = {"redis": (redis, 1), "sqlite": (sqlite, 1), "gcc": (gcc, 1), "python": (python, 1)}


def trace_path(name: str, cache: str = CACHE, every: int = SAMPLE_EVERY) -> str:
    return os.path.join(cache, f"{name}-v{PROGRAMS[name][1]}-s{every}.npz")


def real_trace(name: str, cache: str = CACHE, every: int = SAMPLE_EVERY, log=None):
    """The cached trace of program ``name``, captured first when missing."""
    if name not in PROGRAMS:
        raise TiermemError(f"real trace: unknown program {name!r} (known: {', '.join(PROGRAMS)})")
    path = trace_path(name, cache, every)
    if os.path.exists(path):
        return tracefmt.load(path)
    os.makedirs(cache, exist_ok=True)
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    t0 = time.monotonic()
    last = [t0]

    def progress(seen, kept):
        now = time.monotonic()
        if now - last[0] >= 30:
            last[0] = now
            log(f"  {name}: {seen / 1e6:.1f} M accesses seen, {kept / 1e6:.2f} M kept, "
                f"{now - t0:.0f} s")
    log(f"capturing {name} under valgrind lackey (1 in {every} accesses kept)...")
    with tempfile.TemporaryDirectory(prefix=f"tiermem-{name}-") as tmp:
        tr = PROGRAMS[name][0](tmp, every, progress)
    tr.meta["program"] = name
    tr.save(path)
    log(f"  {name}: {len(tr)} accesses kept of {tr.meta.get('data_accesses')}, "
        f"{tr.n_pages} pages, {time.monotonic() - t0:.0f} s -> {path}")
    return tr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated programs (default: all)")
    ap.add_argument("--cache", default=CACHE)
    ap.add_argument("--list", action="store_true", help="show the cached traces and stop")
    a = ap.parse_args()
    names = a.only.split(",") if a.only else list(PROGRAMS)
    try:
        for n in names:
            if a.list:
                p = trace_path(n, a.cache) if n in PROGRAMS else n
                print(f"{n:8} {'cached' if os.path.exists(p) else 'missing':8} {p}")
            else:
                real_trace(n, a.cache)
    except TiermemError as e:
        sys.exit(f"realtraces: error: {e}")


if __name__ == "__main__":
    main()

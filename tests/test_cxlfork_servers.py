"""Real servers end to end (issue 13 part 5): redis-server and memcached, started fresh, loaded
with 20k keys, checkpointed while they keep running (`--leave-running`) and cloned twice, each
clone in a network namespace of its own (reached with cxlfork.state.netns.connect), under
mow, lazy moa and eager moa (redis also hybrid after a `cxlfork profile` of a clone serving
GETs, with --pidns new, and into warm ghosts through the API; memcached also with
--pidns new and into warm ghosts). Each clone answers GET with the original's data, takes its own writes, isolated from
the other clone and from the original, which keeps serving on the same port in our
namespace.

redis-server uses jemalloc, which relies on zeros after MADV_DONTNEED: one clone empties its
database (FLUSHALL SYNC), has jemalloc purge (MEMORY PURGE) and loads 20k new keys into the
reused memory, then checks every value and that the other clone and the original still hold
the old data (stale checkpointed bytes in memory jemalloc takes as zeroed would corrupt the
new hash tables: measured, a clone restored without the userfaultfd handler,
`prepare_restore(anon=False)`, dies there). The other clone forks for a BGSAVE and a new
redis-server loads what its child wrote: its data and its own writes. redis runs with its
bio threads and jemalloc's background thread, no persistence configured, io-threads 1 (the
default)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time

import pytest

from cxlfork_netutil import netns_of, new_port
from cxlfork_util import cxlfork, new_store, rmtree
from kvclient import Memcache, Resp

from cxlfork.state import netns

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
MEMCACHED = shutil.which("memcached") or "/usr/bin/memcached"
needs_redis = pytest.mark.skipif(not os.path.exists(REDIS), reason="no redis-server (make "
                                 "setup installs Debian's redis-server)")
needs_memcached = pytest.mark.skipif(not os.path.exists(MEMCACHED), reason="no memcached "
                                     "(make setup installs it)")
POLICIES = ["mow", "moa", "moa --eager"]
# the redis test also runs in a new PID namespace per clone (getpid() is then the PID redis
# cached at start; under --pidns host it differs, and redis tags its clone's log lines "C")
REDIS_MODES = [(p, 1) for p in POLICIES + ["hybrid"]] + [("mow --pidns new", 1), ("mow", 4),
                                                         ("moa", 4)]
NKEYS = 20000

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, namespaces)"),
]


def _value(i: int, tag: str = "v") -> bytes:
    return (f"{tag}:{i}:" + "x" * (i % 97)).encode()


def _keys(prefix: str = "key") -> list[bytes]:
    return [f"{prefix}:{i:05d}".encode() for i in range(NKEYS)]


@pytest.fixture(scope="module")
def env():
    d = tempfile.mkdtemp(prefix="cxlfork-srv-")
    s = new_store()
    yield d, s
    rmtree(d)
    rmtree(s)


def _connect(pid: int | None, port: int, timeout_s: float = 20.0):
    """A socket connected to 127.0.0.1:port in PID's namespace (None: ours), retrying while
    the server is not up yet."""
    import socket
    t_end = time.monotonic() + timeout_s
    while True:
        try:
            if pid is None:
                s = socket.create_connection(("127.0.0.1", port), timeout=20)
            else:
                s = netns.connect(pid, ("127.0.0.1", port), timeout=20)
            return s
        except (ConnectionRefusedError, ConnectionResetError):
            if time.monotonic() > t_end:
                raise
            time.sleep(0.05)


def _kill(pids) -> None:
    for p in pids:
        try:
            os.kill(p, 9)
        except ProcessLookupError:
            pass


def _restore_detached(img: str, mode: str, n: int = 2) -> list[int]:
    """n clones (mode: a policy and more restore options), detached; their PIDs."""
    r = cxlfork("restore", img, "--policy", *mode.split(), "-n", n, "--detach", "--json",
                "--stdio", "null")
    info = json.loads(r.stdout)
    pids = info["pids"]
    assert len({netns_of(p) for p in pids} | {netns_of(os.getpid())}) == n + 1
    return pids


# ---------------------------------------------------------------- redis-server

def _start_redis(d: str, port: int, rdb: str | None = None,
                 io_threads: int = 1) -> subprocess.Popen:
    """redis-server on 127.0.0.1:port, no persistence (BGSAVE on demand writes rdb, default
    dump-PORT.rdb in d; a server started with an existing rdb loads it)."""
    conf = os.path.join(d, f"redis-{port}.conf")
    with open(conf, "w") as f:
        f.write(f"port {port}\nbind 127.0.0.1\ndaemonize no\nsave \"\"\nappendonly no\n"
                f"dir {d}\ndbfilename {rdb or f'dump-{port}.rdb'}\nlogfile \"\"\n"
                f"protected-mode yes\nio-threads {io_threads}\nio-threads-do-reads yes\n"
                "enable-debug-command local\n"
                "jemalloc-bg-thread yes\nlazyfree-lazy-user-flush no\n")
    log = open(os.path.join(d, f"redis-{port}.log"), "w")
    p = subprocess.Popen([REDIS, conf], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                         close_fds=True)
    log.close()
    r = Resp(_connect(None, port))
    assert r.call("PING") == "PONG"
    r.close()
    return p


def _redis_load(r: Resp, prefix: str = "key", tag: str = "v") -> None:
    res = r.pipeline([("SET", k, _value(i, tag)) for i, k in enumerate(_keys(prefix))])
    assert res == ["OK"] * NKEYS


def _redis_check(r: Resp, prefix: str = "key", tag: str = "v") -> None:
    keys = _keys(prefix)
    got = r.call("MGET", *keys)
    bad = [k for i, (k, v) in enumerate(zip(keys, got)) if v != _value(i, tag)]
    assert not bad, f"{len(bad)} of {NKEYS} values wrong, e.g. {bad[:3]}"


def _busy_clients(pid: int, port: int, n: int = 16, rounds: int = 5) -> None:
    """n connections to the clone PID, each with a pipelined burst of GETs in flight at once
    (redis hands the writes to its I/O threads when at least 2 x io-threads clients wait for
    them: the bursts are sent while the main thread sleeps in DEBUG SLEEP), answers checked."""
    conns = [Resp(_connect(pid, port)) for _ in range(n)]
    sleeper = Resp(_connect(pid, port))
    keys = _keys()
    try:
        for r in range(rounds):
            want = [(i * 997 + r * 31) % NKEYS for i in range(n)]
            sleeper.sock.sendall(Resp.encode("DEBUG", "SLEEP", "0.1"))
            time.sleep(0.02)
            for c, i in zip(conns, want):
                c.sock.sendall(b"".join(Resp.encode("GET", keys[(i + j) % NKEYS])
                                        for j in range(50)))
            for c, i in zip(conns, want):
                got = [c.reply() for _ in range(50)]
                assert got == [_value((i + j) % NKEYS) for j in range(50)]
            assert sleeper.reply() == "OK"
    finally:
        for c in conns + [sleeper]:
            c.close()


@needs_redis
@pytest.mark.parametrize("mode,io_threads", REDIS_MODES)
def test_redis_cloned_twice(env, mode, io_threads):
    """mode: policy and restore options; io_threads: redis's io-threads (4: three I/O
    threads more, reading and writing for the main thread when many clients are busy)."""
    d, store = env
    port = new_port()
    orig = _start_redis(d, port, io_threads=io_threads)
    img = os.path.join(d, f"redis-{mode.replace(' ', '')}-{io_threads}.img")
    pids: list[int] = []
    check = None
    try:
        r = Resp(_connect(None, port))
        _redis_load(r)
        assert r.call("DBSIZE") == NKEYS
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store, "--leave-running")
        if mode == "hybrid":                  # record what a clone serving GETs touches
            pids = _restore_detached(img, "mow", 1)
            c = Resp(_connect(pids[0], port))
            _redis_check(c)
            c.close()
            prof = json.loads(cxlfork("profile", img, pids[0], "--json").stdout)
            assert 0 < prof["hot_pages"] < prof["pages"]
            _kill(pids)
        pids = _restore_detached(img, mode)
        clones = [Resp(_connect(p, port)) for p in pids]
        for c in clones:                      # the original's data
            assert c.call("PING") == "PONG"
            assert c.call("DBSIZE") == NKEYS
            _redis_check(c)
        if io_threads > 1:                    # make the clones' I/O threads work
            for p, c in zip(pids, clones):
                for _ in range(4):            # a loaded machine may spread the bursts
                    _busy_clients(p, port)
                    st = c.call("INFO", "stats").decode()
                    n = int(next(x for x in st.split() if x.startswith(
                        "io_threaded_writes_processed:")).split(":")[1])
                    if n:
                        break
                assert n > 0, "no write went through an I/O thread"
        # each one's own writes, isolated from the others
        for name, c in zip(("orig", "a", "b"), [r] + clones):
            assert c.call("SET", "key:00000", f"written by {name}") == "OK"
            assert c.call("INCRBY", "counter", len(name) + 1) == len(name) + 1
            assert c.call("SET", f"only:{name}", name) == "OK"
        for name, c in zip(("orig", "a", "b"), [r] + clones):
            assert c.call("GET", "key:00000") == f"written by {name}".encode()
            assert c.call("GET", "counter") == str(len(name) + 1).encode()
            assert [c.call("EXISTS", f"only:{o}") for o in ("orig", "a", "b")] == \
                [int(o == name) for o in ("orig", "a", "b")]
            assert c.call("DBSIZE") == NKEYS + 2
        # clone a drops everything, jemalloc purges (MADV_DONTNEED), new data in that memory
        a, b = clones
        assert a.call("FLUSHALL", "SYNC") == "OK"
        assert a.call("MEMORY", "PURGE") == "OK"
        assert a.call("DBSIZE") == 0
        _redis_load(a, "new", "n")
        _redis_check(a, "new", "n")
        assert a.call("DBSIZE") == NKEYS
        assert a.call("GET", "key:00001") is None
        for c in (b, r):                      # untouched by a
            assert c.call("DBSIZE") == NKEYS + 2
            assert c.call("GET", "new:00001") is None
            assert c.call("GET", "key:00001") == _value(1)
        # clone b forks for a BGSAVE (its store-mapped memory registered with the handler:
        # the child gets its own table); a new server loads what the child wrote
        assert b.call("BGSAVE") == "Background saving started"
        t_end = time.monotonic() + 60
        while b"rdb_bgsave_in_progress:1" in b.call("INFO", "persistence"):
            assert time.monotonic() < t_end
            time.sleep(0.05)
        assert b"rdb_last_bgsave_status:ok" in b.call("INFO", "persistence")
        port2 = new_port()
        check = _start_redis(d, port2, rdb=f"dump-{port}.rdb")
        k = Resp(_connect(None, port2))
        assert k.call("DBSIZE") == NKEYS + 2
        assert k.call("GET", "key:00000") == b"written by b"
        assert k.call("GET", "only:b") == b"b" and k.call("GET", "only:a") is None
        assert k.call("GET", "key:19999") == _value(19999)
        k.close()
        # the original keeps serving, as do the clones
        assert r.call("SET", "after", "1") == "OK" and r.call("GET", "after") == b"1"
        assert orig.poll() is None and all(os.path.exists(f"/proc/{p}") for p in pids)
        assert b.call("PING") == "PONG"
        for c in clones + [r]:
            c.close()
    finally:
        _kill(pids)
        for p in (orig, check):
            if p is not None:
                p.kill()
                p.wait()
        cxlfork("rm", img, check=False)


@needs_redis
def test_redis_into_warm_ghosts(env):
    """Through the API: a prepared mow restore into a warm ghost pool (each ghost's
    namespace made ahead); two clones answer with the original's data, writes isolated."""
    from cxlfork.checkpoint import checkpoint
    from cxlfork.ghosts import GhostPool
    from cxlfork.restore import prepare_restore
    d, store = env
    port = new_port()
    orig = _start_redis(d, port)
    img = os.path.join(d, "redis-ghost.img")
    pids: list[int] = []
    null = os.open("/dev/null", os.O_RDWR)
    try:
        r = Resp(_connect(None, port))
        _redis_load(r)
        checkpoint(orig.pid, img, store)
        with prepare_restore(img) as prep, GhostPool(2, prepared=prep) as pool:
            for _ in range(2):
                pids += prep.restore(1, stdio=(null, null, null), ghosts=pool)
            assert pool.stats()["fallbacks"] == 0
            clones = [Resp(_connect(p, port)) for p in pids]
            for i, c in enumerate(clones):
                _redis_check(c)
                assert c.call("SET", "key:00002", f"ghost {i}") == "OK"
            for i, c in enumerate(clones):
                assert c.call("GET", "key:00002") == f"ghost {i}".encode()
            assert r.call("GET", "key:00002") == _value(2)
            for c in clones + [r]:
                c.close()
            _kill(pids)
            for p in pids:
                os.waitpid(p, 0)
            pids = []
    finally:
        os.close(null)
        _kill(pids)
        orig.kill()
        orig.wait()
        cxlfork("rm", img, check=False)


# ---------------------------------------------------------------- memcached

def _mc_items(prefix: str = "key", tag: str = "v"):
    return [(k, _value(i, tag)) for i, k in enumerate(_keys(prefix))]


def _start_memcached(port: int) -> subprocess.Popen:
    return subprocess.Popen([MEMCACHED, "-u", "root", "-l", "127.0.0.1", "-p", str(port),
                             "-U", "0", "-t", "4", "-m", "64"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            close_fds=True)


@needs_memcached
@pytest.mark.parametrize("policy", POLICIES + ["mow --pidns new"])
def test_memcached_cloned_twice(env, policy):
    d, store = env
    port = new_port()
    orig = _start_memcached(port)
    img = os.path.join(d, f"mc-{policy.replace(' ', '')}.img")
    pids: list[int] = []
    try:
        m = Memcache(_connect(None, port))
        items = _mc_items()
        m.set_many(items)
        assert m.get_many(k for k, _ in items) == dict(items)
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store, "--leave-running")
        pids = _restore_detached(img, policy)
        clones = [Memcache(_connect(p, port)) for p in pids]
        for p, c in zip(pids, clones):
            st = c.stats()
            assert st["threads"] == "4"
            # memcached reports getpid(): the original's PID in a clone's own PID namespace
            assert st["pid"] == str(orig.pid if "pidns new" in policy else p)
            got = c.get_many(k for k, _ in items)
            assert got == dict(items), f"{sum(got.get(k) != v for k, v in items)} wrong"
        for name, c in zip((b"orig", b"a", b"b"), [m] + clones):
            c.set(b"key:00000", b"written by " + name)
            c.set(b"only:" + name, name)
        for name, c in zip((b"orig", b"a", b"b"), [m] + clones):
            assert c.get(b"key:00000") == b"written by " + name
            assert [c.get(b"only:" + o) for o in (b"orig", b"a", b"b")] == \
                [o if o == name else None for o in (b"orig", b"a", b"b")]
        a, b = clones
        assert a.delete(b"key:00003") and a.get(b"key:00003") is None
        assert b.get(b"key:00003") == _value(3) and m.get(b"key:00003") == _value(3)
        # many connections at once, spread over the worker threads of a clone
        many = [Memcache(_connect(pids[1], port)) for _ in range(8)]
        for i, c in enumerate(many):
            c.set(b"conn:%d" % i, b"%d" % i)
        assert b.get_many(b"conn:%d" % i for i in range(8)) == \
            {b"conn:%d" % i: b"%d" % i for i in range(8)}
        assert m.get(b"conn:1") is None and a.get(b"conn:1") is None
        for c in many + clones + [m]:
            c.close()
        assert orig.poll() is None
        m = Memcache(_connect(None, port))
        assert m.get(b"key:00004") == _value(4)
        m.close()
    finally:
        _kill(pids)
        orig.kill()
        orig.wait()
        cxlfork("rm", img, check=False)


@needs_memcached
def test_memcached_into_warm_ghosts(env):
    """Through the API: memcached (4 worker threads, libevent) restored mow into a warm
    ghost pool, twice; each clone answers with the original's 20k items and keeps its own
    writes, the original unchanged."""
    from cxlfork.checkpoint import checkpoint
    from cxlfork.ghosts import GhostPool
    from cxlfork.restore import prepare_restore
    d, store = env
    port = new_port()
    orig = _start_memcached(port)
    img = os.path.join(d, "mc-ghost.img")
    pids: list[int] = []
    null = os.open("/dev/null", os.O_RDWR)
    try:
        m = Memcache(_connect(None, port))
        items = _mc_items()
        m.set_many(items)
        checkpoint(orig.pid, img, store)
        with prepare_restore(img) as prep, GhostPool(2, prepared=prep) as pool:
            for _ in range(2):
                pids += prep.restore(1, stdio=(null, null, null), ghosts=pool)
            assert pool.stats()["fallbacks"] == 0
            assert len({netns_of(p) for p in pids} | {netns_of(os.getpid())}) == 3
            clones = [Memcache(_connect(p, port)) for p in pids]
            for i, c in enumerate(clones):
                assert c.stats()["threads"] == "4"
                got = c.get_many(k for k, _ in items)
                assert got == dict(items), f"{sum(got.get(k) != v for k, v in items)} wrong"
                c.set(b"key:00002", b"ghost %d" % i)
            for i, c in enumerate(clones):
                assert c.get(b"key:00002") == b"ghost %d" % i
            assert m.get(b"key:00002") == _value(2)
            for c in clones + [m]:
                c.close()
            _kill(pids)
            for p in pids:
                os.waitpid(p, 0)
            pids = []
        assert orig.poll() is None
    finally:
        os.close(null)
        _kill(pids)
        orig.kill()
        orig.wait()
        cxlfork("rm", img, check=False)

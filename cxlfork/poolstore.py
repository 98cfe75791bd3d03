"""The page store on a memory pool that several hosts share (remote fork, docs/cxlfork.md).

The pool (`$CXLFORK_POOL`, default /run/cxlpool; `tiermem emulate start --hosts N` makes
one) holds one region per host, mounted at POOL/hH on every host, DAX (file data is the shared
memory itself, no page cache), read-write only on its owner H. POOL/host-id names this host.
Region H has three files of fixed size whose blocks never move:

    hH.pages   the slab: image extents, each its page data then its manifest (JSON)
    hH.log     the published-image log: 512 slots of 4 KiB, one record per slot
    hH.leases  the clones of host H that map pool images (two copies, the newer valid wins)

Only host H writes region H, so two hosts checkpointing at once never collide; the
processes of one host take an flock (local). Publishing: page data and manifest into a free
extent, fsync, then the record into a free slot, fsync. A record counts only when its magic,
length and SHA-256 are right, and its manifest only when that matches the record's SHA-256:
a torn or half-written record or manifest is never used (readers refuse it with one line).
The owner's free extents are whatever no valid record covers, so a crash mid-publish leaks
nothing. Removal is two-phase against leases: the owner marks the record `freeing`, then
reads every host's lease table; a reader writes its lease, then re-reads the record. Either
the owner sees the lease (and puts the record back) or the reader sees `freeing` (and
drops its lease), so an extent is never reused while a clone on any host maps it.

The records and tables themselves are cxlfork.poollog; this module has the operations
(checkpoint, restore, ls, rm, verify, gc).

A restore from the pool materializes a plain cxlfork image (the manifest, whose runs point
into the owner's slab) under /run/cxlfork/pool-images/ and restores it with cxlfork.restore:
the clones map the slab MAP_PRIVATE, so pages are read from the pool and written into local
memory (mow); lazy moa copies from the slab on first touch.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from cxlfork import FORMAT, FORMAT_VERSION, image as image_mod
from cxlfork.errors import CxlforkError, ImageError
from cxlfork.poollog import (LOCAL_IMAGES, MAX_MANIFEST, NAME_RE, PAGE, Pool, _allocate,
                             _free_slot, _host_lock, _mapped_extents, _overlaps, pool_root)

__all__ = ["LOCAL_IMAGES", "Pool", "pool_root", "checkpoint", "restore", "acquire", "release",
           "prune", "materialize", "read_manifest", "listing", "remove", "gc", "verify"]


def _rebase(m: dict, base: int) -> None:
    for v in m["vmas"]:
        for r in v["runs"]:
            r[2] += base
    for o in m["objects"]:
        for r in o["runs"]:
            r[2] += base


def _key_name() -> str:
    from cxlfork import trust
    return f"this pool's key {trust.pool_key_path()}"


# -- checkpoint ---------------------------------------------------------------------------------
def checkpoint(pid: int, name: str, kill: bool = False, progress=None,
               extra: dict | None = None) -> dict:
    """Checkpoint PID into this host's pool region as NAME; returns a summary. extra: more
    manifest fields (sealed with the rest; e.g. the porter registry's "porter")."""
    from cxlfork.checkpoint import _check_ptrace_allowed, collect
    from cxlfork.pages import layout, write_pages
    from cxlfork.ptrace import Tracee
    import secrets
    t0 = time.perf_counter()
    if not NAME_RE.match(name):
        raise CxlforkError(f"pool image name {name!r}: letters, digits and ._- only "
                           f"(at most 64)")
    if pid == os.getpid() or not os.path.exists(f"/proc/{pid}"):
        raise CxlforkError(f"no process with PID {pid}")
    pool = Pool()
    _check_ptrace_allowed(pid)
    pool.key                       # the pool's sealing key: refused before anything is frozen
    with _host_lock():
        if any(r["name"] == name for r in pool.records(pool.host, ("published", "freeing"))):
            raise CxlforkError(f"pool image h{pool.host}/{name} already exists (remove it "
                               f"with 'cxlfork pool rm {name}')")
        tr = Tracee(pid)
        state = None
        try:
            t_frozen = time.perf_counter()
            state = collect(tr)
            t_collected = time.perf_counter()
            npages = layout(state, align=False)   # packed: see write_pages(out=)
            # the manifest's size is known only roughly here: leave it 1 MiB at most
            mpages_max = MAX_MANIFEST // PAGE
            slab = pool.slab_pages(pool.host)
            base = _allocate(pool, npages + mpages_max if npages + mpages_max <= slab
                             else npages + 16)
            fd = os.open(pool.path(pool.host, "pages"), os.O_RDWR | os.O_CLOEXEC)
            try:
                phash = write_pages(state, "", 0, progress, out=(fd, base * PAGE))
                t_dumped = time.perf_counter()
                if not kill:
                    tr.detach()
                objs = state.pop("_objs")
                manifest = {
                    "format": FORMAT, "version": FORMAT_VERSION,
                    "id": secrets.token_hex(8), "created": time.time(),
                    "kernel": os.uname().release, "machine": os.uname().machine, **state,
                    "objects": sorted(objs.by_ino.values(), key=lambda o: o["id"]),
                    "store": {"dir": pool.dir(pool.host),
                              "file": os.path.basename(pool.path(pool.host, "pages")),
                              "pages": slab, "hash": phash, "hash_alg": image_mod.HASH_ALG,
                              # the slab as its owner saw it before the manifest went in;
                              # a reader pins it as it sees it (materialize)
                              "node": 0, "pin": image_mod.pin_of(os.fstat(fd))},
                    "pool": {"host": pool.host, "name": name, "base": base, "npages": npages},
                    **(extra or {}),
                }
                objs.close()
                _rebase(manifest, base)
                manifest["stats"] = {"collect_ms": (t_collected - t_frozen) * 1e3,
                                     "pages_ms": (t_dumped - t_collected) * 1e3}
                manifest["checksum"] = image_mod.checksum(manifest, key=pool.key)
                image_mod.validate(manifest, f"h{pool.host}/{name}", key=pool.key,
                                   key_name=_key_name())
                mbytes = json.dumps(manifest, sort_keys=True).encode()
                mpages = -(-len(mbytes) // PAGE)
                if len(mbytes) > MAX_MANIFEST or base + npages + mpages > slab:
                    raise CxlforkError(f"manifest of {len(mbytes)} bytes does not fit")
                os.pwrite(fd, mbytes.ljust(mpages * PAGE, b"\0"), (base + npages) * PAGE)
                os.fsync(fd)
            finally:
                os.close(fd)
            slot, seq = _free_slot(pool)
            rec = {"name": name, "host": pool.host, "slot": slot, "seq": seq,
                   "state": "published", "id": manifest["id"], "base": base,
                   "npages": npages, "mpages": mpages, "manifest_len": len(mbytes),
                   "manifest_sha256": hashlib.sha256(mbytes).hexdigest(),
                   "created": manifest["created"]}
            pool.write_slot(slot, rec)                  # the publication
            if kill:
                tr.kill()
        finally:
            if state and "_objs" in state:
                state["_objs"].close()
            if tr.attached:
                tr.detach()
    total = time.perf_counter() - t0
    return {"name": f"h{pool.host}/{name}", "pid": pid, "pages": npages,
            "bytes": npages * PAGE, "base": base, "slot": slot, "seq": seq,
            "store": pool.path(pool.host, "pages"), "total_s": total,
            "pages_ms": manifest["stats"]["pages_ms"], "killed": kill}


# -- restore ------------------------------------------------------------------------------------
def read_manifest(pool: Pool, rec: dict) -> dict:
    """The record's manifest, from the owner's slab, checked against the record."""
    where = f"pool image h{rec['host']}/{rec['name']}"
    if not 0 < rec["manifest_len"] <= MAX_MANIFEST or \
            rec["base"] + rec["npages"] + rec["mpages"] > pool.slab_pages(rec["host"]):
        raise ImageError(f"{where}: its record points outside the slab; refused")
    with open(pool.path(rec["host"], "pages"), "rb") as f:
        f.seek((rec["base"] + rec["npages"]) * PAGE)
        data = f.read(rec["manifest_len"])
    if hashlib.sha256(data).hexdigest() != rec["manifest_sha256"]:
        raise ImageError(f"{where}: the manifest on the pool does not match its log record "
                         f"(corrupt or half-written); refused")
    try:
        m = json.loads(data)
    except ValueError as e:
        raise ImageError(f"{where}: manifest is not JSON; refused") from e
    image_mod.validate(m, f"h{rec['host']}/{rec['name']} on the pool", key=pool.key,
                       key_name=_key_name())
    p = m.get("pool") or {}
    if (p.get("host"), p.get("base"), p.get("npages"), m["id"]) != \
            (rec["host"], rec["base"], rec["npages"], rec["id"]) or \
            m["store"]["dir"] != pool.dir(rec["host"]):
        raise ImageError(f"{where}: manifest and log record disagree; refused")
    return m


def materialize(pool: Pool, rec: dict) -> str:
    """A local cxlfork image for the record (its manifest), reused while unchanged."""
    m = read_manifest(pool, rec)
    # The local image pins the slab as this host sees it now (cxlfork.image: store.pin): the
    # pool's own checksums (log records, manifests; `pool verify` for pages) vouch for the
    # contents, the pin for "the file this host materialized against". The slab's times change
    # when its owner host checkpoints again, so the pin is part of the local image's name.
    st = os.stat(image_mod.store_file(m), follow_symlinks=False)
    m["store"]["pin"] = image_mod.pin_of(st)
    tag = "%x-%x-%x" % (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    d = os.path.join(LOCAL_IMAGES,
                     f"h{rec['host']}-{rec['slot']}-{rec['seq']}-{rec['id']}-{tag}")
    if not os.path.exists(os.path.join(d, image_mod.MANIFEST)):
        os.makedirs(LOCAL_IMAGES, mode=0o700, exist_ok=True)
        tmp = image_mod.write_tmp(d, {k: v for k, v in m.items() if k != "checksum"})
        try:
            os.rename(tmp, d)
        except OSError:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.isdir(d):
                raise
    return d


def lease(pool: Pool, rec: dict, pids: list[int]) -> None:
    """Record (or refresh) that pids here map the record's extent."""
    with _host_lock():
        t = pool.own_leases()
        key = (rec["host"], rec["slot"], rec["seq"])
        t["leases"] = [le for le in t["leases"] if (le["host"], le["slot"], le["seq"]) != key] \
            + [{"host": rec["host"], "slot": rec["slot"], "seq": rec["seq"],
                "name": rec["name"], "base": rec["base"], "npages": rec["npages"],
                "pids": sorted(set(pids))}]
        pool.write_leases(t)


def acquire(ref: str, pool: Pool | None = None) -> tuple[Pool, dict, str]:
    """Find ref, lease it for this process, check it is still published (the reader's
    half of the removal handshake) and materialize it: (pool, record, local image)."""
    pool = pool or Pool()
    rec = pool.find(ref)
    image = materialize(pool, rec)
    lease(pool, rec, [os.getpid()])
    now, _ = pool.slot(rec["host"], rec["slot"])
    if now is None or now["seq"] != rec["seq"] or now["state"] != "published":
        release(pool, rec)
        raise CxlforkError(f"pool image h{rec['host']}/{rec['name']} is being removed; "
                           f"refused")
    return pool, rec, image


def prune(pool: Pool | None = None) -> None:
    """Drop this host's leases that nothing here maps any more (e.g. once its clones exit)."""
    pool = pool or Pool()
    with _host_lock():
        pool.own_leases()


def release(pool: Pool, rec: dict) -> None:
    with _host_lock():
        t = pool.own_leases()
        t["leases"] = [le for le in t["leases"] if (le["host"], le["slot"], le["seq"]) !=
                       (rec["host"], rec["slot"], rec["seq"])]
        pool.write_leases(t)


def restore(ref: str, policy: str = "mow", n: int = 1, stdio="inherit", eager: bool = False,
            warn=None) -> tuple[list[int], dict]:
    """Restore n clones of a pool image (any host's); returns (pids, record)."""
    from cxlfork.restore import restore as do
    if policy == "moa" and not eager:
        raise CxlforkError("lazy moa is not available on the pool: it needs userfaultfd "
                           "minor faults, which the kernel has for shmem and hugetlbfs only, "
                           "not for the pool's DAX files; use --policy moa --eager, or mow")
    pool, rec, image = acquire(ref)
    try:
        pids = do(image, policy=policy, n=n, stdio=stdio, warn=warn, eager=eager)
    except BaseException:
        release(pool, rec)
        raise
    lease(pool, rec, pids)
    return pids, rec


# -- listing, removal, verification -------------------------------------------------------------
def listing(pool: Pool | None = None) -> dict:
    pool = pool or Pool()
    images, torn = [], []
    leased: dict[tuple, int] = {}
    for h in pool.hosts:
        t = pool.own_leases() if h == pool.host else pool.leases(h)
        for le in t["leases"]:
            k = (le["host"], le["slot"], le["seq"])
            leased[k] = leased.get(k, 0) + 1
    for h in pool.hosts:
        for slot, rec, why in pool.slots(h):
            if why:
                torn.append({"host": h, "slot": slot, "why": why.split(" ", 1)[1]})
            if rec is not None and rec["state"] != "freed":
                images.append(dict(rec, mib=rec["npages"] * PAGE / 2**20,
                                   leased_by_hosts=leased.get((h, slot, rec["seq"]), 0)))
    return {"pool": pool.root, "host": pool.host, "hosts": pool.hosts, "images": images,
            "torn": torn}


def remove(ref: str, ignore_hosts: tuple[int, ...] = ()) -> dict:
    """Free a pool image of this host, unless a clone on any host maps it."""
    pool = Pool()
    rec = pool.find(ref)
    name = f"h{rec['host']}/{rec['name']}"
    if rec["host"] != pool.host:
        raise CxlforkError(f"pool image {name} belongs to host {rec['host']}: remove it there "
                           f"(only a region's owner writes it)")
    with _host_lock():
        pool.write_slot(rec["slot"], dict(rec, state="freeing"))
        holders = []
        for h in pool.hosts:
            if h in ignore_hosts and h != pool.host:
                continue
            t = pool.own_leases() if h == pool.host else pool.leases(h)
            if any((le["host"], le["slot"], le["seq"]) ==
                   (rec["host"], rec["slot"], rec["seq"]) for le in t["leases"]):
                holders.append(h)
        if pool.host not in holders and _overlaps(
                _mapped_extents().get(pool.path(pool.host, "pages"), []), rec):
            holders.append(pool.host)
        if holders:
            pool.write_slot(rec["slot"], rec)           # back to published
            raise CxlforkError(f"pool image {name} is mapped by clones on host(s) "
                               f"{', '.join(map(str, holders))}; not removed (a host that "
                               f"is gone: --ignore-host N)")
        pool.write_slot(rec["slot"], dict(rec, state="freed"))
    return {"removed": name, "mib": rec["npages"] * PAGE / 2**20}


def gc() -> dict:
    """This host's housekeeping: drop leases nothing here maps any more, and put back to
    published the records a `pool rm` that died between its two phases left `freeing` (under
    the host lock no rm is running, so any `freeing` record is such a leftover)."""
    pool = Pool()
    with _host_lock():
        before = len(pool.leases(pool.host)["leases"])
        after = len(pool.own_leases()["leases"])
        back = []
        for rec in pool.records(pool.host, ("freeing",)):
            pool.write_slot(rec["slot"], dict(rec, state="published"))
            back.append(rec["name"])
    return {"leases_dropped": max(0, before - after), "republished": back}


def verify(ref: str) -> dict:
    """Record, manifest and the content hash of the image's extent of the slab."""
    from cxlfork.native import lib
    pool = Pool()
    rec = pool.find(ref)
    m = read_manifest(pool, rec)
    size = rec["npages"] * PAGE
    base = rec["base"] * PAGE
    fd = os.open(pool.path(rec["host"], "pages"), os.O_RDONLY | os.O_CLOEXEC)
    try:
        hs = [lib.cx_hash_file(fd, base + o, min(image_mod.SEGMENT, size - o))
              for o in range(0, size, image_mod.SEGMENT)]
    finally:
        os.close(fd)
    h = image_mod.combine_segment_hashes(hs)
    name = f"h{rec['host']}/{rec['name']}"
    if h != m["store"]["hash"]:
        raise ImageError(f"pool image {name}: page data content hash mismatch ({h} != "
                         f"{m['store']['hash']}): corrupt; refused")
    image_mod.check_file(m["process"]["exe"], "executable")
    return {"name": name, "pages": rec["npages"], "hash": h, "ok": True}

"""The pool's on-memory layout and its single-writer records (cxlfork.poolstore's data):
`Pool` (the regions, this host's number), the published-image log (slots with magic, length
and SHA-256), the per-host lease tables (two copies, the newer valid one wins), the host-local
lock, the slab allocator. Layout and consistency rules: the poolstore docstring and
docs/cxlfork.md ("Remote fork")."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from contextlib import contextmanager

from cxlfork import trust
from cxlfork.errors import CxlforkError, ImageError

PAGE = 4096
SLOT = 4096
MAGIC = b"CXLPREC1"
LEASE_MAGIC = b"CXLPLSE1"
LOCAL_IMAGES = "/run/cxlfork/pool-images"
LOCK = "/run/cxlfork/pool.lock"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_MANIFEST = 1 << 20


def pool_root() -> str:
    return os.environ.get("CXLFORK_POOL", "/run/cxlpool")


class Pool:
    def __init__(self, root: str | None = None):
        self.root = root or pool_root()
        try:
            with open(os.path.join(self.root, "host-id")) as f:
                self.host = int(f.read().strip())
        except (OSError, ValueError) as e:
            raise CxlforkError(f"no memory pool at {self.root} (no valid host-id; boot hosts "
                               f"with 'tiermem emulate start --hosts 2', or set "
                               f"CXLFORK_POOL)") from e
        self.hosts = sorted(int(n[1:]) for n in os.listdir(self.root)
                            if re.fullmatch(r"h\d+", n)
                            and os.path.exists(self.path(int(n[1:]), "log")))
        if self.host not in self.hosts:
            raise CxlforkError(f"pool {self.root}: this host's region h{self.host} is missing")

    def dir(self, h: int) -> str:
        return os.path.join(self.root, f"h{h}")

    def path(self, h: int, what: str) -> str:
        return os.path.join(self.dir(h), f"h{h}.{what}")

    @property
    def key(self) -> bytes:
        """The pool's sealing key (cxlfork.trust.pool_key: provisioned, never on the pool)."""
        if getattr(self, "_key", None) is None:
            self._key = trust.pool_key()
        return self._key

    def slab_pages(self, h: int) -> int:
        return os.path.getsize(self.path(h, "pages")) // PAGE

    # -- the log ---------------------------------------------------------------------------
    def slots(self, h: int) -> list[tuple[int, dict | None, str | None]]:
        """Every slot of host h's log: (slot, record or None, why-invalid or None); an
        empty slot (never written) is (slot, None, None)."""
        with open(self.path(h, "log"), "rb") as f:
            data = f.read()
        out = []
        for i in range(len(data) // SLOT):
            out.append((i, *_parse_slot(data[i * SLOT:(i + 1) * SLOT], self.key)))
        return out

    def slot(self, h: int, i: int) -> tuple[dict | None, str | None]:
        """One slot of host h's log (4 KiB read): (record or None, why-invalid or None)."""
        with open(self.path(h, "log"), "rb") as f:
            f.seek(i * SLOT)
            return _parse_slot(f.read(SLOT), self.key)

    def records(self, h: int, states=("published",)) -> list[dict]:
        return [r for _, r, _ in self.slots(h) if r is not None and r["state"] in states]

    def write_slot(self, slot: int, rec: dict) -> None:
        rec = {k: v for k, v in rec.items() if k != "seal"}
        rec["seal"] = record_seal(rec, self.key)
        body = json.dumps(rec, sort_keys=True).encode()
        blob = MAGIC + len(body).to_bytes(4, "little") + body + hashlib.sha256(body).digest()
        if len(blob) > SLOT:
            raise CxlforkError("pool log record too long")
        fd = os.open(self.path(self.host, "log"), os.O_WRONLY)
        try:
            os.pwrite(fd, blob.ljust(SLOT, b"\0"), slot * SLOT)
            os.fsync(fd)
        finally:
            os.close(fd)

    def find(self, ref: str) -> dict:
        """The published record for ref ("NAME" or "hH/NAME"); one-line errors."""
        hosts, name = self.hosts, ref
        if "/" in ref:
            hs, name = ref.split("/", 1)
            if not re.fullmatch(r"h\d+", hs) or int(hs[1:]) not in self.hosts:
                raise CxlforkError(f"pool image {ref!r}: no host region {hs!r} in "
                                   f"{self.root}")
            hosts = [int(hs[1:])]
        found, torn = [], []
        for h in hosts:
            for slot, rec, why in self.slots(h):
                if rec is not None and rec["name"] == name and rec["state"] == "published":
                    found.append(rec)
                elif why is not None and why.startswith(f"name={name} "):
                    torn.append(f"h{h}.log slot {slot}: {why.split(' ', 1)[1]}")
        if not found:
            if torn and SEAL_WHY in torn[0]:
                raise ImageError(f"pool image {ref!r} refused: its log record ({torn[0]}) is "
                                 f"not sealed with this pool's key {trust.pool_key_path()} "
                                 f"(sealed under a foreign key, or edited)")
            if torn:
                raise ImageError(f"pool image {ref!r} is not published: its record is "
                                 f"half-written or corrupt ({torn[0]}); refused")
            raise ImageError(f"no image {ref!r} is published in the pool {self.root}")
        if len(found) > 1:
            raise CxlforkError(f"pool image name {name!r} is published by hosts "
                               f"{', '.join('h%d' % r['host'] for r in found)}: say which, "
                               f"e.g. h{found[0]['host']}/{name}")
        return found[0]

    # -- leases ----------------------------------------------------------------------------
    def leases(self, h: int) -> dict:
        with open(self.path(h, "leases"), "rb") as f:
            data = f.read()
        half = len(data) // 2
        best = None
        for k in (0, 1):
            d = _parse_lease(data[k * half:(k + 1) * half])
            if d is not None and (best is None or d["gen"] > best["gen"]):
                best = d
        return best or {"gen": 0, "boot": None, "leases": []}

    def write_leases(self, table: dict) -> None:
        p = self.path(self.host, "leases")
        half = os.path.getsize(p) // 2
        table = dict(table, gen=table["gen"] + 1, boot=_boot_id())
        body = json.dumps(table, sort_keys=True).encode()
        blob = LEASE_MAGIC + len(body).to_bytes(4, "little") + body + \
            hashlib.sha256(body).digest()
        if len(blob) > half:
            raise CxlforkError("too many pool leases on this host")
        fd = os.open(p, os.O_WRONLY)
        try:
            os.pwrite(fd, blob, (table["gen"] % 2) * half)
            os.fsync(fd)
        finally:
            os.close(fd)

    def own_leases(self) -> dict:
        """This host's lease table, with leases nobody here maps any more dropped (and all
        of an earlier boot: its clones died with it)."""
        t = self.leases(self.host)
        if t.get("boot") != _boot_id():
            t = {"gen": t["gen"], "boot": _boot_id(), "leases": []}
        mapped = None                   # /proc/*/maps, read only when a lease needs it
        keep = []
        for le in t["leases"]:
            if not any(_alive(p) for p in le["pids"]):
                mapped = _mapped_extents() if mapped is None else mapped
                if not _overlaps(mapped.get(self.path(le["host"], "pages"), []), le):
                    continue
            keep.append(le)
        if len(keep) != len(t["leases"]):
            t["leases"] = keep
            self.write_leases(t)
            t = self.leases(self.host)
        return t


# -- slot/lease encoding ------------------------------------------------------------------------
_REC_KEYS = {"name": str, "host": int, "slot": int, "seq": int, "state": str, "id": str,
             "base": int, "npages": int, "mpages": int, "manifest_len": int,
             "manifest_sha256": str, "created": float}


SEAL_WHY = "record seal mismatch"


def record_seal(rec: dict, key: bytes) -> str:
    """HMAC-SHA256 under the pool key of the record (all but its "seal")."""
    return trust.seal(json.dumps({k: v for k, v in rec.items() if k != "seal"},
                                 sort_keys=True, separators=(",", ":")).encode(), with_key=key)


def _parse_slot(b: bytes, key: bytes) -> tuple[dict | None, str | None]:
    """A slot's record, checked: frame (magic, length, SHA-256: torn writes), JSON, field
    types, then the seal under the pool key (forged, edited or foreign records)."""
    if b[:8] != MAGIC:
        return None, None                                       # empty
    n = int.from_bytes(b[8:12], "little")
    body = b[12:12 + n] if 12 + n + 32 <= len(b) else b""
    name = re.search(rb'"name": "([^"]{1,64})"', b[12:12 + min(n, SLOT)])
    tag = f"name={name.group(1).decode(errors='replace') if name else '?'} "
    if not body or hashlib.sha256(body).digest() != b[12 + n:12 + n + 32]:
        return None, tag + "record checksum mismatch"
    try:
        rec = json.loads(body)
        if not isinstance(rec, dict):
            return None, tag + "record is not a JSON object"
        for k, t in _REC_KEYS.items():
            if not isinstance(rec.get(k), t) and not (t is float and isinstance(rec.get(k), int)):
                return None, tag + f"record field {k} missing or wrong"
    except ValueError:
        return None, tag + "record is not JSON"
    if not trust.same_seal(record_seal(rec, key), rec.pop("seal", None)):
        return None, tag + SEAL_WHY
    return rec, None


def _parse_lease(b: bytes) -> dict | None:
    if b[:8] != LEASE_MAGIC:
        return None
    n = int.from_bytes(b[8:12], "little")
    body = b[12:12 + n]
    if 12 + n + 32 > len(b) or hashlib.sha256(body).digest() != b[12 + n:12 + n + 32]:
        return None
    try:
        d = json.loads(body)
    except ValueError:
        return None
    return d if isinstance(d, dict) and isinstance(d.get("gen"), int) else None


def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def _mapped_extents() -> dict[str, list[tuple[int, int]]]:
    """{file path: [(byte offset, length)]} of every file mapping of every process here."""
    out: dict[str, list[tuple[int, int]]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) == 6 and parts[5].startswith("/"):
                        s, e = (int(x, 16) for x in parts[0].split("-"))
                        out.setdefault(parts[5].rstrip("\n"), []).append(
                            (int(parts[2], 16), e - s))
        except OSError:
            continue
    return out


def _overlaps(maps: list[tuple[int, int]], rec: dict) -> bool:
    lo, hi = rec["base"] * PAGE, (rec["base"] + rec["npages"]) * PAGE
    return any(off < hi and off + n > lo for off, n in maps)


@contextmanager
def _host_lock():
    os.makedirs(os.path.dirname(LOCK), mode=0o700, exist_ok=True)
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _allocate(pool: Pool, pages: int) -> int:
    """First fit in this host's slab, around every extent a valid record holds."""
    used = sorted((r["base"], r["base"] + r["npages"] + r["mpages"])
                  for r in pool.records(pool.host, ("published", "freeing")))
    at = 0
    for s, e in used:
        if s - at >= pages:
            return at
        at = max(at, e)
    if pool.slab_pages(pool.host) - at >= pages:
        return at
    raise CxlforkError(f"the pool region h{pool.host} has no free extent of "
                       f"{pages * PAGE / 2**20:.1f} MiB (remove images with 'cxlfork pool rm')")


def _free_slot(pool: Pool) -> tuple[int, int]:
    slots = pool.slots(pool.host)
    seq = 1 + max([r["seq"] for _, r, _ in slots if r is not None] + [0])
    for i, r, _ in slots:
        if r is None or r["state"] == "freed":
            return i, seq
    raise CxlforkError(f"the pool log h{pool.host}.log is full ({len(slots)} images)")

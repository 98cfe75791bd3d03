"""The image: a 0700 directory holding manifest.json (0600), plus its page file in the store.

The manifest is versioned JSON (format "cxlfork-image", version 3; 2 had no credentials):
maps and their page runs, registers, xstate, signals, fds, mm fields, rlimits, the process's
credentials (state.creds), and the store file with its size, content
hash and pin (device, inode, owner, mode, size, mtime, ctime); its "checksum" is an HMAC-SHA256
of the canonical JSON of everything else under the caller's key (cxlfork.trust), so only that
user can make a manifest restore. It is written into IMAGE.tmp.PID and published by renaming
that directory to IMAGE. `load` checks the seal and then every field (types, ranges, alignment,
overlaps, runs inside the store), so a corrupt, edited or hostile manifest is refused before
anything is spawned; `open_store_file` opens the page file only inside a store directory the
caller owns and checks its pin. `hot.json` (optional, written later by `cxlfork profile`)
records pages clones touched, for the hybrid policy.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil

from cxlfork import FORMAT, FORMAT_VERSION, trust
from cxlfork.errors import ImageError
from cxlfork.state import creds, deleted, epoll, fifos, inotify, signalfd, stdio, timerfd

MANIFEST = "manifest.json"
MAX_THREADS = 1024                        # restorer stacks: 64 KiB each in its region
HOT = "hot.json"
MAX_MANIFEST = 256 << 20
PAGE = 4096
USER_TOP = 1 << 47
REGION = (0x100000000000, 0x100040000000)    # the restorer's; see native/restorer.ld
VMA_KINDS = {"anon", "file", "shmem", "special"}
# the event/timer fds, named FIFOs and deleted files validate their own fields (check_fd)
EV_KINDS = {m.KIND: m for m in (epoll, timerfd, signalfd, inotify, fifos)}
FD_KINDS = {"file", "dir", "chr", "pipe", "eventfd", "memfd", "stdio", "socket",
            "inet", "unix", deleted.KIND} | set(EV_KINDS)
REG_NAMES = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
             "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base",
             "gs_base", "ds", "es", "fs", "gs")
# The page file's content hash: the 4-lane streaming hash (native cx_hash_*) of each 64 MiB
# segment of the file, then SHA-256 over those segment hashes (u64 little-endian), first 16 hex
# digits. Segments are hashed independently, so the dump and verify run them in parallel.
# Images without store.hash_alg (first version) hash the whole file as one stream.
SEGMENT = 64 << 20
HASH_ALG = "cx64x4-seg64M"
MM_FIELDS = ("start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
             "start_stack", "arg_start", "arg_end", "env_start", "env_end")


def canonical(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def checksum(m: dict, create_key: bool = False, key: bytes | None = None) -> str:
    """The manifest's seal: HMAC-SHA256 under the caller's key (or key: a pool's, see
    cxlfork.poolstore) of everything but "checksum"."""
    return trust.seal(canonical({k: v for k, v in m.items() if k != "checksum"}), create_key,
                      with_key=key)


PIN = ("dev", "ino", "uid", "mode", "size", "mtime_ns", "ctime_ns")


def pin_of(st: os.stat_result) -> dict:
    """The page file's identity as pinned in the manifest (store.pin)."""
    return {"dev": st.st_dev, "ino": st.st_ino, "uid": st.st_uid, "mode": st.st_mode,
            "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(s: str, what: str) -> bytes:
    try:
        return base64.b64decode(s, validate=True)
    except (ValueError, TypeError) as e:
        raise ImageError(f"manifest field {what}: not valid base64") from e


# -- writing -----------------------------------------------------------------------------------
def tmp_dir_for(image: str) -> str:
    return f"{image}.tmp.{os.getpid()}"


def write_tmp(image: str, manifest: dict, seal: str | None = None) -> str:
    """Write the manifest into IMAGE.tmp.PID (0700 dir, 0600 file); return that directory.
    seal: checksum(manifest) when the caller has it already. The file is compact JSON (the C
    encoder: the indented one is pure Python, about 20 ms for a worker's manifest; `cxlfork
    inspect --json` prints it indented)."""
    tmp = tmp_dir_for(image)
    os.mkdir(tmp, 0o700)
    os.chmod(tmp, 0o700)
    manifest = dict(manifest)
    manifest["checksum"] = seal or checksum(manifest, create_key=True)
    fd = os.open(os.path.join(tmp, MANIFEST), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(canonical(manifest) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    return tmp


def publish(tmp: str, image: str) -> None:
    try:
        os.rename(tmp, image)
    except OSError as e:
        raise ImageError(f"cannot publish image {image}: {e.strerror}") from e


# -- reading and validation --------------------------------------------------------------------
def read_manifest_raw(image: str) -> dict:
    path = os.path.join(image, MANIFEST)
    if not os.path.isdir(image):
        raise ImageError(f"{image}: no such image (not a directory)")
    try:
        st = os.stat(path)
        if st.st_size > MAX_MANIFEST:
            raise ImageError(f"{path}: manifest is {st.st_size} bytes, more than the "
                             f"{MAX_MANIFEST >> 20} MiB limit")
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise ImageError(f"{image}: no manifest.json (not a cxlfork image, or unpublished)") \
            from e
    try:
        m = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageError(f"{path}: corrupt manifest (not JSON: {e})") from e
    except RecursionError as e:
        raise ImageError(f"{path}: corrupt manifest (nested too deeply)") from e
    if not isinstance(m, dict):
        raise ImageError(f"{path}: corrupt manifest (not a JSON object)")
    return m


def image_id_of(image: str) -> str | None:
    try:
        m = read_manifest_raw(image)
    except ImageError:
        return None
    return m.get("id") if isinstance(m.get("id"), str) else None


class _V:
    """Field checks with a precise path in the message."""

    def __init__(self, image: str):
        self.image = image

    def fail(self, where: str, why: str):
        raise ImageError(f"image {self.image}: manifest field {where}: {why}")

    def get(self, d, key, typ, where, optional=False):
        if not isinstance(d, dict):
            self.fail(where, "expected an object")
        if key not in d:
            if optional:
                return None
            self.fail(f"{where}.{key}" if where else key, "missing")
        v = d[key]
        if optional and v is None:
            return None
        w = f"{where}.{key}" if where else key
        if typ is int:
            if not isinstance(v, int) or isinstance(v, bool):
                self.fail(w, f"expected an integer, got {type(v).__name__}")
        elif typ is bool:
            if not isinstance(v, bool):
                self.fail(w, "expected true/false")
        elif not isinstance(v, typ):
            self.fail(w, f"expected {typ.__name__}, got {type(v).__name__}")
        return v

    def int_in(self, d, key, lo, hi, where):
        v = self.get(d, key, int, where)
        if not lo <= v < hi:
            self.fail(f"{where}.{key}" if where else key, f"{v} out of range [{lo}, {hi})")
        return v


def validate(m: dict, image: str = "?", key: bytes | None = None,
             key_name: str | None = None) -> dict:
    """Check the seal (under the caller's key, or key, named key_name in the refusal) and
    every field of manifest m; returns m or raises ImageError."""
    v = _V(image)
    if m.get("format") != FORMAT:
        v.fail("format", f"not a cxlfork image (expected {FORMAT!r})")
    ver = m.get("version")
    if ver == 1:
        v.fail("version", "image format version 1, sealed with an unkeyed checksum by an older "
                          f"cxlfork; this cxlfork reads version {FORMAT_VERSION} (sealed with "
                          "its user's key): checkpoint the process again")
    if ver == 2:
        v.fail("version", "image format version 2 has no record of the process's credentials "
                          "(its clones would run as the restoring user); this cxlfork reads "
                          f"version {FORMAT_VERSION}: checkpoint the process again")
    if ver != FORMAT_VERSION:
        v.fail("version", f"image format version {ver!r}; this cxlfork reads version "
                          f"{FORMAT_VERSION}")
    if not trust.same_seal(checksum(m, key=key), m.get("checksum")):
        raise ImageError(f"image {image}: manifest checksum mismatch (corrupt, edited, or not "
                         f"sealed with {key_name or 'your key ' + trust.key_path()})")
    v.get(m, "id", str, "")
    if not m["id"].isalnum() or len(m["id"]) > 64:
        v.fail("id", "must be alphanumeric")
    regs = v.get(m, "regs", dict, "")
    for n in REG_NAMES:
        v.int_in(regs, n, 0, 2**64, "regs")
    xs = unb64(v.get(m, "xstate", str, ""), "xstate")
    if not 512 <= len(xs) <= 16384:
        v.fail("xstate", f"{len(xs)} bytes, expected 512..16384")
    proc = v.get(m, "process", dict, "")
    v.get(proc, "cwd", str, "process")
    comm = v.get(proc, "comm", str, "process", optional=True)
    if comm is not None and ("\0" in comm or len(comm.encode()) > 64):
        v.fail("process.comm", "not a process name")
    v.int_in(proc, "umask", 0, 0o1000, "process")
    for k in ("pgid_leader", "sid_leader"):
        v.get(proc, k, bool, "process")
    exe = v.get(proc, "exe", dict, "process")
    _file_ref(v, exe, "process.exe")
    creds.check(v, proc)
    mm = v.get(m, "mm", dict, "")
    for k in MM_FIELDS:
        v.int_in(mm, k, 0, USER_TOP, "mm")
    if len(unb64(v.get(mm, "auxv", str, "mm"), "mm.auxv")) > 4096:
        v.fail("mm.auxv", "too long")
    sigs = v.get(m, "signals", dict, "")
    v.int_in(sigs, "blocked", 0, 2**64, "signals")
    for i, a in enumerate(v.get(sigs, "actions", list, "signals")):
        w = f"signals.actions[{i}]"
        v.int_in(a, "sig", 1, 65, w)
        if a["sig"] in (9, 19):
            v.fail(w, "SIGKILL/SIGSTOP cannot have actions")
        for k in ("handler", "flags", "restorer", "mask"):
            v.int_in(a, k, 0, 2**64, w)
    alt = v.get(sigs, "altstack", dict, "signals")
    v.int_in(alt, "sp", 0, USER_TOP, "signals.altstack")
    v.int_in(alt, "flags", -2**31, 2**31, "signals.altstack")
    v.int_in(alt, "size", 0, 2**40, "signals.altstack")
    rseq = v.get(m, "rseq", dict, "", optional=True)
    if rseq is not None:
        v.int_in(rseq, "addr", 1, USER_TOP, "rseq")
        v.int_in(rseq, "len", 20, 4096, "rseq")
        v.int_in(rseq, "sig", 0, 2**32, "rseq")
    v.int_in(m, "tid_address", 0, USER_TOP, "")
    rl = v.get(m, "robust_list", dict, "")
    v.int_in(rl, "head", 0, USER_TOP, "robust_list")
    v.int_in(rl, "len", 0, 4096, "robust_list")
    lims = v.get(m, "rlimits", dict, "")
    from cxlfork.procfs import RLIMITS
    for k, val in lims.items():
        if k not in RLIMITS:
            v.fail(f"rlimits.{k}", "unknown resource")
        if not (isinstance(val, list) and len(val) == 2
                and all(isinstance(x, int) and -1 <= x < 2**64 for x in val)):
            v.fail(f"rlimits.{k}", "expected [soft, hard]")

    threads = v.get(m, "threads", list, "", optional=True) or []
    if len(threads) > MAX_THREADS:
        v.fail("threads", f"{len(threads)} threads; at most {MAX_THREADS} are supported")
    for i, t in enumerate(threads):
        w = f"threads[{i}]"
        v.int_in(t, "tid", 1, 2**22 + 1, w)
        tr = v.get(t, "regs", dict, w)
        for n in REG_NAMES:
            v.int_in(tr, n, 0, 2**64, f"{w}.regs")
        txs = unb64(v.get(t, "xstate", str, w), f"{w}.xstate")
        if not 512 <= len(txs) <= 16384:
            v.fail(f"{w}.xstate", f"{len(txs)} bytes, expected 512..16384")
        v.int_in(t, "blocked", 0, 2**64, w)
        tc = v.get(t, "comm", str, w, optional=True)
        if tc is not None and ("\0" in tc or len(tc.encode()) > 64):
            v.fail(f"{w}.comm", "not a thread name")
        v.int_in(t, "tid_address", 0, USER_TOP, w)
        trl = v.get(t, "robust_list", dict, w)
        v.int_in(trl, "head", 0, USER_TOP, f"{w}.robust_list")
        v.int_in(trl, "len", 0, 4096, f"{w}.robust_list")
        ta = v.get(t, "altstack", dict, w)
        v.int_in(ta, "sp", 0, USER_TOP, f"{w}.altstack")
        v.int_in(ta, "flags", -2**31, 2**31, f"{w}.altstack")
        v.int_in(ta, "size", 0, 2**40, f"{w}.altstack")
        trs = v.get(t, "rseq", dict, w, optional=True)
        if trs is not None:
            v.int_in(trs, "addr", 1, USER_TOP, f"{w}.rseq")
            v.int_in(trs, "len", 20, 4096, f"{w}.rseq")
            v.int_in(trs, "sig", 0, 2**32, f"{w}.rseq")

    store = v.get(m, "store", dict, "")
    sf = v.get(store, "file", str, "store")
    if "/" in sf or sf in ("", ".", "..") or not sf.endswith(".pages"):
        v.fail("store.file", f"{sf!r} is not a plain page-file name")
    npages = v.int_in(store, "pages", 0, 2**40, "store")
    v.get(store, "dir", str, "store")
    v.get(store, "hash", str, "store")
    alg = v.get(store, "hash_alg", str, "store", optional=True)
    if alg is not None and alg != HASH_ALG:
        v.fail("store.hash_alg", f"unknown content hash {alg!r} (this cxlfork knows {HASH_ALG})")
    v.int_in(store, "node", 0, 1024, "store")
    pin = v.get(store, "pin", dict, "store")
    for k in PIN:
        v.int_in(pin, k, 0, 2**64, "store.pin")
    if not os.path.isabs(store["dir"]):
        v.fail("store.dir", "expected an absolute path")

    objs = v.get(m, "objects", list, "")
    obj_ids = set()
    for i, o in enumerate(objs):
        w = f"objects[{i}]"
        oid = v.int_in(o, "id", 0, 2**31, w)
        obj_ids.add(oid)
        if v.get(o, "kind", str, w) not in ("memfd", "shmem", deleted.KIND):
            v.fail(f"{w}.kind", f"expected memfd, shmem or {deleted.KIND}")
        v.get(o, "name", str, w)
        size = v.int_in(o, "size", 0, 1 << 44, w)
        v.int_in(o, "seals", 0, 1 << 16, w)
        _runs(v, o, 0, size, npages, w, page_aligned_end=False)

    vmas = v.get(m, "vmas", list, "")
    prev_end = 0
    nspecial = 0
    for i, a in enumerate(vmas):
        w = f"vmas[{i}]"
        s = v.int_in(a, "start", PAGE, USER_TOP, w)
        e = v.int_in(a, "end", PAGE, USER_TOP + 1, w)
        if s % PAGE or e % PAGE or e <= s:
            v.fail(w, f"bad range {s:#x}-{e:#x}")
        if s < prev_end:
            v.fail(w, "overlaps or is out of order with the previous mapping")
        if s < REGION[1] and e > REGION[0]:
            v.fail(w, "overlaps the restorer's reserved region")
        prev_end = e
        v.int_in(a, "prot", 0, 8, w)
        kind = v.get(a, "kind", str, w)
        if kind not in VMA_KINDS:
            v.fail(f"{w}.kind", f"unknown kind {kind!r}")
        v.get(a, "shared", bool, w)
        v.get(a, "growsdown", bool, w)
        if v.int_in(a, "offset", 0, 1 << 60, w) % PAGE:
            v.fail(f"{w}.offset", "not page-aligned")
        for f in v.get(a, "madvise", list, w):
            if not isinstance(f, int) or not 0 <= f < 100:
                v.fail(f"{w}.madvise", "bad advice")
        if "lock" in a:
            v.int_in(a, "lock", 0, 3, w)
        if kind == "special":
            nspecial += 1
            if v.get(a, "path", str, w) not in ("[vdso]", "[vvar]", "[vvar_vclock]"):
                v.fail(f"{w}.path", "unknown special mapping")
        if kind == "file":
            _file_ref(v, v.get(a, "file", dict, w), f"{w}.file")
        if kind == "shmem":
            if v.int_in(a, "object", 0, 2**31, w) not in obj_ids:
                v.fail(f"{w}.object", "no such object")
        _runs(v, a, s, e, npages, w)
    if nspecial > 4:
        v.fail("vmas", "more than 4 vvar/vdso mappings")

    if "mlockall" in m and v.int_in(m, "mlockall", 0, 8, "") not in (0, 2, 6):
        v.fail("mlockall", "expected 0, MCL_FUTURE or MCL_FUTURE|MCL_ONFAULT")
    fds = v.get(m, "fds", list, "")
    seen = set()
    socks: dict[int, list] = {}
    for i, f in enumerate(fds):
        w = f"fds[{i}]"
        n = v.int_in(f, "fd", 0, 1 << 20, w)
        if n in seen:
            v.fail(w, f"fd {n} listed twice")
        seen.add(n)
        k = v.get(f, "kind", str, w)
        if k not in FD_KINDS:
            v.fail(f"{w}.kind", f"unknown fd kind {k!r}")
        v.int_in(f, "flags", 0, 1 << 24, w)
        v.get(f, "cloexec", bool, w)
        dup = v.get(f, "dup_of", int, w, optional=True)
        if dup is not None and (dup not in seen or dup == n):
            v.fail(f"{w}.dup_of", "must name an earlier fd")
        if dup is not None:
            continue
        if k == "stdio" and n <= 2:
            stdio.check(v, f, w)
        if k in ("file", "dir", "chr"):
            v.get(f, "path", str, w)
            v.int_in(f, "pos", 0, 1 << 62, w)
        if k == "pipe":
            v.int_in(f, "pipe", 0, 1 << 40, w)
            v.get(f, "end", str, w)
            if f["end"] not in ("r", "w"):
                v.fail(f"{w}.end", "expected r or w")
            unb64(v.get(f, "data", str, w, optional=True) or "", f"{w}.data")
        if k == "socket":
            if v.int_in(f, "sotype", 1, 6, w) not in (1, 2, 5):
                v.fail(f"{w}.sotype", "expected 1, 2 or 5 (stream, dgram, seqpacket)")
            v.int_in(f, "pair", 0, 1 << 40, w)
            v.int_in(f, "end", 0, 2, w)
            for key in ("sndbuf", "rcvbuf"):
                v.int_in(f, key, 0, 1 << 31, w)
            for j, q in enumerate(v.get(f, "queue", list, w)):
                if not isinstance(q, str):
                    v.fail(f"{w}.queue[{j}]", "expected a base64 string")
                unb64(q, f"{w}.queue[{j}]")
            socks.setdefault(f["pair"], []).append((f["end"], f["sotype"], w))
            if "shutdown" in f:
                v.int_in(f, "shutdown", 0, 4, w)
        if k == "unix":
            if v.int_in(f, "sotype", 1, 6, w) not in (1, 2, 5):
                v.fail(f"{w}.sotype", "expected 1, 2 or 5 (stream, dgram, seqpacket)")
            if v.get(f, "state", str, w) not in ("listen", "bound", "unbound", "reset"):
                v.fail(f"{w}.state", "expected listen, bound, unbound or reset")
            if len(unb64(v.get(f, "name", str, w), f"{w}.name")) > 107:
                v.fail(f"{w}.name", "longer than an abstract unix name can be")
            v.int_in(f, "backlog", 0, 1 << 31, w)
            v.get(f, "passcred", bool, w)
            if "path" in f:
                sp = v.get(f, "path", str, w)
                if not sp.startswith("/") or len(sp.encode()) > 107 or "\0" in sp:
                    v.fail(f"{w}.path", "expected an absolute path of at most 107 bytes")
                v.int_in(f, "mode", 0, 0o10000, w)
            for key in ("sndbuf", "rcvbuf"):
                v.int_in(f, key, 0, 1 << 31, w)
        if k == "inet":
            from cxlfork.state import inet
            inet.validate(v, f, w)
        if k == "eventfd":
            v.int_in(f, "count", 0, 2**64, w)
        if k == "memfd":
            if v.int_in(f, "object", 0, 2**31, w) not in obj_ids:
                v.fail(f"{w}.object", "no such object")
            v.int_in(f, "pos", 0, 1 << 62, w)
        if k in EV_KINDS:
            EV_KINDS[k].check_fd(v, f, w)
        if k == deleted.KIND:
            deleted.check_fd(v, f, w, obj_ids)
    for ends in socks.values():
        if sorted(e[0] for e in ends) != [0, 1] or ends[0][1] != ends[1][1]:
            v.fail(ends[0][2], "a socketpair needs its two ends (0 and 1), of one type")
    epoll.check_targets(fds, image, v.fail)
    return m


def _file_ref(v: _V, f: dict, w: str) -> None:
    p = v.get(f, "path", str, w)
    if not p.startswith("/"):
        v.fail(f"{w}.path", "expected an absolute path")
    for k in ("dev", "ino", "size", "mtime_ns"):
        v.int_in(f, k, 0, 2**64, w)


def _runs(v: _V, d: dict, lo: int, hi: int, npages: int, w: str, page_aligned_end=True):
    runs = v.get(d, "runs", list, w)
    prev = lo
    for j, r in enumerate(runs):
        if not (isinstance(r, list) and len(r) == 3
                and all(isinstance(x, int) and not isinstance(x, bool) for x in r)):
            v.fail(f"{w}.runs[{j}]", "expected [address, pages, store page]")
        a, n, sp = r
        if a % PAGE or n <= 0 or a < prev or a + n * PAGE > (hi if page_aligned_end else
                                                             hi + PAGE - 1):
            v.fail(f"{w}.runs[{j}]", "outside its mapping, unaligned, or out of order")
        if sp < 0 or sp + n > npages:
            v.fail(f"{w}.runs[{j}]", "points past the end of the page file")
        prev = a + n * PAGE


def load(image: str) -> dict:
    """The validated manifest of a published image."""
    image = os.path.abspath(image)
    return validate(read_manifest_raw(image), image)


def store_file(m: dict) -> str:
    return os.path.join(m["store"]["dir"], m["store"]["file"])


def open_store_file(m: dict, image: str, pin: bool = True) -> int:
    """fd of the image's page file: only in a store directory the caller owns (no symlinks,
    not writable by others), owned by the caller, of the right size, and (pin) still the file
    the checkpoint wrote: same device, inode, owner, mode, size, mtime and ctime. The pin is
    one fstat; the content hash is checked by verify only (see docs/cxlfork.md)."""
    p = store_file(m)
    what = f"image {image}: page file"
    dfd = trust.open_dir(m["store"]["dir"], f"image {image}: store", ImageError)
    try:
        fd = trust.open_owned(dfd, m["store"]["file"], p, what, ImageError)
    except FileNotFoundError as e:
        raise ImageError(f"image {image}: page file {p} is missing (removed, or the store "
                         "tmpfs was unmounted or rebooted away)") from e
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if st.st_size != m["store"]["pages"] * PAGE:
            raise ImageError(f"image {image}: page file {p} is {st.st_size} bytes, the manifest "
                             f"says {m['store']['pages'] * PAGE} (truncated or replaced)")
        if pin:
            check_pin(m, st, image)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_pin(m: dict, st: os.stat_result, image: str) -> None:
    want, have = m["store"]["pin"], pin_of(st)
    diff = [k for k in PIN if want[k] != have[k]]
    if diff:
        raise ImageError(f"image {image}: page file {store_file(m)} changed since the checkpoint "
                         f"({', '.join(diff)} differ: written, replaced or touched); restoring "
                         "would map other contents ('cxlfork verify' checks the content)")


def check_file(ref: dict, what: str) -> None:
    try:
        st = os.stat(ref["path"])
    except OSError as e:
        raise ImageError(f"{what} {ref['path']}: {e.strerror}") from e
    if (st.st_ino, st.st_size, st.st_mtime_ns) != (ref["ino"], ref["size"], ref["mtime_ns"]):
        raise ImageError(f"{what} {ref['path']} changed since the checkpoint (inode, size or "
                         "mtime differ); restoring would map different contents")


def verify(image: str) -> dict:
    """Check everything: manifest checksum and fields, page file size and hash, files mapped
    or used, hot record. Returns a summary; raises ImageError on the first problem."""
    m = load(image)
    fd = open_store_file(m, image, pin=False)
    try:
        h = page_file_hash(fd, m["store"]["pages"] * PAGE, m["store"].get("hash_alg"))
        if h != m["store"]["hash"]:
            raise ImageError(f"image {image}: page file {store_file(m)} content hash mismatch "
                             f"({h} != {m['store']['hash']})")
        check_pin(m, os.fstat(fd), image)
    finally:
        os.close(fd)
    check_file(m["process"]["exe"], "executable")
    for a in m["vmas"]:
        if a["kind"] == "file":
            check_file(a["file"], "mapped file")
    hot = load_hot(image, m)
    return {"image": os.path.abspath(image), "id": m["id"], "pages": m["store"]["pages"],
            "vmas": len(m["vmas"]), "fds": len(m["fds"]),
            "hot_pages": int(sum(bin(b).count("1") for b in hot)) if hot is not None else None}


def combine_segment_hashes(hashes: list[int]) -> str:
    return hashlib.sha256(b"".join(h.to_bytes(8, "little") for h in hashes)).hexdigest()[:16]


def workers() -> int:
    """Threads for per-segment work (the C calls release the GIL)."""
    return max(1, min(4, os.cpu_count() or 1))


def page_file_hash(fd: int, size: int, alg: str | None) -> str:
    """The content hash of a page file, by the image's algorithm (see HASH_ALG)."""
    from concurrent.futures import ThreadPoolExecutor
    from cxlfork.native import lib
    if alg is None:
        return f"{lib.cx_hash_file(fd, 0, size):016x}"
    offs = range(0, size, SEGMENT)
    with ThreadPoolExecutor(workers()) as ex:
        hs = list(ex.map(lambda o: lib.cx_hash_file(fd, o, min(SEGMENT, size - o)), offs))
    return combine_segment_hashes(hs)


def load_hot(image: str, m: dict) -> bytes | None:
    """Bitmap over store pages that clones touched (hot.json), or None when not recorded."""
    p = os.path.join(image, HOT)
    if not os.path.exists(p):
        return None
    try:
        with open(p) as f:
            h = json.load(f)
        bits = base64.b64decode(h["bits"], validate=True)
        ok = (h.get("id") == m["id"] and hashlib.sha256(bits).hexdigest() == h.get("sha256")
              and len(bits) == (m["store"]["pages"] + 7) // 8)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ImageError(f"image {image}: corrupt {HOT} ({e})") from e
    if not ok:
        raise ImageError(f"image {image}: {HOT} does not match this image (id, size or hash)")
    return bits


def write_hot(image: str, m: dict, bits: bytes) -> None:
    p = os.path.join(image, HOT)
    tmp = f"{p}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"id": m["id"], "bits": b64(bits),
                   "sha256": hashlib.sha256(bits).hexdigest()}, f)
    os.rename(tmp, p)


def remove(image: str) -> list[str]:
    """Delete a published image directory and its page file; returns what was removed.

    Only an image whose manifest validates (sealed with the caller's key) is removed, and its
    page file and owner record only inside a store directory the caller owns (cxlfork.trust);
    an empty directory (a checkpoint that died before writing) is removed as it is."""
    import stat
    image = os.path.abspath(image)
    if not os.path.isdir(image):
        raise ImageError(f"{image}: no such image (not a directory)")
    if not os.path.lexists(os.path.join(image, MANIFEST)):
        if os.listdir(image):
            raise ImageError(f"{image} is not a cxlfork image (no manifest.json); not removing "
                             "it")
        os.rmdir(image)
        return [image]
    try:
        m = load(image)
    except ImageError as e:
        raise ImageError(f"not removing {image}: {e} (remove it yourself if it is yours; "
                         "'cxlfork gc' removes page files no image uses)") from e
    removed = []
    for kid in m.get("tree", {}).get("children", []):     # a tree's other processes
        sub = os.path.join(image, kid["image"])
        if os.path.isdir(sub):
            removed += remove(sub)
    sd, sf = m["store"]["dir"], m["store"]["file"]
    if os.path.lexists(sd):
        dfd = trust.open_dir(sd, f"not removing {image}: its store", ImageError)
        try:
            names = []
            for name in (sf, sf[:-len(".pages")] + ".owner"):
                try:
                    st = os.lstat(name, dir_fd=dfd)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                    raise ImageError(f"not removing {image}: {os.path.join(sd, name)} is not a "
                                     "regular file of yours")
                names.append(name)
            for name in names:
                os.unlink(name, dir_fd=dfd)
                removed.append(os.path.join(sd, name))
        finally:
            os.close(dfd)
    shutil.rmtree(image)
    removed.append(image)
    return removed

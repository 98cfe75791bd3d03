"""The dump pipeline: freeze -> collect -> refuse what is unsupported -> write present pages
into the page store -> publish the manifest -> resume (or kill) the process.

    freeze    ptrace seize + interrupt (ptrace.Tracee)
    collect   smaps, registers + xstate, rseq, robust list, signals (injected rt_sigaction /
              sigaltstack), tid address, brk, mm fields, cwd, umask, rlimits, fds
    pages     pagemap presence -> page runs; process_vm_readv (or /proc/PID/mem for unreadable
              mappings, pread for shmem/memfd objects) straight into the mapped store file,
              hashing as it goes
    publish   manifest into IMAGE.tmp.PID, page file renamed into place, directory renamed to
              IMAGE; a failure or SIGTERM/SIGINT on the way removes both and resumes the process
"""
from __future__ import annotations

import errno
import mmap
import os
import secrets
import signal
import stat as stat_mod
import time

import numpy as np

from cxlfork import FORMAT, FORMAT_VERSION, image as image_mod, procfs
from cxlfork import socketpairs
from cxlfork.errors import CxlforkError, Refused
from cxlfork.native import ffi, lib
from cxlfork.ptrace import Tracee, restart_adjusted
from cxlfork.store import open_store
from tiermem.native import pagemap_read, PM_FILE, PM_PRESENT, PM_SWAP

PAGE = 4096
SPECIAL = ("[vdso]", "[vvar]", "[vvar_vclock]")
MADVISE = {"hg": 14, "nh": 15, "dc": 10, "dd": 16, "wf": 18, "sr": 2, "rr": 1, "mg": 12}
REFUSED_VMFLAGS = {"lo": "mlock()ed memory", "io": "device memory (VM_IO)",
                   "pf": "device memory (VM_PFNMAP)", "um": "userfaultfd-registered memory",
                   "uw": "userfaultfd-registered memory", "ss": "a shadow stack",
                   "sl": "sealed (mseal) memory"}
CHR_OK = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty",
          "/dev/console")
O_ACCMODE, O_CLOEXEC = 0o3, 0o2000000
F_GET_SEALS = 1034
CHUNK = 64 << 20


def _stat_ref(path_for_stat: str, path: str) -> dict:
    st = os.stat(path_for_stat)
    return {"path": path, "dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns}


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(first page index, page count) of each run of True in mask."""
    if not mask.any():
        return []
    m = np.concatenate(([False], mask, [False])).astype(np.int8)
    d = np.diff(m)
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    return list(zip(starts.tolist(), (ends - starts).tolist()))


class _Objects:
    """shmem objects (shared anonymous memory, memfd) by inode, with an fd to read them."""

    def __init__(self):
        self.by_ino: dict[tuple[int, int], dict] = {}
        self.fds: dict[int, int] = {}

    def add(self, fd: int, kind: str, name: str) -> dict:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        o = self.by_ino.get(key)
        if o is None:
            try:
                import fcntl
                seals = fcntl.fcntl(fd, F_GET_SEALS) if kind == "memfd" else 0
            except OSError:
                seals = 0
            o = {"id": len(self.by_ino), "kind": kind, "name": name, "size": st.st_size,
                 "seals": seals, "runs": []}
            self.by_ino[key] = o
            self.fds[o["id"]] = fd
        else:
            os.close(fd)
            if kind == "memfd":
                o["kind"], o["name"] = "memfd", name
        return o

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """Page-aligned (offset, pages) ranges of a shmem file that hold data (SEEK_DATA/HOLE)."""
    out, off = [], 0
    while off < size:
        try:
            d = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        h = os.lseek(fd, d, os.SEEK_HOLE)
        d0 = d // PAGE * PAGE
        h1 = min(-(-h // PAGE) * PAGE, -(-size // PAGE) * PAGE)
        if out and out[-1][0] + out[-1][1] * PAGE >= d0:
            start = out[-1][0]
            out[-1] = (start, (max(h1, start + out[-1][1] * PAGE) - start) // PAGE)
        else:
            out.append((d0, (h1 - d0) // PAGE))
        off = h
    return out


def collect_fds(pid: int, objs: _Objects) -> list[dict]:
    out: list[dict] = []
    pipes: dict[int, list[dict]] = {}
    socks: list[dict] = []
    by_link: dict[str, list[int]] = {}
    for f in procfs.fds(pid):
        n, link, flags = f["fd"], f["link"], f["flags"]
        rec = {"fd": n, "flags": flags & ~O_CLOEXEC, "cloexec": bool(flags & O_CLOEXEC),
               "link": link}
        if n <= 2:
            rec["kind"] = "stdio"
            out.append(rec)
            continue
        # a dup of an earlier fd (same open file description)?
        dup = next((m for m in by_link.get(link, []) if lib.cx_kcmp_file(pid, m, n) == 0), None)
        by_link.setdefault(link, []).append(n)
        if dup is not None:
            src = next(r for r in out if r["fd"] == dup)
            rec.update(kind=src["kind"], dup_of=dup)
            out.append(rec)
            continue
        if link.startswith("/memfd:"):
            # a fresh open file description: seeking ours must not move the process's offset
            try:
                dfd = os.open(f"/proc/{pid}/fd/{n}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise CxlforkError(f"cannot open fd {n} of PID {pid}: {e.strerror}") from e
            name = link[len("/memfd:"):].removesuffix(" (deleted)")
            o = objs.add(dfd, "memfd", name)
            rec.update(kind="memfd", object=o["id"], pos=f["pos"])
        elif link.startswith("/"):
            if link.endswith(" (deleted)"):
                raise Refused(f"fd {n} is a deleted file ({link}); not supported")
            st = os.stat(f"/proc/{pid}/fd/{n}")
            try:
                st2 = os.stat(link)
            except OSError:
                st2 = None
            if st2 is None or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
                raise Refused(f"fd {n}: {link} was renamed or replaced since it was opened")
            if stat_mod.S_ISREG(st.st_mode):
                rec.update(kind="file", path=link, pos=f["pos"])
            elif stat_mod.S_ISDIR(st.st_mode):
                rec.update(kind="dir", path=link, pos=f["pos"])
            elif stat_mod.S_ISCHR(st.st_mode) and (link in CHR_OK or link.startswith("/dev/pts/")
                                                     or link.startswith("/dev/tty")):
                rec.update(kind="chr", path=link, pos=f["pos"])
            elif stat_mod.S_ISFIFO(st.st_mode):
                raise Refused(f"fd {n} is a named FIFO ({link}); not supported yet")
            else:
                raise Refused(f"fd {n} is a device or special file ({link}); not supported")
        elif link.startswith("pipe:["):
            ino = int(link[6:-1])
            rec.update(kind="pipe", pipe=ino,
                       end="r" if (flags & O_ACCMODE) == os.O_RDONLY else "w")
            pipes.setdefault(ino, []).append(rec)
        elif link == "anon_inode:[eventfd]":
            info = f["info"]
            rec.update(kind="eventfd", count=int(info.get("eventfd-count", "0"), 16),
                       semaphore=info.get("eventfd-semaphore", "0").strip() == "1")
        elif link.startswith("socket:"):
            dfd = lib.cx_pidfd_getfd(pid, n)
            if dfd < 0:
                raise CxlforkError(f"pidfd_getfd(fd {n}) of PID {pid}: {os.strerror(-dfd)}")
            rec.update(socketpairs.collect(dfd, n, link))
            socks.append(rec)
        else:
            raise Refused(f"fd {n} is {link}; this kind of fd is not supported yet")
        out.append(rec)
    socketpairs.pair_up(socks)
    for r in socks:
        r["queue"] = [image_mod.b64(q) for q in r["queue"]]
        del r["ino"], r["peer"]
    for ino, ends in pipes.items():
        kinds = {e["end"] for e in ends}
        if kinds != {"r", "w"}:
            raise Refused(f"fd {ends[0]['fd']} is pipe:[{ino}] whose other end is outside the "
                          "process (only fds 0-2 may be, they come from restore --stdio)")
        reader = next(e for e in ends if e["end"] == "r")
        reader["data"] = image_mod.b64(_pipe_data(pid, reader["fd"]))
    return out


def _pipe_data(pid: int, fd: int) -> bytes:
    """The bytes buffered in a pipe, copied with tee(2) without consuming them."""
    dfd = lib.cx_pidfd_getfd(pid, fd)
    if dfd < 0:
        raise CxlforkError(f"pidfd_getfd(fd {fd}) of PID {pid}: {os.strerror(-dfd)}")
    r, w = os.pipe()
    try:
        import fcntl
        fcntl.fcntl(w, 1031, 1 << 20)        # F_SETPIPE_SZ
        n = lib.cx_tee(dfd, w, 1 << 20)
        if n < 0:
            raise CxlforkError(f"tee of pipe fd {fd}: {os.strerror(-n)}")
        return os.read(r, n) if n else b""
    finally:
        for x in (r, w, dfd):
            os.close(x)


def collect_vmas(pid: int, maps: list[dict], objs: _Objects) -> list[dict]:
    vmas = []
    for v in maps:
        path, flags = v["path"], v["vmflags"]
        if path == "[vsyscall]":
            continue
        s, e = v["start"], v["end"]
        prot = (1 if v["perms"][0] == "r" else 0) | (2 if v["perms"][1] == "w" else 0) \
            | (4 if v["perms"][2] == "x" else 0)
        shared = v["perms"][3] == "s"
        rec = {"start": s, "end": e, "prot": prot, "shared": shared, "offset": v["pgoff"],
               "growsdown": "gd" in flags, "path": path, "runs": [],
               "madvise": sorted(MADVISE[f] for f in flags if f in MADVISE)}
        if path in SPECIAL:
            rec["kind"] = "special"
            vmas.append(rec)
            continue
        bad = next((REFUSED_VMFLAGS[f] for f in flags if f in REFUSED_VMFLAGS), None)
        if bad:
            raise Refused(f"mapping {s:#x}-{e:#x} {path or '[anon]'} is {bad}; not supported")
        if s < image_mod.REGION[1] and e > image_mod.REGION[0]:
            raise Refused(f"mapping {s:#x}-{e:#x} overlaps cxlfork's restorer region "
                          f"{image_mod.REGION[0]:#x}-{image_mod.REGION[1]:#x}")
        if path == "/dev/zero (deleted)" or path.startswith("[anon_shmem:") \
                or path.startswith("/memfd:"):
            fd = os.open(f"/proc/{pid}/map_files/{s:x}-{e:x}", os.O_RDONLY | os.O_CLOEXEC)
            kind = "memfd" if path.startswith("/memfd:") else "shmem"
            o = objs.add(fd, kind, path[len("/memfd:"):].removesuffix(" (deleted)")
                         if kind == "memfd" else "")
            rec.update(kind="shmem", object=o["id"])
        elif path.startswith("/SYSV"):
            raise Refused(f"mapping {s:#x}-{e:#x} is System V shared memory; not supported")
        elif path == "" or path in ("[heap]", "[stack]") or path.startswith("[anon:"):
            if shared:
                raise Refused(f"mapping {s:#x}-{e:#x} {path}: unknown shared anonymous memory")
            rec["kind"] = "anon"
        elif path.startswith("/"):
            if path.endswith(" (deleted)"):
                raise Refused(f"mapping {s:#x}-{e:#x} is of a deleted file ({path})")
            try:
                ref = _stat_ref(f"/proc/{pid}/map_files/{s:x}-{e:x}", path)
                st2 = os.stat(path)
            except OSError as ex:
                raise Refused(f"mapped file {path}: {ex.strerror}") from ex
            if (st2.st_dev, st2.st_ino) != (ref["dev"], ref["ino"]):
                raise Refused(f"mapped file {path} was replaced since it was mapped")
            rec.update(kind="file", file=ref)
        else:
            raise Refused(f"mapping {s:#x}-{e:#x} {path} is of a kind not supported")
        # which pages hold process-private data the store must keep
        if not (rec["kind"] in ("file", "shmem") and shared):
            pm = pagemap_read(pid, s, (e - s) // PAGE)
            present = (pm & np.uint64(PM_PRESENT | PM_SWAP)) != 0
            if rec["kind"] != "anon":
                present &= (pm & np.uint64(PM_FILE)) == 0     # CoW copies only
            rec["runs"] = [[s + a * PAGE, n, 0] for a, n in _runs(present)]
        vmas.append(rec)
    return vmas


def _thread_state(t: Tracee, main: Tracee) -> dict:
    """What a thread has of its own: registers (its TLS in fs_base), xstate, signal mask,
    sigaltstack, rseq, robust list, clear-child-tid address (injected syscalls in that thread,
    through the main thread's scratch page)."""
    t.syscall_ip, t.scratch = main.syscall_ip, main.scratch
    altstack = t.sigaltstack()
    tid_address = t.tid_address()
    head, rlen = t.robust_list()
    return {"tid": t.pid, "regs": restart_adjusted(t.regs, live=False),
            "xstate": image_mod.b64(t.xstate()), "rseq": t.rseq(),
            "robust_list": {"head": head, "len": rlen}, "tid_address": tid_address,
            "altstack": altstack, "blocked": int(procfs.status(t.pid)["SigBlk"], 16),
            "comm": procfs.status(t.pid).get("Name", "").strip()}


def collect(tr: Tracee) -> dict:
    pid = tr.pid
    tr.freeze_threads()
    kids = procfs.children(pid)
    if kids:
        raise Refused(f"PID {pid} has child processes ({', '.join(map(str, kids[:5]))}); "
                      "process trees are not supported yet")
    st = procfs.stat(pid)
    status = procfs.status(pid)
    if status.get("State", "").startswith("Z"):
        raise CxlforkError(f"PID {pid} is a zombie")
    maps0 = procfs.smaps(pid)
    vdso = next((v for v in maps0 if v["path"] == "[vdso]"), None)
    if vdso is None:
        raise Refused(f"PID {pid} has no vDSO (booted with vdso=0?); not supported")
    tr.find_syscall_insn(vdso["start"], vdso["end"])
    tr.map_scratch()
    try:
        caught = int(status["SigCgt"], 16) | int(status["SigIgn"], 16)
        actions = [tr.sigaction(s) for s in range(1, 65)
                   if caught >> (s - 1) & 1 and s not in (9, 19)]
        altstack = tr.sigaltstack()
        tid_address = tr.tid_address()
        brk = tr.brk()
        threads = [_thread_state(t, tr) for t in tr.threads]
    finally:
        for t in tr.threads:
            t.scratch = 0
            t.put_back_regs()
        tr.unmap_scratch()
        tr.put_back_regs()
    head, rlen = tr.robust_list()
    cwd = os.readlink(f"/proc/{pid}/cwd")
    if cwd.endswith(" (deleted)"):
        raise Refused(f"the working directory of PID {pid} was deleted ({cwd})")
    exe_path = os.readlink(f"/proc/{pid}/exe")
    if exe_path.endswith(" (deleted)"):
        raise Refused(f"the executable of PID {pid} was deleted ({exe_path})")
    objs = _Objects()
    try:
        fds = collect_fds(pid, objs)
        maps = procfs.smaps(pid)
        vmas = collect_vmas(pid, maps, objs)
    except BaseException:
        objs.close()
        raise
    f = [int(x) if x and x.lstrip("-").isdigit() else 0 for x in st]
    mm = {"start_code": f[26], "end_code": f[27], "start_stack": f[28], "start_data": f[45],
          "end_data": f[46], "start_brk": f[47], "brk": brk, "arg_start": f[48],
          "arg_end": f[49], "env_start": f[50], "env_end": f[51],
          "auxv": image_mod.b64(procfs.auxv(pid))}
    return {
        "process": {"pid": pid, "comm": st[2], "exe": _stat_ref(f"/proc/{pid}/exe", exe_path),
                    "cwd": cwd, "umask": int(status.get("Umask", "0022"), 8),
                    "pgid_leader": f[5] == pid, "sid_leader": f[6] == pid},
        "regs": restart_adjusted(tr.regs, live=False),
        "regs_at_freeze": {"rip": tr.regs["rip"], "orig_rax": tr.regs["orig_rax"],
                           "rax": tr.regs["rax"]},
        "xstate": image_mod.b64(tr.xstate()),
        "rseq": tr.rseq(),
        "robust_list": {"head": head, "len": rlen},
        "tid_address": tid_address,
        "signals": {"actions": actions, "blocked": int(status["SigBlk"], 16),
                    "altstack": altstack},
        "mm": mm,
        "rlimits": procfs.rlimits(pid),
        "fds": fds,
        "vmas": vmas,
        "threads": threads,
        "_objs": objs,
    }


def _layout(state: dict) -> int:
    """Give each run its place in the page file; returns the number of pages."""
    p = 0
    for v in state["vmas"]:
        for r in v["runs"]:
            r[2] = p
            p += r[1]
    objs = state["_objs"]
    for o in objs.by_ino.values():
        o["runs"] = [[off, n, 0] for off, n in _data_ranges(objs.fds[o["id"]], o["size"])]
        for r in o["runs"]:
            r[2] = p
            p += r[1]
    return p


def _segment_tasks(state: dict, memfd: int) -> list[list[tuple[int, list, list, int]]]:
    """Per 64 MiB segment of the page file, the groups of runs to copy: (source fd or -1 for
    process_vm_readv, addresses, byte lengths, page-file offset of the first)."""
    seg_pages = image_mod.SEGMENT // PAGE
    jobs = []                        # (source, address, pages, first store page), file order
    for v in state["vmas"]:
        src = -1 if v["prot"] & 1 else memfd
        jobs += [(src, r[0], r[1], r[2]) for r in v["runs"]]
    for o in state["_objs"].by_ino.values():
        ofd = state["_objs"].fds[o["id"]]
        jobs += [(ofd, r[0], r[1], r[2]) for r in o["runs"]]
    segs: list[list] = []
    for src, addr, n, sp in jobs:
        while n:                     # split runs at segment boundaries
            k = sp // seg_pages
            take = min(n, (k + 1) * seg_pages - sp)
            while len(segs) <= k:
                segs.append([])
            g = segs[k]
            if g and g[-1][0] == src:
                g[-1][1].append(addr)
                g[-1][2].append(take * PAGE)
            else:
                g.append((src, [addr], [take * PAGE], sp * PAGE))
            addr, n, sp = addr + take * PAGE, n - take, sp + take
    return segs


def write_pages(state: dict, tmp_path: str, node: int, progress=None) -> str:
    """Fill the page file; returns the content hash (hex, image.HASH_ALG).

    The file's shared memory policy is bound to the store node first (mbind on a mapping that
    is never touched). Then each 64 MiB segment is dumped by a worker thread in C (the GIL is
    released): batches of runs are read into a cache-sized buffer (process_vm_readv, or pread
    of /proc/PID/mem or of a shmem object), hashed, and pwritten: full-page writes into tmpfs
    allocate pages on the node without zeroing them first, and no page faults on a mapping.
    """
    from concurrent.futures import ThreadPoolExecutor
    import threading
    pid = state["process"]["pid"]
    npages = _layout(state)
    size = npages * PAGE
    fd = os.open(tmp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        if size == 0:
            return image_mod.combine_segment_hashes([])
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            buf = ffi.from_buffer(mm)
            e = lib.cx_mbind_shared(ffi.cast("char *", buf), size, node)
            del buf
            if e < 0 and e != -errno.ENOSYS:
                raise CxlforkError(f"mbind of the page file to node {node}: {os.strerror(-e)}")
        finally:
            mm.close()
        memfd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        lock = threading.Lock()
        done = [0]

        def dump(groups) -> int:
            h = ffi.new("cx_hash_t *")
            lib.cx_hash_init(h)
            bounce = ffi.new("char[]", lib.CX_DUMP_BATCH)
            for src, addrs, lens, off in groups:
                r = lib.cx_dump_runs(pid, src, len(addrs), ffi.new("uint64_t[]", addrs),
                                     ffi.new("uint64_t[]", lens), bounce, h, fd, off)
                if r < 0:
                    raise CxlforkError(f"reading the memory of PID {pid} into the page "
                                       f"file: {os.strerror(-r)}")
                if progress:
                    with lock:
                        done[0] += r
                        progress(done[0], size)
            return lib.cx_hash_final(h)

        ex = ThreadPoolExecutor(image_mod.workers())
        try:
            hashes = list(ex.map(dump, _segment_tasks(state, memfd)))
        finally:
            ex.shutdown(wait=True, cancel_futures=True)    # no worker uses fd after this
            os.close(memfd)
        return image_mod.combine_segment_hashes(hashes)
    finally:
        os.close(fd)


def checkpoint(pid: int, image: str, store_dir: str | None = None, kill: bool = False,
               progress=None, warn=None) -> dict:
    """Checkpoint PID into IMAGE (a new directory). Returns the summary with timings."""
    t0 = time.perf_counter()
    image = os.path.abspath(image)
    if pid == os.getpid():
        raise CxlforkError("cannot checkpoint cxlfork itself")
    if not os.path.exists(f"/proc/{pid}"):
        raise CxlforkError(f"no process with PID {pid}")
    if os.path.lexists(image):
        raise CxlforkError(f"{image} already exists (remove it with 'cxlfork rm')")
    if not os.path.isdir(os.path.dirname(image)):
        raise CxlforkError(f"directory {os.path.dirname(image)} does not exist")
    _check_ptrace_allowed(pid)
    store = open_store(store_dir)
    if store.warning and warn:
        warn(store.warning)
    image_id = secrets.token_hex(8)
    tmp_pages = store.tmp_pages_path(image_id)
    tmp_dir = image_mod.tmp_dir_for(image)
    owner_tmp = store.owner_path(image_id) + f".tmp.{os.getpid()}"
    with open(os.open(owner_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(image + "\n")

    published = False
    old_handlers = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM,
                                                                     signal.SIGINT)}
    tr = None
    state = None
    try:
        tr = Tracee(pid)
        t_frozen = time.perf_counter()
        state = collect(tr)
        t_collected = time.perf_counter()
        phash = write_pages(state, tmp_pages, store.node, progress)
        t_dumped = time.perf_counter()
        if not kill:
            tr.detach()
        npages = sum(r[1] for v in state["vmas"] for r in v["runs"]) + \
            sum(r[1] for o in state["_objs"].by_ino.values() for r in o["runs"])
        objs = state.pop("_objs")
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION, "id": image_id,
            "created": time.time(), "kernel": os.uname().release,
            "machine": os.uname().machine, **state,
            "objects": sorted(objs.by_ino.values(), key=lambda o: o["id"]),
            "store": {"dir": store.path, "file": os.path.basename(store.pages_path(image_id)),
                      "pages": npages, "hash": phash, "hash_alg": image_mod.HASH_ALG,
                      "node": store.node},
        }
        objs.close()
        manifest["stats"] = {"freeze_ms": (t_frozen - t0) * 1e3,
                             "collect_ms": (t_collected - t_frozen) * 1e3,
                             "pages_ms": (t_dumped - t_collected) * 1e3,
                             "frozen_ms": (time.perf_counter() - t_frozen) * 1e3}
        image_mod.validate(dict(manifest, checksum=image_mod.checksum(manifest)), image)
        image_mod.write_tmp(image, manifest)
        os.rename(tmp_pages, store.pages_path(image_id))
        os.rename(owner_tmp, store.owner_path(image_id))
        image_mod.publish(tmp_dir, image)
        published = True
        if kill:
            tr.kill()
        total = time.perf_counter() - t0
        return {"image": image, "id": image_id, "pid": pid, "pages": npages,
                "bytes": npages * PAGE, "store": store.pages_path(image_id),
                "node": store.node, "total_s": total, "frozen_s":
                (t_dumped - t_frozen) if not kill else total,
                "killed": kill, **{k: v for k, v in manifest["stats"].items()}}
    except OSError as e:
        raise CxlforkError(f"checkpoint of PID {pid} failed: {e.strerror or e}"
                           f"{' (' + e.filename + ')' if getattr(e, 'filename', None) else ''}")
    finally:
        if state and "_objs" in state:
            state["_objs"].close()
        if tr is not None and tr.attached:
            tr.detach()
        if not published:
            import shutil
            for p in (tmp_pages, owner_tmp, store.pages_path(image_id),
                      store.owner_path(image_id)):
                if os.path.exists(p):
                    os.unlink(p)
            shutil.rmtree(tmp_dir, ignore_errors=True)
        for s, h in old_handlers.items():
            signal.signal(s, h)


def _check_ptrace_allowed(pid: int) -> None:
    """Fail early, before anything is created, when the caller may not ptrace PID."""
    try:
        os.close(os.open(f"/proc/{pid}/mem", os.O_RDONLY))
    except FileNotFoundError as e:
        raise CxlforkError(f"no process with PID {pid}") from e
    except PermissionError as e:
        raise CxlforkError(f"cannot ptrace PID {pid}: permission denied (not yours, or yama "
                           "ptrace_scope forbids it; run as root or as its owner)") from e


def _is_child(pid: int) -> bool:
    try:
        return int(procfs.stat(pid)[4]) == os.getpid()
    except Exception:
        return False


def _raise_interrupt(signum, frame):
    raise CxlforkError(f"interrupted by signal {signum}; nothing was published and the "
                       "process was resumed")

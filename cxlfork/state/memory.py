"""Memory: the mappings of the address space and the shmem objects behind them.

Checkpoint (`collect`): /proc/PID/smaps (maps + VmFlags) turned into VMA records (anonymous,
file, shmem/memfd, vvar/vdso), each with the runs of pages the store must keep (pagemap
presence; for file/shmem private mappings only the copied-on-write pages); shared anonymous
memory and memfds become objects (`Objects`, by inode) whose data ranges (SEEK_DATA/HOLE) are
stored too. mlock()ed mappings (VmFlags `lo`, `lf` for MLOCK_ONFAULT) are recorded with
their lock, and mlockall(MCL_FUTURE) by `future_lock`; the restore copies locked mappings'
stored pages (mlock would copy them anyway) and locks them again (cxlfork.plan, OP_MLOCK),
after `check_lock_limit`. Refused, naming the mapping: VM_IO/PFNMAP, userfaultfd-registered
(also a cxlfork clone's store-mapped runs, whose dropped pages are zeros only through its
handler), shadow-stack and sealed memory, SysV shm, the restorer's region. Mappings of
deleted files become objects too (cxlfork.state.deleted).
The pages themselves are written by cxlfork.pages.

Restore: the kernel's vvar/vdso layout is checked (`check_specials`), the mapped files are
opened once per restore (`open_mapped_files`), each clone gets its own memfds refilled from
the store (`make_objects`); the plan (cxlfork.plan) maps everything per policy.
"""
from __future__ import annotations

import errno
import fcntl
import functools
import os

from cxlfork import image as image_mod
from cxlfork.errors import CxlforkError, ImageError, Refused
from cxlfork.native import ffi, lib
from cxlfork.state import deleted
from cxlfork.state.process import stat_ref

PAGE = 4096
SPECIAL = ("[vdso]", "[vvar]", "[vvar_vclock]")
MADVISE = {"hg": 14, "nh": 15, "dc": 10, "dd": 16, "wf": 18, "sr": 2, "rr": 1, "mg": 12}
REFUSED_VMFLAGS = {"io": "device memory (VM_IO)",
                   "pf": "device memory (VM_PFNMAP)", "um": "userfaultfd-registered memory",
                   "uw": "userfaultfd-registered memory",
                   "ui": "userfaultfd-registered memory (in a cxlfork clone: the store pages "
                         "its handler serves; checkpoint the original, or a moa --eager "
                         "clone)", "ss": "a shadow stack",
                   "sl": "sealed (mseal) memory"}
LOCKED, LOCK_ONFAULT = 1, 2          # a VMA's "lock": mlock(), mlock2(MLOCK_ONFAULT)
MCL_FUTURE, MCL_ONFAULT = 2, 4
F_GET_SEALS, F_ADD_SEALS = 1034, 1033
MFD_ALLOW_SEALING = 2


# -- checkpoint --------------------------------------------------------------------------------
def present_runs(pmfd: int, start: int, end: int, file_ok: bool) -> list[list[int]]:
    """[address, pages, 0] of each run of pages of [start, end) that hold data the store must
    keep: present or swapped, and (file_ok False) not file pages, i.e. only the
    copied-on-write pages of a private file mapping. pmfd: /proc/PID/pagemap. In C: one
    PAGEMAP_SCAN ioctl per 256 runs where the kernel has it (6.7+), else the pagemap read."""
    cap = 256
    while True:
        out = ffi.new("uint64_t[]", 2 * cap)
        n = lib.cx_present_runs(pmfd, start, end, int(file_ok), out, cap)
        if n == -errno.ENOSPC:
            cap *= 8
            continue
        if n < 0:
            raise OSError(-n, f"pagemap {start:#x}-{end:#x}: {os.strerror(-n)}")
        return [[out[2 * i], out[2 * i + 1], 0] for i in range(n)]


class Objects:
    """shmem objects (shared anonymous memory, memfd, deleted files) by inode, with an fd to
    read them."""

    def __init__(self):
        self.by_ino: dict[tuple[int, int], dict] = {}
        self.fds: dict[int, int] = {}

    def add(self, fd: int, kind: str, name: str) -> dict:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        o = self.by_ino.get(key)
        if o is None:
            try:
                seals = fcntl.fcntl(fd, F_GET_SEALS) if kind == "memfd" else 0
            except OSError:
                seals = 0
            o = {"id": len(self.by_ino), "kind": kind, "name": name, "size": st.st_size,
                 "seals": seals, "mode": st.st_mode & 0o7777, "runs": []}
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


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
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


def collect(pid: int, maps: list[dict], objs: Objects) -> list[dict]:
    """The VMA records of maps (procfs.smaps(pid)), with their stored runs."""
    pmfd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _collect(pid, maps, objs, pmfd)
    finally:
        os.close(pmfd)


def _collect(pid: int, maps: list[dict], objs: Objects, pmfd: int) -> list[dict]:
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
               "maywrite": "mw" in flags,
               "growsdown": "gd" in flags, "path": path, "runs": [],
               "madvise": sorted(MADVISE[f] for f in flags if f in MADVISE),
               "lock": (LOCK_ONFAULT if "lf" in flags else LOCKED) if "lo" in flags else 0}
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
                o = deleted.map_object(pid, s, e, path, objs)
                if o is None:
                    raise Refused(f"mapping {s:#x}-{e:#x} is of a deleted file ({path}) "
                                  "that is not a regular file; not supported")
                rec.update(kind="shmem", object=o["id"])
            else:
                rec["kind"] = "file"
        else:
            raise Refused(f"mapping {s:#x}-{e:#x} {path} is of a kind not supported")
        if rec.get("kind") == "file":
            try:
                try:
                    ref = stat_ref(f"/proc/{pid}/map_files/{s:x}-{e:x}", path)
                except PermissionError:
                    # map_files needs CAP_SYS_ADMIN (CAP_CHECKPOINT_RESTORE): a checkpoint by
                    # the process's own user identifies the file by the device and inode
                    # /proc/PID/smaps shows instead
                    ref = stat_ref(path, path)
                    major, minor = (int(x, 16) for x in v["dev"].split(":"))
                    if (ref["dev"], ref["ino"]) != (os.makedev(major, minor), v["inode"]):
                        raise Refused(f"mapped file {path} was replaced since it was "
                                      "mapped") from None
                st2 = os.stat(path)
            except OSError as ex:
                raise Refused(f"mapped file {path}: {ex.strerror}") from ex
            if (st2.st_dev, st2.st_ino) != (ref["dev"], ref["ino"]):
                raise Refused(f"mapped file {path} was replaced since it was mapped")
            rec.update(kind="file", file=ref)
        # which pages hold process-private data the store must keep
        if not (rec["kind"] in ("file", "shmem") and shared):
            rec["runs"] = present_runs(pmfd, s, e, rec["kind"] == "anon")
        vmas.append(rec)
    return vmas


def future_lock(pid: int, scratch: int) -> int:
    """mlockall(MCL_FUTURE[|MCL_ONFAULT]) of PID, as MCL_* flags: the kernel shows it nowhere
    but in the flags new mappings get, so this reads the VmFlags of the scratch page cxlfork
    mapped in the process (ptrace.Tracee.map_scratch)."""
    from cxlfork import procfs
    for v in procfs.smaps(pid):
        if v["start"] <= scratch < v["end"]:
            if "lo" not in v["vmflags"]:
                return 0
            return MCL_FUTURE | (MCL_ONFAULT if "lf" in v["vmflags"] else 0)
    raise CxlforkError(f"PID {pid}: cxlfork's scratch page is not in /proc/{pid}/smaps")


def locked_bytes(m: dict) -> int:
    """What a clone of m has locked once restored (as the kernel counts it: whole VMAs)."""
    return sum(v["end"] - v["start"] for v in m["vmas"] if v.get("lock"))


def check_lock_limit(m: dict, image: str) -> None:
    """A clone's locked memory must fit its RLIMIT_MEMLOCK (the image's) unless this process
    has CAP_IPC_LOCK, which the clone inherits and which lets the kernel lock beyond it: one
    line before anything is spawned (the restorer's mlock would fail later otherwise)."""
    need = locked_bytes(m)
    if not need:
        return
    soft = m["rlimits"].get("memlock", [-1, -1])[0]
    if soft < 0 or soft >= need or soft == 2**64 - 1 or _has_cap_ipc_lock():
        return
    raise CxlforkError(f"{image}: the process had {need // 1024} KiB mlock()ed; its "
                       f"RLIMIT_MEMLOCK ({soft // 1024} KiB), which the clone gets, is too "
                       "small and this restore lacks CAP_IPC_LOCK: refused")


def _has_cap_ipc_lock() -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> 14 & 1)
    return False


# -- restore -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _self_specials() -> dict[str, tuple[int, int]]:
    out = {}
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] in SPECIAL:
                a, b = (int(x, 16) for x in parts[0].split("-"))
                out[parts[5]] = (a, b - a)
    return out


def check_specials(m: dict, image: str) -> None:
    """This kernel's vvar/vdso must have the checkpoint's sizes and relative layout."""
    mine = _self_specials()
    theirs = {v["path"]: (v["start"], v["end"] - v["start"]) for v in m["vmas"]
              if v["kind"] == "special"}
    if set(mine) != set(theirs) or any(mine[k][1] != theirs[k][1] for k in mine):
        raise ImageError(f"image {image}: this kernel's vvar/vdso layout "
                         f"({', '.join(f'{k} {v[1]} B' for k, v in sorted(mine.items()))}) "
                         "differs from the checkpoint's; restore needs the same kernel")
    if "[vdso]" in mine:
        for k in mine:
            if mine[k][0] - mine["[vdso]"][0] != theirs[k][0] - theirs["[vdso]"][0]:
                raise ImageError(f"image {image}: vvar/vdso relative layout differs from "
                                 "the checkpoint's")


def open_mapped_files(m: dict, fds_open: list[int]) -> dict[int, int]:
    """Check and open every mapped file once (read-write where the mapping needs it):
    {vma index: fd}; the fds are appended to fds_open."""
    file_fds: dict[int, int] = {}
    opened: dict[tuple[str, bool], int] = {}
    for i, v in enumerate(m["vmas"]):
        if v["kind"] != "file":
            continue
        image_mod.check_file(v["file"], "mapped file")
        # a shared mapping that may be made writable (VM_MAYWRITE: the file was opened
        # O_RDWR) needs a read-write fd even when it is read-only now
        rw = v["shared"] and (bool(v["prot"] & 2) or v.get("maywrite") is True)
        key = (v["file"]["path"], rw)
        if key not in opened:
            fd = os.open(key[0], (os.O_RDWR if rw else os.O_RDONLY) | os.O_CLOEXEC)
            fds_open.append(fd)
            opened[key] = fd
        file_fds[i] = opened[key]
    return file_fds


def object_mode(o: dict) -> int:
    """An object's permission bits (images without the field: memfd_create's 0777)."""
    mode = o.get("mode", 0o777)
    if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode < 0o10000:
        raise ImageError(f"manifest field objects[{o['id']}].mode: {mode!r} is not a file mode")
    return mode


def make_objects(m: dict, store: int, opened: list[int]) -> dict[int, int]:
    """One clone's own shared-memory objects (memfds refilled from the store fd): {id: fd}."""
    objfds = {}
    for o in m["objects"]:
        fd = lib.cx_memfd(f"cxlfork-{o['kind']}:{o['name']}".encode()[:240], MFD_ALLOW_SEALING)
        if fd < 0:
            raise CxlforkError(f"memfd_create: {os.strerror(-fd)}")
        opened.append(fd)
        os.fchmod(fd, object_mode(o))
        os.ftruncate(fd, o["size"])
        for off, n, sp in o["runs"]:
            todo = min(n * PAGE, o["size"] - off)
            done = 0
            os.lseek(fd, off, os.SEEK_SET)
            while done < todo:
                k = os.sendfile(fd, store, sp * PAGE + done, todo - done)
                if k <= 0:
                    raise CxlforkError("refilling a memfd from the store: short copy")
                done += k
        if o["seals"]:
            fcntl.fcntl(fd, F_ADD_SEALS, o["seals"])
        objfds[o["id"]] = fd
    return objfds

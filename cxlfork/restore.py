"""The restore pipeline: check the image -> lay out fds -> spawn the restorer -> it rebuilds
the address space from the page store -> install registers -> run.

    check     manifest validated (image.load), page file size, exe and mapped files unchanged,
              vvar/vdso sizes of this kernel equal to the checkpoint's (state.memory),
              signals and timers restorable (state.signals, state.timers), no uid or
              capability gained (state.creds)
    fds       per clone (state.fds and the module of each kind): stdio (--stdio), files
              reopened at their offsets, pipes refilled, socketpairs, eventfds, memfds
              (refilled from the store, state.memory); the restorer's own fds above them
    spawn     vfork-style clone (clone3 with set_tid for --same-pid) -> signals reset,
              session/pgrp, cwd, umask, fd table -> exec cxlfork-restorer, which runs the plan
              (cxlfork.plan: memory, signals, rlimits, mm, ..., the process's credentials
              last) while cxlfork PTRACE_SEIZEs it
              (EXITKILL) and sends it a go byte
    finish    at the restorer's hand-over stop (the SIGSEGV of returning into its own unmapped
              code): signal mask, xstate, registers (state.registers, state.threads); detach
              with the signal dropped
Any failure kills and reaps every clone made so far; nothing half-made is left running.

`prepare_restore(image)` does the check, the plan and the files once and returns an object
whose `.restore(n, stdio)` makes clones at the per-clone cost only (for servers such as the
porter that restore the same image again and again). With `ghosts=` (a
cxlfork.ghosts.GhostPool) the spawn step is replaced by handing the fds and the plan to a
pre-spawned restorer; a warm pool's ghosts have run the memory part of the plan already and
get only the clone's own fds.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from cxlfork import firstreq, ghosts as ghosts_mod, image as image_mod, plan as plan_mod
from cxlfork.cgtarget import CgroupTarget, spawn_args
from cxlfork.errors import CxlforkError
from cxlfork.native import ffi, lib, restorer_path
from cxlfork.ptrace import REGS_SIZE
from cxlfork.state import pidns as pidns_mod
from cxlfork.state import (creds, fds as fds_mod, memory, mountns as mountns_mod,
                           netns as netns_mod, pending, process, registers, signals,
                           threads, timers)

PAGE = 4096
MFD_CLOEXEC, MFD_ALLOW_SEALING = 1, 2
F_SEAL_ALL = 0x1 | 0x2 | 0x4 | 0x8   # seal, shrink, grow, write
F_ADD_SEALS = 1033
WALL = 0x40000000                    # waitpid's __WALL


# Validated manifests and built plans of this process, keyed by the manifest file's identity
# (device, inode, size, mtime): a restore of an image restored before skips the JSON parse, the
# checksum, the field validation and the plan build (a changed manifest is a new key). Files,
# the page file's size and the kernel's vvar/vdso are still checked every time.
_CACHE: dict[str, tuple] = {}
_CACHE_MAX = 64


def _stat_key(path: str):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _load_cached(image: str) -> tuple[dict, dict]:
    """(validated manifest, its plan cache) of image."""
    key = _stat_key(os.path.join(image, image_mod.MANIFEST))
    hit = _CACHE.get(image)
    if key is not None and hit is not None and hit[0] == key:
        return hit[1], hit[2]
    m = image_mod.load(image)
    if key is not None:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[image] = (key, m, {})
        return m, _CACHE[image][2]
    return m, {}


def _sealed_memfd(data: bytes, fds: list[int]) -> int:
    """A sealed memfd holding data (its fd is appended to fds)."""
    fd = lib.cx_memfd(b"cxlfork-plan", MFD_ALLOW_SEALING | MFD_CLOEXEC)
    if fd < 0:
        raise CxlforkError(f"memfd_create: {os.strerror(-fd)}")
    fds.append(fd)
    os.write(fd, data)
    fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_ALL)
    return fd


POOL_NO_ANON = ("pool image: its store-mapped anonymous memory has no anonymous semantics "
                "(DAX files have no userfaultfd minor faults): MADV_DONTNEED there brings "
                "back the checkpointed bytes, not zeros; moa --eager restores them exactly")


class Prepared:
    """Everything shared by the clones of one restore: manifest, plan bytes, open files."""

    def __init__(self, image: str, policy: str = "mow", warn=None, eager: bool = False,
                 anon: bool = True, huge: bool = True):
        self.image = os.path.abspath(image)
        self.lazy = policy == "moa" and not eager
        self.m, plans = _load_cached(self.image)
        m = self.m
        self.policy = policy
        if "pool" in m and not (policy == "moa" and eager):
            # the page file is a DAX file on a memory pool (cxlfork.poolstore): userfaultfd
            # has no minor faults there, so no lazy moa and no anonymous semantics
            if self.lazy:
                raise CxlforkError(f"restore of {self.image}: lazy moa is not available on "
                                   "the pool (no userfaultfd minor faults on DAX files); use "
                                   "moa with eager, or mow")
            if anon and warn:
                warn(POOL_NO_ANON)
            anon = False
        if policy not in plan_mod.POLICIES:
            raise CxlforkError(f"unknown policy {policy!r} (mow, moa or hybrid)")
        memory.check_specials(m, self.image)
        memory.check_lock_limit(m, self.image)
        signals.check_restorable(m, self.image)
        timers.check(m, self.image)
        pending.check(m, self.image)
        # no clone gains a uid or a capability its restorer lacks (state.creds)
        self.creds = creds.check_restorable(m, self.image, warn=warn)
        self.creds_flags = creds.steps(self.creds)
        image_mod.check_file(m["process"]["exe"], "executable")
        self.hot = image_mod.load_hot(self.image, m) if policy == "hybrid" else None
        self.first = None if self.lazy else firstreq.load(self.image, m)
        if policy == "hybrid" and self.hot is None and warn:
            warn("no hot-page record for this image (cxlfork profile); hybrid maps every page "
                 "from the store, as mow")
        self.fds_open: list[int] = []
        try:
            self.store_fd = image_mod.open_store_file(m, self.image)
            self.fds_open.append(self.store_fd)
            self.exe_fd = os.open(m["process"]["exe"]["path"], os.O_RDONLY | os.O_CLOEXEC)
            self.fds_open.append(self.exe_fd)
            self.file_fds = memory.open_mapped_files(m, self.fds_open)
        except OSError as e:
            self.close()
            raise CxlforkError(f"restore of {self.image}: {e.strerror}"
                               f"{' (' + e.filename + ')' if e.filename else ''}") from e
        except BaseException:
            self.close()
            raise
        # fd numbers: the process's own, then the restorer's above them
        own = [f["fd"] for f in m["fds"]]
        nxt = max(own + [2]) + 1
        self.num: dict = {}
        # the anonymous runs mapped from the store: registered with a userfaultfd served by
        # native/lazy.c (lazy moa copies; every policy gets anonymous MADV_DONTNEED/mremap)
        ukey = ("uffd_runs", policy, self.lazy, self.hot)
        runs = plans.get(ukey)
        if runs is None:
            runs = plans[ukey] = plan_mod.uffd_runs(m, policy, self.lazy, self.hot)
        runs = runs if self.lazy or anon else []
        self.uffd = bool(runs)
        for key in ["err", "store", "exe", "plan", "go"] + (["uffd_sock"] if self.uffd else []) + \
                [("file", i) for i in self.file_fds] + \
                [("obj", o["id"]) for o in m["objects"]]:
            self.num[key] = nxt
            nxt += 1
        self.num["cloexec"] = [f["fd"] for f in m["fds"] if f["cloexec"]]
        nums = dict(self.num)
        # huge: the page file is in 2 MiB folios (tmpfs huge=: st_blksize is 2 MiB), so the
        # plan prefaults its huge-aligned blocks with PMDs (plan.huge_blocks)
        self.huge = huge and os.fstat(self.store_fd).st_blksize == plan_mod.HUGE
        # the plan depends on these and m
        # the credentials themselves, not only the steps: two callers with different
        # capabilities (the restore service) get different capability sets in the plan
        pkey = (policy, self.lazy, self.hot, self.uffd, self.huge,
                json.dumps(self.creds, sort_keys=True, default=str))
        self.plan = plans.get(pkey)
        if self.plan is None:
            self.plan = plans[pkey] = plan_mod.build(m, policy, nums, self.hot, lazy=self.lazy,
                                                     huge=self.huge, creds=self.creds)
        if self.uffd:
            self.uffd_runs = [ffi.new("uint64_t[]", [r[k] for r in runs]) for k in range(3)]
            self.uffd_n = len(runs)
        # one sealed memfd holds the plan for every clone (the restorer maps it read-only)
        try:
            self.plan_fd = _sealed_memfd(self.plan, self.fds_open)
        except BaseException:
            self.close()
            raise
        self._warm = {}                 # {prefault: warm_plan()}
        self.regs, self.xstate = registers.packed(m)
        # other threads: (registers, xstate, blocked mask), in the plan's creation order
        self.threads = threads.packed(m)

    def warm_plan(self, prefault: bool = False) -> tuple[int, int]:
        """(sealed memfd of the plan for warm ghosts, the fd number of their socket).
        prefault: the ghosts also fill their store mappings' page tables and make the pages
        in the image's first-request write profile private (see plan.build, cxlfork.firstreq;
        the profile is read when this Prepared is made)."""
        if prefault and self.lazy:
            raise CxlforkError(f"prefaulting ghosts of {self.image}: lazy moa clones must "
                               "fault their store pages (each first touch is a copy)")
        if prefault not in self._warm:
            sock = max(v for k, v in self.num.items() if k != "cloexec") + 1
            plan = plan_mod.build(self.m, self.policy, dict(self.num), self.hot, lazy=self.lazy,
                                  warm_sock=sock, prefault=prefault, huge=self.huge,
                                  populate_write=(self.first or ()) if prefault else (),
                                  creds=self.creds)
            self._warm[prefault] = (_sealed_memfd(plan, self.fds_open), sock)
        return self._warm[prefault]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def restore(self, n: int = 1, stdio="auto", same_pid: bool = False,
                progress=None, ghosts=None, cgroup: str | None = None,
                netns: str = "new", pidns: str = "host") -> list[int]:
        """Restore n clones; returns their PIDs (children of this process). ghosts: a
        cxlfork.ghosts.GhostPool whose idle ghosts become the clones (spawned as usual when it
        is empty). cgroup: a cgroup directory the spawned restorers are born in (a pool
        passed with it must have been made with the same cgroup). netns: for an image with
        inet or named unix sockets, "new" gives each clone a network namespace of its own
        (`/proc/PID/ns/net`), "host" restores them into this process's. pidns "new": each
        clone in a new PID namespace of its own, under the checkpointed PID and tids
        (cxlfork.state.pidns); "host": in ours, under new ones."""
        if not self.fds_open:
            raise CxlforkError(f"restore of {self.image}: this prepared restore was closed")
        return _restore_prepared(self, n, stdio, same_pid, progress, ghosts, cgroup, netns,
                                 pidns)

    def close(self):
        for fd in self.fds_open:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds_open = []


def make_objects(p: Prepared, opened: list[int]) -> dict[int, int]:
    """One clone's own shared-memory objects (memfds refilled from the store): {id: fd}."""
    return memory.make_objects(p.m, p.store_fd, opened)


def _clone_fds(p: Prepared, stdio, opened: list[int], objfds: dict[int, int] | None = None,
               where: str = "in the clone's network namespace", paths=None
               ) -> tuple[list[int], list[int], dict[int, int]]:
    """(source fds in this process, destination numbers in the clone, its objects' fds);
    objfds: objects made already (a warm ghost's); paths: mountns.TempSockets."""
    if objfds is None:
        objfds = make_objects(p, opened)
    src, dst = fds_mod.clone_fds(p.m, stdio, opened, objfds, where, paths)
    return src, dst, objfds


class Clone:
    def __init__(self, pid: int, errfd: int):
        self.pid = pid
        self.errfd = errfd
        self.tids: list[int] = []       # its other threads, once created
        self.ns = None                  # its PID namespace (pidns.Namespace), if new


def _error_text(c: Clone) -> str:
    try:
        os.set_blocking(c.errfd, False)
        return os.read(c.errfd, 4096).decode(errors="replace").strip()
    except (BlockingIOError, OSError):
        return ""


def _kill(clones: list[Clone]) -> None:
    for c in clones:
        try:
            os.kill(c.pid, 9)
        except ProcessLookupError:
            pass
    for c in clones:
        for t in c.tids:                # traced threads are reaped before their leader
            try:
                os.waitpid(t, WALL)
            except ChildProcessError:
                pass
        try:
            os.waitpid(c.pid, 0)
        except ChildProcessError:
            pass
        if c.errfd >= 0:
            try:
                os.close(c.errfd)
            except OSError:
                pass
        if c.ns is not None:
            c.ns.kill()


def _status_text(st: int) -> str:
    if os.WIFEXITED(st):
        return f"exited with status {os.WEXITSTATUS(st)}"
    if os.WIFSIGNALED(st):
        return f"killed by signal {os.WTERMSIG(st)}"
    if os.WIFSTOPPED(st):
        return f"stopped by signal {os.WSTOPSIG(st)}"
    return f"status {st:#x}"


def prepare_restore(image: str, policy: str = "mow", warn=None, eager: bool = False,
                    anon: bool = True, huge: bool = True) -> Prepared:
    """Check IMAGE, build its restore plan and open the files its clones need, once.

    anon=False (mow, hybrid; for measurements): no userfaultfd for the store-mapped anonymous
    runs, which then behave as a plain private file mapping (MADV_DONTNEED brings back the
    checkpoint's bytes, docs/cxlfork.md). Lazy moa always has it.

    huge=False (for measurements): do not prefault the huge-aligned store blocks with PMDs
    at restore (plan.build's huge; on by default when the page file is in 2 MiB folios).

    The returned object restores clones with `.restore(n, stdio)` as often as wanted (the
    per-clone cost is then only the spawn of the restorer and its plan) and must be closed
    (`.close()`, or use it as a context manager). Files are checked when it is made: a file
    that changes afterwards is not noticed by later restores.
    """
    return Prepared(image, policy, warn, eager, anon, huge)


def restore(image: str, policy: str = "mow", n: int = 1, stdio: str = "auto",
            same_pid: bool = False, warn=None, progress=None, eager: bool = False,
            ghosts=None, cgroup: str | None = None, netns: str = "new",
            pidns: str = "host") -> list[int]:
    """Restore n clones of image; returns their PIDs (children of this process).

    policy "moa" is lazy unless eager=True: the clones map the store as in mow and a
    userfaultfd handler thread of this process (native/lazy.c) copies each block on first touch.
    Under mow and hybrid the same handler maps store pages on first touch and gives the
    store-mapped anonymous runs anonymous semantics (zeros after MADV_DONTNEED, mremap): this
    process must outlive the clones (or fork a server: serving(), serve_lazy_forever()).
    cgroup: a cgroup directory the clones are born in (cxlfork.cgtarget). netns: "new" (each
    clone of an image with inet or named unix sockets in a network namespace of its own) or
    "host" (this process's). pidns: "host" (clones under new PIDs in our PID namespace) or
    "new" (each clone in a new PID namespace of its own, under the checkpointed PID and thread
    IDs; cxlfork.state.pidns)."""
    t0 = time.perf_counter()
    if n < 1:
        raise CxlforkError("-n must be at least 1")
    if same_pid and n != 1:
        raise CxlforkError("--same-pid restores a single clone (-n 1)")
    if same_pid and ghosts is not None:
        raise CxlforkError("--same-pid cannot restore into a ghost: a ghost's PID is fixed "
                           "when it is spawned (restore without ghosts)")
    pidns_mod.check(pidns, same_pid, ghosts, 2)
    with Prepared(image, policy, warn, eager) as p:
        pids = _restore_prepared(p, n, stdio, same_pid, progress, ghosts, cgroup, netns,
                                 pidns)
    restore.last_seconds = time.perf_counter() - t0
    return pids


def _lazy_add(p: Prepared, pid: int, sock: int) -> None:
    """Give the clone's socket (its restorer sends the userfaultfd there) to the handler."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as e:
        os.close(sock)
        raise CxlforkError(f"pidfd_open of clone {pid}: {e.strerror}") from e
    e = lib.cx_lazy_add(sock, pidfd, 1 if p.lazy else 0, p.store_fd,
                        p.m["store"]["pages"] * PAGE, p.uffd_n, *p.uffd_runs)
    if e < 0:
        os.close(sock)
        os.close(pidfd)
        raise CxlforkError(f"starting the userfaultfd handler of the clones: {os.strerror(-e)}")


def lazy_stats() -> dict:
    """The userfaultfd handler of this process (native/lazy.c): clones served (forked children
    of clones included), faults, pages copied (lazy moa), mapped from the store (mow, hybrid)
    and zero-filled (after MADV_DONTNEED or in a range grown by mremap), REMOVE (MADV_DONTNEED)
    and REMAP (mremap) events, forks."""
    out = ffi.new("uint64_t[8]")
    lib.cx_lazy_stats(out)
    return dict(zip(("clones", "faults", "pages_copied", "pages_mapped", "pages_zeroed",
                     "removes", "remaps", "forks"), (int(x) for x in out)))


def serving() -> bool:
    """Whether this process's userfaultfd handler serves clones (restore --detach must then
    leave a process behind to go on serving them)."""
    return lazy_stats()["clones"] > 0


def pause_lazy() -> None:
    """Stop this process's handler thread for good, between two rounds (its state stays as it
    is): right before an os.fork() whose child takes over with serve_lazy_forever(), so that
    the parent reads no event after the child's copy of the tables was made."""
    lib.cx_lazy_pause()


def serve_lazy_forever() -> None:
    """Serve the clones of this process's userfaultfd handler in the calling thread until all
    have exited (for a process forked to stay behind a detached restore)."""
    lib.cx_lazy_serve()


def sync_lazy(timeout_s: float = 5.0) -> None:
    """Make sure the handler holds every clone's userfaultfd (call before os.fork(), so that
    the child takes them along)."""
    if lib.cx_lazy_sync(int(timeout_s * 1000)):
        raise CxlforkError("the userfaultfd handler did not receive every clone's userfaultfd "
                           f"within {timeout_s:g} s")


def _take_ghost(p: Prepared, pool, same_pid: bool):
    """An idle ghost of pool for one clone, or None (no pool, the pool is empty, or this
    image has more fds or a longer cwd than one message to a ghost carries)."""
    if pool is None:
        return None
    if same_pid:
        raise CxlforkError("--same-pid cannot restore into a ghost: a ghost's PID is fixed "
                           "when it is spawned (restore without ghosts)")
    if pool.prepared is not None and pool.prepared is not p:
        raise CxlforkError(f"this ghost pool is warm for {pool.prepared.image} "
                           f"({pool.prepared.policy}), not for this prepared restore of "
                           f"{p.image} ({p.policy})")
    if len(p.m["fds"]) + len(p.num) + 2 > ghosts_mod.MAX_FDS or \
            64 + 4 * ghosts_mod.MAX_FDS + len(p.m["process"]["cwd"].encode()) >= \
            lib.CX_GHOST_MSG:
        return None
    return pool.take()


def _send_to_ghost(p: Prepared, g, c_src, c_dst, nfd: int, c_cwd, sidmode: int,
                   err_index: int, ns_index: int = -1, mnt_index: int = -1) -> int:
    """Hand the clone's fd table (and, to a cold ghost, its plan) to ghost g; its PID.
    ns_index, mnt_index: where the fds of the clone's network and mount namespaces are in
    the table (-1: none)."""
    e = lib.cx_ghost_send(g.sock, c_src, c_dst, nfd, c_cwd, p.m["process"]["umask"],
                          sidmode, err_index, p.num["plan"],
                          (ns_index + 1) | (mnt_index + 1) << 32)
    os.close(g.sock)                # the ghost has its message (or is gone)
    g.sock = -1
    if e < 0:
        g.discard()
        raise CxlforkError(f"handing a restore to ghost {g.pid}: {os.strerror(-e)}")
    return g.pid


def _open_cgroup(cgroup: str | None, ghosts) -> CgroupTarget | None:
    """The restore's CgroupTarget; refuses a pool whose ghosts live in another cgroup."""
    mine = CgroupTarget(cgroup) if cgroup is not None else None
    theirs = getattr(ghosts, "cgroup", None)
    if ghosts is not None and (mine.path if mine else None) != (theirs.path if theirs else None):
        if mine is not None:
            mine.close()
        raise CxlforkError(f"the ghost pool's ghosts are in cgroup "
                           f"{theirs.path if theirs else '(ours)'}, not in "
                           f"{mine.path if mine else '(ours)'} as this restore asks")
    return mine


def _restore_prepared(p: Prepared, n: int, stdio, same_pid: bool, progress,
                      ghosts=None, cgroup: str | None = None, netns: str = "new",
                      pidns: str = "host") -> list[int]:
    if n < 1:
        raise CxlforkError("-n must be at least 1")
    if netns not in ("new", "host"):
        raise CxlforkError(f"netns must be new or host, not {netns!r}")
    pidns_mod.check(pidns, same_pid, ghosts, p.m["process"]["pid"])
    cg = _open_cgroup(cgroup, ghosts)
    try:
        return _restore_into(p, n, stdio, same_pid, progress, ghosts, cg,
                             netns == "new" and netns_mod.needed(p.m), pidns)
    finally:
        if cg is not None:
            cg.close()


def _restore_into(p: Prepared, n: int, stdio, same_pid: bool, progress, ghosts,
                  cg: CgroupTarget | None, own_netns: bool = False,
                  pidns: str = "host") -> list[int]:
    if same_pid and n != 1:
        raise CxlforkError("--same-pid restores a single clone (-n 1)")
    if same_pid and ghosts is not None:
        _take_ghost(p, ghosts, same_pid)          # refuses
    m = p.m
    image = p.image
    restorer = restorer_path().encode()
    clones: list[Clone] = []
    proc = m["process"]
    sidmode = process.session_mode(m)
    set_tid = proc["pid"] if same_pid or pidns == "new" else 0
    if same_pid and os.path.exists(f"/proc/{set_tid}"):
        raise CxlforkError(f"PID {set_tid} is in use; --same-pid needs it free")
    argv = [ffi.new("char[]", restorer), ffi.new("char[]", str(p.num["plan"]).encode()),
            ffi.NULL]
    c_argv = ffi.new("char *[]", argv)
    c_cwd = proc["cwd"].encode()
    st = ffi.new("int *")
    pending = ffi.new("int *")
    go_w: list[int] = []            # our ends of the clones' go pipes, until sent
    try:
        for k in range(n):
            opened: list[int] = []
            g = _take_ghost(p, ghosts, same_pid)
            warm = g is not None and g.objfds is not None
            ns = None
            try:
                # the clone's own network namespace (made now, or by a warm pool with its
                # ghost): this thread enters it, makes the clone's sockets in it and spawns
                # the restorer from it (a ghost setns()es into it)
                ns, g_ns = None, getattr(g, "netns", None)
                if g_ns is not None:
                    g.netns = None
                    if own_netns:
                        ns = g_ns
                    else:
                        g_ns.close()
                if own_netns and ns is None:
                    ns = netns_mod.NetNs.make(m)
                if ns is not None:
                    ns.enter()
                where = "in the clone's network namespace" if ns else \
                    "in this network namespace (--netns host)"
                paths = mountns_mod.PathSockets(m)
                paths.make(ns.fd if ns is not None else -1, opened)
                src, dst, objfds = _clone_fds(p, stdio, opened, g.objfds if warm else None,
                                              where, paths)
                if warm:
                    opened += g.objfds.values()     # the ghost has its own references
                    g.objfds = {}
                er, ew = os.pipe2(os.O_CLOEXEC)
                opened.append(ew)
                gr, gw = os.pipe2(os.O_CLOEXEC)
                opened.append(gr)
                go_w.append(gw)
                extra = {"err": ew, "go": gr}
                if not warm:                        # a warm ghost holds these already
                    extra.update({"store": p.store_fd, "exe": p.exe_fd, "plan": p.plan_fd})
                    extra.update({("file", i): fd for i, fd in p.file_fds.items()})
                    extra.update({("obj", oid): fd for oid, fd in objfds.items()})
                if p.uffd:
                    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                    opened.append(theirs.detach())
                    lazy_sock = mine.detach()
                    extra["uffd_sock"] = opened[-1]
                err_index = len(src)
                for key, fd in extra.items():
                    src.append(fd)
                    dst.append(p.num[key])
                ns_index = mnt_index = -1
                if ns is not None and g is not None:
                    ns_index = len(src)
                    src.append(ns.fd)
                    dst.append(max(dst) + 2)        # above the ghost's socket; it closes it
                c_src = ffi.new("int[]", src)
                c_dst = ffi.new("int[]", dst)

                def spawn():
                    return lib.cx_spawn(restorer, c_argv, c_src, c_dst, len(src), c_cwd,
                                        proc["umask"], sidmode, set_tid, err_index,
                                        *spawn_args(cg))
                if paths.mnt_fd >= 0 and g is not None:
                    mnt_index = len(src)            # the ghost setns()es into it
                    src.append(paths.mnt_fd)
                    dst.append(max(dst) + 2)
                    c_src = ffi.new("int[]", src)
                    c_dst = ffi.new("int[]", dst)
                pns = None
                if g is not None:
                    pid = _send_to_ghost(p, g, c_src, c_dst, len(src), c_cwd, sidmode, err_index,
                                         ns_index, mnt_index)
                elif paths.mnt_fd >= 0:
                    # path-bound unix sockets: spawned from a thread in the clone's own mount
                    # namespace (cxlfork.state.mountns), which makes the PID namespace's
                    # init first with --pidns new (both are born in the clone's namespaces)
                    made: list = []

                    def spawn_in_ns():
                        if pidns == "new":
                            made.append(pidns_mod.new(restorer, spawn_args(cg)))
                        try:
                            return spawn()
                        finally:
                            if made:
                                made[0].leave()
                    try:
                        pid = paths.spawn(spawn_in_ns, ns.fd if ns is not None else -1)
                    except BaseException:
                        if made:
                            made[0].kill()
                        raise
                    pns = made[0] if made else None
                else:
                    if pidns == "new":      # this thread's children are born in it
                        pns = pidns_mod.new(restorer, spawn_args(cg))
                    try:
                        pid = spawn()
                    finally:
                        if pns is not None:
                            pns.leave()
                if ns is not None:      # back home before anything can start a thread here
                    ns.close()          # (the lazy handler's would keep the namespace alive)
                    ns = None
                if pid < 0 and pns is not None:
                    pns.kill()
                if pid < 0:
                    os.close(er)
                    os.close(go_w.pop())
                    if p.uffd:
                        os.close(lazy_sock)
                    if same_pid and -pid == 17:
                        raise CxlforkError(f"PID {set_tid} is in use; --same-pid needs it free")
                    raise CxlforkError(f"spawning the restorer: {os.strerror(-pid)}")
                clones.append(Clone(pid, er))
                if pns is not None:
                    clones[-1].ns = pns
                    pns.start(pid, set_tid)
                if p.uffd:
                    _lazy_add(p, pid, lazy_sock)
            except BaseException:
                if g is not None and g.sock >= 0:   # taken, not handed the restore
                    g.discard()
                raise
            finally:
                if ns is not None:
                    ns.close()          # back home; the clone (if any) holds its namespace
                for fd in opened:
                    os.close(fd)
            e = lib.cx_start(pid, go_w[-1], 1 if p.threads else 0)
            if e < 0:
                os.close(go_w.pop())
                time.sleep(0.01)
                raise CxlforkError(f"restorer for clone {k + 1} did not start: "
                                   f"{_error_text(clones[-1]) or os.strerror(-e)}")
            if p.threads:
                clones[-1].tids, e = threads.wait_parked(pid, len(p.threads), go_w[-1])
                if e < 0:
                    os.close(go_w.pop())
                    time.sleep(0.01)
                    raise CxlforkError(f"creating the threads of clone {k + 1}: "
                                       f"{_error_text(clones[-1]) or os.strerror(-e)}")
            os.close(go_w.pop())
        for k, c in enumerate(clones):
            e = lib.cx_wait_handover(c.pid, c.errfd, 30000, st, pending)
            if e < 0:
                msg = _error_text(c) or _status_text(st[0])
                raise CxlforkError(f"restoring clone {k + 1} of {image} failed: {msg}")
            threads.finish(c.tids, p.threads, k + 1)
            e = lib.cx_finish(c.pid, p.regs, REGS_SIZE, p.xstate, len(p.xstate),
                              m["signals"]["blocked"], pending[0])
            if e < 0:
                raise CxlforkError(f"installing registers in clone {k + 1}: {os.strerror(-e)} "
                                   f"{_error_text(c)}")
            os.close(c.errfd)
            c.errfd = -1
            if progress:
                progress(k + 1, n)
    except BaseException:
        for fd in go_w:
            os.close(fd)
        _kill([c for c in clones])
        raise
    for c in clones:
        c.ns = None                     # running: the init lives as long as its clone
    return [c.pid for c in clones]

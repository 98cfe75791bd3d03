"""The dump pipeline: freeze -> collect each kind of state -> write present pages into the
page store -> publish the manifest -> resume (or kill) the process.

    freeze    ptrace seize + interrupt of every thread (ptrace.Tracee)
    collect   one module per kind of state (cxlfork.state): process tree refused; in the
              injection window (syscalls run through the target's vDSO, scratch page mapped
              and unmapped again) signals, tid address, brk, the other threads, timers; then
              pending signals (PTRACE_PEEKSIGINFO),
              registers, process (exe, cwd, umask, mm, rlimits, credentials), fds (files, pipes, sockets,
              eventfds, epoll, timerfd, signalfd, inotify, FIFOs, deleted files), memory
              (mappings, shmem objects)
    pages     cxlfork.pages: every stored run copied into the page file, hashed
    publish   manifest into IMAGE.tmp.PID, page file renamed into place, directory renamed to
              IMAGE; a failure or SIGTERM/SIGINT on the way removes both and resumes the process
"""
from __future__ import annotations

import os
import secrets
import signal
import time
from contextlib import contextmanager

import psutil

from cxlfork import FORMAT, FORMAT_VERSION, image as image_mod, procfs
from cxlfork.errors import CxlforkError, Refused
from cxlfork.pages import write_pages
from cxlfork.ptrace import Tracee
from cxlfork.state import (creds, fds as fds_mod, fifos, memory, pending, process, registers,
                           signals, threads, timers)
from cxlfork.store import open_store

PAGE = 4096


@contextmanager
def injection_window(tr: Tracee, maps: list[dict]):
    """Syscalls may be injected into every thread of tr inside: a syscall instruction of its
    vDSO is found and a scratch page mapped; on the way out the scratch page is unmapped and
    every thread's original registers are put back at once."""
    vdso = next((v for v in maps if v["path"] == "[vdso]"), None)
    if vdso is None:
        raise Refused(f"PID {tr.pid} has no vDSO (booted with vdso=0?); not supported")
    tr.find_syscall_insn(vdso["start"], vdso["end"])
    tr.map_scratch()
    try:
        yield
    finally:
        for t in tr.threads:
            t.scratch = 0
            t.put_back_regs()
        tr.unmap_scratch()
        tr.put_back_regs()


def collect(tr: Tracee, tree: dict | None = None) -> dict:
    """Every kind of state of the frozen process tr, as manifest fields (plus "_objs", the
    shmem objects with fds to read them, which the caller closes). tree: this process is one
    of a tree checkpointed whole (cxlfork.tree): its children are not refused, nor pipes
    whose other end is in the tree (tree["pipes"]: their inodes)."""
    pid = tr.pid
    tr.freeze_threads()
    if tree is None:
        process.refuse_tree(pid)
    status = procfs.status(pid)
    process.refuse_seccomp(pid, status)
    with injection_window(tr, procfs.maps(pid)):
        sigs = signals.collect(tr, status)
        tid_address = tr.tid_address()
        brk = tr.brk()
        thread_recs = threads.collect(tr)
        tmrs = timers.collect(tr)
        future_lock = memory.future_lock(pid, tr.scratch)
        cred = creds.collect(tr, status)
    pend = pending.collect(tr)
    regs = registers.collect(tr, tid_address)
    proc = process.collect(pid, status, brk, cred)
    objs = memory.Objects()
    try:
        fds = fds_mod.collect(pid, objs, tree["pipes"] if tree else ())
        vmas = memory.collect(pid, procfs.smaps(pid), objs)
    except BaseException:
        objs.close()
        raise
    return {"process": proc["process"], **regs, "signals": sigs, "mm": proc["mm"],
            "rlimits": proc["rlimits"], "fds": fds, "vmas": vmas, "threads": thread_recs,
            "timers": tmrs, "pending": pend, "mlockall": future_lock, "_objs": objs}


PF_KTHREAD = 0x00200000
PF_IO_WORKER = 0x00000010


def _refuse_io_workers(pid: int) -> None:
    """io_uring's kernel threads (iou-sqp-N, iou-wrk-N: PF_IO_WORKER) are tasks of the
    process that ptrace cannot stop (seizing them failed with ESRCH and the process died):
    refused before anything is seized, naming one. Its io_uring fds are refused anyway."""
    try:
        tids = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
    except OSError:
        return                                # gone meanwhile: the next step says so
    for tid in tids:
        try:
            st = procfs.read_text(pid, f"task/{tid}/stat")
        except CxlforkError:
            continue
        comm, _, rest = st.partition(" (")[2].rpartition(")")
        if int(rest.split()[6]) & PF_IO_WORKER:
            raise Refused(f"PID {pid} uses io_uring (its kernel thread {tid} {comm}); "
                          "io_uring is not supported: the process was not stopped")


def _refuse_what_is_not_a_user_process(pid: int) -> None:
    """Say what PID is when it cannot be checkpointed by its nature, before ptrace would
    answer ESRCH or EPERM: a kernel thread, a zombie, the init of a PID namespace."""
    try:
        p = psutil.Process(pid)
        name, zombie = p.name(), p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        raise CxlforkError(f"no process with PID {pid}") from None
    try:                                  # psutil has no task flags nor NSpid
        flags = int(procfs.read_text(pid, "stat").rpartition(")")[2].split()[6])
        nspid = next((ln.split()[1:] for ln in procfs.read_text(pid, "status").splitlines()
                      if ln.startswith("NSpid:")), [])
    except CxlforkError:
        return                            # gone meanwhile: the next step says so
    if flags & PF_KTHREAD:
        raise CxlforkError(f"PID {pid} ({name}) is a kernel thread: it has no user address "
                           "space or registers to checkpoint (only user processes can be)")
    if zombie:
        raise CxlforkError(f"PID {pid} ({name}) is a zombie: it has exited and waits for its "
                           "parent to reap it; there is nothing left to checkpoint")
    _refuse_io_workers(pid)
    if nspid and nspid[-1] == "1":
        where = "this PID namespace" if pid == 1 else "a PID namespace (PID 1 there)"
        raise CxlforkError(f"PID {pid} ({name}) is the init process of {where}: cxlfork does "
                           "not checkpoint an init (it is the parent of the namespace's "
                           "orphans, and its clone would not be PID 1 of a namespace)")


def checkpoint(pid: int, image: str, store_dir: str | None = None, kill: bool = False,
               progress=None, warn=None, tree: dict | None = None) -> dict:
    """Checkpoint PID into IMAGE (a new directory). Returns the summary with timings.
    tree: one process of a tree (cxlfork.tree.checkpoint_tree): {"pipes": inodes of pipes
    inside the tree, "manifest": the root's "tree" field, or None}."""
    t0 = time.perf_counter()
    image = os.path.abspath(image)
    if pid == os.getpid():
        raise CxlforkError("cannot checkpoint cxlfork itself")
    if not os.path.exists(f"/proc/{pid}"):
        raise CxlforkError(f"no process with PID {pid}")
    _refuse_what_is_not_a_user_process(pid)
    if os.path.lexists(image):
        raise CxlforkError(f"{image} already exists (remove it with 'cxlfork rm')")
    if not os.path.isdir(os.path.dirname(image)):
        raise CxlforkError(f"directory {os.path.dirname(image)} does not exist")
    _check_ptrace_allowed(pid)
    image_mod.trust.key(create=True)          # the sealing key: refused or made before freezing
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
        state = collect(tr, tree)
        if kill:
            fifos.refuse_on_kill(state["fds"])
        t_collected = time.perf_counter()
        phash = write_pages(state, tmp_pages, store.node, progress)
        t_dumped = time.perf_counter()
        if not kill:
            tr.detach()
        npages = max((r[2] + r[1] for v in state["vmas"] for r in v["runs"]), default=0)
        npages = max([npages] + [r[2] + r[1] for o in state["_objs"].by_ino.values()
                                 for r in o["runs"]])     # the page file's size, holes in it
        objs = state.pop("_objs")
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION, "id": image_id,
            "created": time.time(), "kernel": os.uname().release,
            "machine": os.uname().machine, **state,
            **({"tree": tree["manifest"]} if tree and tree.get("manifest") else {}),
            "objects": sorted(objs.by_ino.values(), key=lambda o: o["id"]),
            "store": {"dir": store.path, "file": os.path.basename(store.pages_path(image_id)),
                      "pages": npages, "hash": phash, "hash_alg": image_mod.HASH_ALG,
                      "node": store.node},
        }
        # the page file gets its final name before the manifest pins it (rename sets ctime)
        os.rename(owner_tmp, store.owner_path(image_id))
        os.rename(tmp_pages, store.pages_path(image_id))
        manifest["store"]["pin"] = _pin(store.pages_path(image_id))
        objs.close()
        manifest["stats"] = {"freeze_ms": (t_frozen - t0) * 1e3,
                             "collect_ms": (t_collected - t_frozen) * 1e3,
                             "pages_ms": (t_dumped - t_collected) * 1e3,
                             "frozen_ms": (time.perf_counter() - t_frozen) * 1e3}
        seal = image_mod.checksum(manifest, create_key=True)
        image_mod.validate(dict(manifest, checksum=seal), image)
        image_mod.write_tmp(image, manifest, seal)
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


def _pin(path: str) -> dict:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return image_mod.pin_of(os.fstat(fd))
    finally:
        os.close(fd)


def _check_ptrace_allowed(pid: int) -> None:
    """Fail early, before anything is created, when the caller may not ptrace PID."""
    try:
        os.close(os.open(f"/proc/{pid}/mem", os.O_RDONLY))
    except FileNotFoundError as e:
        raise CxlforkError(f"no process with PID {pid}") from e
    except ProcessLookupError as e:       # /proc/PID is there but no memory: it just exited
        raise CxlforkError(f"PID {pid} has no memory to read (it exited)") from e
    except PermissionError as e:
        raise CxlforkError(f"cannot ptrace PID {pid}: permission denied (not yours, or yama "
                           "ptrace_scope forbids it; run as root or as its owner)") from e


def _raise_interrupt(signum, frame):
    raise CxlforkError(f"interrupted by signal {signum}; nothing was published and the "
                       "process was resumed")

"""Process trees: a process with children checkpointed whole and restored in a new PID
namespace with the original PIDs (so stored child PIDs, waitpid and kill(child) keep working).

Checkpoint (`checkpoint_tree`): the root and each child are checkpointed one after another by
the single-process pipeline (each frozen while it is dumped), the children into
IMAGE/tree/PID (images of their own); the root's manifest gets a "tree" field: its children
(pid, image) and the open file descriptions a child shares with the root ("shared": pipe
ends inherited through fork, found with kcmp). Pipes whose ends are all inside the tree are
accepted. Refused with one line: grandchildren, zombie children, a child sharing any other
open file description than a pipe end with the root (files, sockets...).

Restore (`restore_tree`): one new PID namespace per clone tree (cxlfork.state.pidns); the
root's restorer is spawned under the root's PID and, before its exec, forks each child's
restorer under its PID (cx_spawn_tree), so the children are the root's children; pipes are
made once per tree and each shared end is the same open file description in every process.
Each process then runs its own plan; cxlfork seizes each one and hands it over as a single
process. Policies: mow, hybrid and eager moa (lazy moa is refused for trees).
"""
from __future__ import annotations

import ctypes
import os
import time

import psutil

from cxlfork import checkpoint as ckpt_mod, image as image_mod, procfs
from cxlfork.cgtarget import spawn_args
from cxlfork.errors import CxlforkError, Refused
from cxlfork.native import ffi, lib, restorer_path
from cxlfork.ptrace import REGS_SIZE
from cxlfork.state import fds as fds_mod, netns as netns_mod, pidns as pidns_mod, threads

_libc = ctypes.CDLL(None, use_errno=True)
SYS_KCMP, KCMP_FILE = 312, 0


def _same_ofd(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    return _libc.syscall(SYS_KCMP, pid1, pid2, KCMP_FILE, fd1, fd2) == 0


def _fds(pid: int) -> dict[int, str]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass
    return out


def _end(pid: int, fd: int) -> str:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            flags = next(int(x.split()[1], 8) for x in f if x.startswith("flags:"))
    except (OSError, StopIteration):
        return "?"
    return "r" if flags & 3 == os.O_RDONLY else "w"


def children(pid: int) -> list[int]:
    """The children of PID (a tree's other processes); refuses what trees cannot carry."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess as e:
        raise CxlforkError(f"no process with PID {pid}") from e
    try:
        out = []
        for k in (psutil.Process(c) for c in procfs.children(root.pid)):
            if k.status() == psutil.STATUS_ZOMBIE:
                continue                # zombies(): carried as their exit status
            grand = procfs.children(k.pid)
            if grand:
                raise Refused(f"PID {pid}'s child {k.pid} has children of its own "
                              f"({', '.join(str(g) for g in grand[:5])}); trees "
                              "deeper than one level are not supported yet")
            out.append(k.pid)
    except psutil.NoSuchProcess as e:
        raise CxlforkError(f"a process of the tree of PID {pid} exited while being read") from e
    return sorted(out)


def zombies(pid: int) -> list[dict]:
    """The zombie children of PID: [{pid, zombie: wait status (proc(5) exit_code)}]."""
    out = []
    for c in procfs.children(pid):
        try:
            k = psutil.Process(c)
            if k.status() == psutil.STATUS_ZOMBIE:
                st = procfs.stat(k.pid)
                out.append({"pid": k.pid, "zombie": int(st[52])})
        except (psutil.NoSuchProcess, OSError, IndexError):
            pass
    return sorted(out, key=lambda z: z["pid"])


def _sharing(root: int, kids: list[int]) -> tuple[set[int], list[dict]]:
    """(inodes of pipes with every end in the tree, [{pid, fd, root_fd}] open file
    descriptions of pipe ends a child shares with the root). Refuses other shared ones."""
    rfds = _fds(root)
    ends: dict[int, set[str]] = {}
    shared = []
    for pid, fds in [(root, rfds)] + [(k, _fds(k)) for k in kids]:
        for fd, link in fds.items():
            if link.startswith("pipe:["):
                ends.setdefault(int(link[6:-1]), set()).add(_end(pid, fd))
            if pid == root or (fd <= 2 and not link.startswith("pipe:[")):
                continue
            same = next((a for a, la in rfds.items() if la == link and a > 2 and
                         _same_ofd(root, a, pid, fd)), None)
            if same is None:
                continue
            if not link.startswith("pipe:["):
                raise Refused(f"fd {fd} of PID {pid} shares its open file description with fd "
                              f"{same} of its parent {root} ({link}); in a process tree only "
                              "pipe ends can be shared yet")
            shared.append({"pid": pid, "fd": fd, "root_fd": same})
    return {ino for ino, e in ends.items() if e == {"r", "w"}}, shared


def checkpoint_tree(pid: int, image: str, store_dir: str | None = None, kill: bool = False,
                    progress=None, warn=None) -> dict:
    """Checkpoint PID and its children into IMAGE (see the module's docstring)."""
    ckpt_mod._refuse_what_is_not_a_user_process(pid)   # before its children are looked at
    kids = children(pid)
    dead = zombies(pid)
    if not kids and not dead:
        return ckpt_mod.checkpoint(pid, image, store_dir, kill, progress, warn)
    pipes, shared = _sharing(pid, kids)
    image = os.path.abspath(image)
    manifest = {"children": [{"pid": k, "image": f"tree/{k}"} for k in kids],
                "zombies": dead, "shared": shared}
    out = ckpt_mod.checkpoint(pid, image, store_dir, False, progress, warn,
                              tree={"pipes": pipes, "manifest": manifest})
    try:
        os.mkdir(os.path.join(image, "tree"), 0o700)
        for k in kids:
            ckpt_mod.checkpoint(k, os.path.join(image, "tree", str(k)), store_dir, False,
                                None, warn, tree={"pipes": pipes, "manifest": None})
    except BaseException:
        image_mod.remove(image)
        raise
    if kill:
        for p in [pid] + kids:
            try:
                os.kill(p, 9)
            except ProcessLookupError:
                pass
    out["children"] = kids
    out["killed"] = kill
    return out


def is_tree(image: str) -> bool:
    return bool(image_mod.load(image).get("tree"))


def _kid_pids(root: int, want: dict[int, int], timeout_s: float, err_of) -> dict[int, int]:
    """{checkpointed PID: host PID} of the root restorer's children, once all are forked."""
    t = time.monotonic()
    while True:
        try:
            with open(f"/proc/{root}/task/{root}/children") as f:
                host = [int(x) for x in f.read().split()]
        except OSError:
            host = []
        got = {}
        for h in host:
            try:
                with open(f"/proc/{h}/status") as f:
                    ns = next(x.split()[1:] for x in f if x.startswith("NSpid:"))
                got[int(ns[-1])] = h
            except (OSError, StopIteration):
                pass
        if set(want) <= set(got):
            return {p: got[p] for p in want}
        if time.monotonic() - t > timeout_s or not os.path.exists(f"/proc/{root}"):
            raise CxlforkError(f"the tree's root restorer did not fork its children: "
                               f"{err_of() or 'timeout'}")
        time.sleep(0.001)


def _wait_zombies(root: int, dead: list[dict], timeout_s: float = 30.0) -> None:
    """Wait until the root restorer's zombie children have died (before the root runs)."""
    want = {z["pid"] for z in dead}
    t = time.monotonic()
    while want:
        try:
            with open(f"/proc/{root}/task/{root}/children") as f:
                host = [int(x) for x in f.read().split()]
        except OSError:
            host = []
        for h in host:
            try:
                with open(f"/proc/{h}/status") as f:
                    st = dict(x.split(":", 1) for x in f if ":" in x)
                if st["State"].strip().startswith("Z"):
                    want.discard(int(st["NSpid"].split()[-1]))
            except (OSError, KeyError):
                pass
        if want and time.monotonic() - t > timeout_s:
            raise CxlforkError(f"the tree's zombie children {sorted(want)} did not exit")
        if want:
            time.sleep(0.001)


def restore_tree(image: str, policy: str = "mow", n: int = 1, stdio="inherit", warn=None,
                 eager: bool = False, cgroup: str | None = None, progress=None) -> list[int]:
    """Restore n clone trees of a tree IMAGE, each in a new PID namespace; returns each
    tree's root (host PIDs, children of this process)."""
    from cxlfork import restore as rs     # the restore side: imported when used
    if policy == "moa" and not eager:
        raise CxlforkError("a process tree restores with mow, hybrid or moa --eager; lazy moa "
                           "is not supported for trees yet")
    # anon=False: a tree's store-mapped anonymous memory is not served by the userfaultfd
    # handler yet (MADV_DONTNEED there brings back the checkpointed bytes; docs/cxlfork.md)
    root = rs.Prepared(image, policy, warn, eager, anon=False)
    preps = [root]
    try:
        tree = root.m["tree"]
        for c in tree["children"]:
            preps.append(rs.Prepared(os.path.join(root.image, c["image"]), policy, warn, eager,
                                     anon=False))
        for p in preps:
            if netns_mod.needed(p.m):
                raise CxlforkError(f"{image}: a process tree with inet or named unix sockets "
                                   "does not restore yet (network namespaces for trees are not "
                                   "done)")
        cg = rs._open_cgroup(cgroup, None)
        try:
            return [_one(preps, tree, stdio, cg, k + 1) for k in range(n)]
        finally:
            if cg is not None:
                cg.close()
    finally:
        for p in preps:
            p.close()


def _one(preps, tree, stdio, cg, k: int) -> int:
    from cxlfork import restore as rs     # the restore side: imported when used
    restorer = restorer_path().encode()
    opened: list[int] = []
    pipes_made: dict = {}
    clones: list[rs.Clone] = []
    go_w: dict[int, int] = {}
    keep = []                               # cffi buffers alive until the spawn
    specs = []
    ns = None
    root_src: dict[int, int] = {}
    try:
        for i, p in enumerate(preps):
            objfds = rs.make_objects(p, opened)
            given = {} if i == 0 else {s["fd"]: root_src[s["root_fd"]] for s in tree["shared"]
                                       if s["pid"] == p.m["process"]["pid"]}
            src, dst = fds_mod.clone_fds(p.m, stdio, opened, objfds,
                                         pipes_made=pipes_made, given=given)
            if i == 0:
                root_src = dict(zip(dst, src))
            er, ew = os.pipe2(os.O_CLOEXEC)
            gr, gw = os.pipe2(os.O_CLOEXEC)
            opened += [ew, gr]
            go_w[i] = gw
            extra = {"err": ew, "go": gr, "store": p.store_fd, "exe": p.exe_fd,
                     "plan": p.plan_fd}
            extra.update({("file", j): fd for j, fd in p.file_fds.items()})
            extra.update({("obj", oid): fd for oid, fd in objfds.items()})
            err_index = len(src)
            for key, fd in extra.items():
                src.append(fd)
                dst.append(p.num[key])
            argv = [ffi.new("char[]", restorer), ffi.new("char[]", str(p.num["plan"]).encode()),
                    ffi.NULL]
            c_argv = ffi.new("char *[]", argv)
            c_src, c_dst = ffi.new("int[]", src), ffi.new("int[]", dst)
            c_cwd = ffi.new("char[]", p.m["process"]["cwd"].encode())
            keep += [argv, c_argv, c_src, c_dst, c_cwd]
            specs.append((c_argv, c_src, c_dst, len(src), c_cwd, err_index, er))
        dead = tree.get("zombies", [])
        kids = ffi.new("struct cx_kid[]", max(1, len(preps) - 1 + len(dead)))
        for j, (p, sp) in enumerate(zip(preps[1:], specs[1:])):
            kd = kids[j]
            kd.argv, kd.src, kd.dst, kd.nfd, kd.cwd, kd.errfd = sp[0], sp[1], sp[2], sp[3], \
                sp[4], sp[5]
            kd.umask_ = p.m["process"]["umask"]
            kd.sidmode = rs.process.session_mode(p.m)
            kd.set_tid = p.m["process"]["pid"]
            kd.zombie = -1
        for j, z in enumerate(dead, len(preps) - 1):
            kids[j].set_tid, kids[j].zombie = z["pid"], z["zombie"]
        r = preps[0]
        rpid = r.m["process"]["pid"]
        ns = pidns_mod.new(restorer, spawn_args(cg))
        try:
            sp = specs[0]
            pid = lib.cx_spawn_tree(restorer, sp[0], sp[1], sp[2], sp[3], sp[4],
                                    r.m["process"]["umask"], rs.process.session_mode(r.m),
                                    rpid, sp[5], *spawn_args(cg), len(preps) - 1 + len(dead),
                                    kids)
        finally:
            ns.leave()
        if pid < 0:
            raise CxlforkError(f"spawning the restorer of the tree's root: {os.strerror(-pid)}")
        clones.append(rs.Clone(pid, specs[0][6]))
        ns.start(pid, rpid)
        for fd in opened:
            os.close(fd)
        opened = []
        hosts = _kid_pids(pid, {p.m["process"]["pid"]: i for i, p in enumerate(preps[1:])},
                          30.0, lambda: rs._error_text(clones[0]))
        for p, sp in zip(preps[1:], specs[1:]):
            clones.append(rs.Clone(hosts[p.m["process"]["pid"]], sp[6]))
        _wait_zombies(pid, dead)
        for i, (p, c) in enumerate(zip(preps, clones)):
            e = lib.cx_start(c.pid, go_w[i], 1 if p.threads else 0)
            if e < 0:
                raise CxlforkError(f"restorer of PID {p.m['process']['pid']} of tree {k} did "
                                   f"not start: {rs._error_text(c) or os.strerror(-e)}")
            if p.threads:
                c.tids, e = threads.wait_parked(c.pid, len(p.threads), go_w[i])
                if e < 0:
                    raise CxlforkError(f"creating the threads of PID {p.m['process']['pid']} "
                                       f"of tree {k}: {rs._error_text(c) or os.strerror(-e)}")
            os.close(go_w.pop(i))
        st, pending = ffi.new("int *"), ffi.new("int *")
        for p, c in zip(preps, clones):
            e = lib.cx_wait_handover(c.pid, c.errfd, 30000, st, pending)
            if e < 0:
                raise CxlforkError(f"restoring PID {p.m['process']['pid']} of tree {k} "
                                   f"failed: {rs._error_text(c) or rs._status_text(st[0])}")
            threads.finish(c.tids, p.threads, k)
            e = lib.cx_finish(c.pid, p.regs, REGS_SIZE, p.xstate, len(p.xstate),
                              p.m["signals"]["blocked"], pending[0])
            if e < 0:
                raise CxlforkError(f"installing registers of PID {p.m['process']['pid']} of "
                                   f"tree {k}: {os.strerror(-e)}")
            os.close(c.errfd)
            c.errfd = -1
    except BaseException:
        for fd in opened + list(go_w.values()):
            os.close(fd)
        for sp in specs[len(clones):]:
            os.close(sp[6])
        rs._kill(clones)
        if ns is not None:
            ns.kill()
        raise
    return clones[0].pid

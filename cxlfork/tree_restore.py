"""Restore of a process tree (an image made by cxlfork.tree.checkpoint_tree): one new PID
namespace per clone tree (cxlfork.state.pidns), one network namespace if any process of
the tree has inet or unix sockets (cxlfork.state.netns; `netns="host"`: ours) and one mount
namespace if any has unix sockets bound to paths (cxlfork.state.mountns).

The root's restorer is spawned under the root's PID and, before its exec, forks each of its
children's restorers under their PIDs, each of which forks its own children first the same
way (cx_spawn_tree: any depth), so every process is its checkpointed parent's child. The
tree's pipes are made once per clone tree; an open file description a process shared with
one before it (a pipe end, a file, an inet socket such as a pre-fork server's listener, an
eventfd) is the same one in the clone tree, and so is a shmem object two processes held
(shared anonymous memory mapped before a fork, a memfd). Each process then runs its own
plan; cxlfork seizes each one and hands it over as a single process. Every process gets its userfaultfd
handled by this process (lazy moa copies; mow and hybrid give its store-mapped anonymous
memory anonymous semantics), as a single clone does.
"""
from __future__ import annotations

import os
import socket
import time

from cxlfork import restore as rs
from cxlfork.cgtarget import spawn_args
from cxlfork.errors import CxlforkError
from cxlfork.native import ffi, lib, restorer_path
from cxlfork.ptrace import REGS_SIZE
from cxlfork.state import (fds as fds_mod, memory, mountns as mountns_mod, netns as netns_mod,
                           pidns as pidns_mod, threads)


def _host_pids(root: int, want: set[int], timeout_s: float, err_of, zombies=False
               ) -> dict[int, int]:
    """{PID in the namespace: host PID} of the root restorer's descendants in want, once all
    exist (zombies=True: once each of them is a zombie)."""
    t = time.monotonic()
    while True:
        got, todo = {}, [root]
        while todo:
            p = todo.pop()
            try:
                with open(f"/proc/{p}/task/{p}/children") as f:
                    host = [int(x) for x in f.read().split()]
            except OSError:
                host = []
            for h in host:
                try:
                    with open(f"/proc/{h}/status") as f:
                        st = dict(x.split(":", 1) for x in f if ":" in x)
                    nspid = int(st["NSpid"].split()[-1])
                    if not zombies or st["State"].strip().startswith("Z"):
                        got[nspid] = h
                except (OSError, KeyError, ValueError):
                    continue
                todo.append(h)
        if want <= set(got):
            return {p: got[p] for p in want}
        if time.monotonic() - t > timeout_s or not os.path.exists(f"/proc/{root}"):
            what = "did not exit" if zombies else "were not forked"
            raise CxlforkError(f"processes {sorted(want - set(got))} of the tree {what}: "
                               f"{err_of() or 'timeout'}")
        time.sleep(0.001)


def restore_tree(image: str, policy: str = "mow", n: int = 1, stdio="inherit", warn=None,
                 eager: bool = False, cgroup: str | None = None, progress=None,
                 netns: str = "new") -> list[int]:
    """Restore n clone trees of a tree IMAGE, each in a new PID namespace; returns each
    tree's root (host PIDs, children of this process). stdio "auto" is inherit for a tree;
    "original" reopens each process's own files (cxlfork.state.stdio)."""
    stdio = "inherit" if stdio == "auto" else stdio
    if netns not in ("new", "host"):
        raise CxlforkError(f"netns must be new or host, not {netns!r}")
    root = rs.Prepared(image, policy, warn, eager)
    preps = [root]
    try:
        tree = root.m["tree"]
        for c in tree["children"]:
            preps.append(rs.Prepared(os.path.join(root.image, c["image"]), policy, warn, eager))
        own_netns = netns == "new" and any(netns_mod.needed(p.m) for p in preps)
        cg = rs._open_cgroup(cgroup, None)
        try:
            out = []
            for k in range(n):
                out.append(_one(preps, tree, stdio, cg, k + 1, own_netns))
                if progress:
                    progress(k + 1, n)
            return out
        finally:
            if cg is not None:
                cg.close()
    finally:
        for p in preps:
            p.close()


def _object_id(m: dict, ref: dict) -> int:
    """The id of the shmem object m holds at ref ({"map": start} or {"fd": n})."""
    if "map" in ref:
        rec = next((v for v in m["vmas"] if v["start"] == ref["map"]), None)
    else:
        rec = next((f for f in m["fds"] if f["fd"] == ref.get("fd")), None)
    if rec is None or "object" not in rec:
        raise CxlforkError(f"the image of PID {m['process']['pid']} has no shared memory "
                           f"object at {ref} (inconsistent tree image)")
    return rec["object"]


class _View:
    """One process's sockets of the tree's PathSockets (keyed by (PID, fd) there)."""

    def __init__(self, paths, pid: int):
        self.fds = {k[1]: fd for k, fd in paths.fds.items() if k[0] == pid}


def _path_sockets(preps, tree, ns, opened) -> mountns_mod.PathSockets:
    """One mount namespace per clone tree with every process's unix sockets bound to paths
    (cxlfork.state.mountns), but those a process shares with an earlier one."""
    given = {(x["pid"], x["fd"]) for x in tree["shared"]}
    recs = []
    for p in preps:
        pid = p.m["process"]["pid"]
        recs += [dict(f, fd=(pid, f["fd"])) for f in p.m["fds"]
                 if f["kind"] == "unix" and "path" in f and f.get("dup_of") is None
                 and (pid, f["fd"]) not in given]
    paths = mountns_mod.PathSockets({"fds": recs})
    paths.make(ns.fd if ns is not None else -1, opened)
    return paths


def _kid_structs(preps, tree, specs, keep):
    """The cx_kid arrays: {PID: (array, count)} of each process's children (live, zombie)."""
    rpid = preps[0].m["process"]["pid"]
    kids_of: dict[int, list] = {}
    for i, (c, p) in enumerate(zip(tree["children"], preps[1:]), 1):
        kids_of.setdefault(c.get("parent", rpid), []).append(("live", i, p))
    for z in tree.get("zombies", []):
        kids_of.setdefault(z.get("parent", rpid), []).append(("zombie", z, None))
    arrays: dict[int, tuple] = {}
    # children before their parents: a parent's array points at its children's arrays
    for i in range(len(preps) - 1, -1, -1):
        pid = preps[i].m["process"]["pid"]
        mine = kids_of.get(pid, [])
        arr = ffi.new("struct cx_kid[]", max(1, len(mine)))
        keep.append(arr)
        for j, (what, x, p) in enumerate(mine):
            kd = arr[j]
            if what == "zombie":
                kd.set_tid, kd.zombie = x["pid"], x["zombie"]
                continue
            sp = specs[x]
            kd.argv, kd.src, kd.dst, kd.nfd, kd.cwd, kd.errfd = sp[0], sp[1], sp[2], sp[3], \
                sp[4], sp[5]
            kd.umask_ = p.m["process"]["umask"]
            kd.sidmode = rs.process.session_mode(p.m)
            kd.set_tid = p.m["process"]["pid"]
            kd.zombie = -1
            kd.kids, kd.nkids = arrays[kd.set_tid]
        arrays[pid] = (arr, len(mine))
    return arrays[rpid]


def _one(preps, tree, stdio, cg, k: int, own_netns: bool) -> int:
    restorer = restorer_path().encode()
    opened: list[int] = []
    pipes_made: dict = {}
    clones: list[rs.Clone] = []
    go_w: dict[int, int] = {}
    lazy: dict[int, int] = {}               # our ends of the processes' userfaultfd sockets
    keep = []                               # cffi buffers alive until the spawn
    specs = []
    ns = pns = None
    rpid = preps[0].m["process"]["pid"]
    srcs: dict[int, dict[int, int]] = {}    # {PID: {fd: its source fd here}}
    objs: dict[int, dict[int, int]] = {}    # {PID: {object id: its memfd here}}
    mans: dict[int, dict] = {}
    try:
        if own_netns:                       # the tree's sockets are made in it
            ns = netns_mod.NetNs.make({"fds": [f for p in preps for f in p.m["fds"]]})
            ns.enter()
        where = "in the clone tree's network namespace" if ns else \
            "in this network namespace (--netns host)"
        paths = _path_sockets(preps, tree, ns, opened)
        for i, p in enumerate(preps):
            pid = p.m["process"]["pid"]
            theirs = {_object_id(p.m, o): objs[o["from_pid"]][_object_id(mans[o["from_pid"]],
                                                                       o["from"])]
                      for o in tree.get("objects", []) if o["pid"] == pid}
            mine = {"objects": [o for o in p.m["objects"] if o["id"] not in theirs]}
            objfds = memory.make_objects(mine, p.store_fd, opened)
            objfds.update(theirs)               # one object with an earlier process's
            objs[pid] = objfds
            mans[pid] = p.m
            given = {}
            for s in tree["shared"]:
                if s["pid"] == pid:
                    given[s["fd"]] = srcs[s.get("from_pid", rpid)][s.get("from_fd",
                                                                       s.get("root_fd"))]
            src, dst = fds_mod.clone_fds(p.m, stdio, opened, objfds, where,
                                         paths=_View(paths, pid), pipes_made=pipes_made,
                                         given=given)
            srcs[pid] = dict(zip(dst, src))
            er, ew = os.pipe2(os.O_CLOEXEC)
            gr, gw = os.pipe2(os.O_CLOEXEC)
            opened += [ew, gr]
            go_w[i] = gw
            extra = {"err": ew, "go": gr, "store": p.store_fd, "exe": p.exe_fd,
                     "plan": p.plan_fd}
            extra.update({("file", j): fd for j, fd in p.file_fds.items()})
            extra.update({("obj", oid): fd for oid, fd in objfds.items()})
            if p.uffd:
                mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                opened.append(theirs.detach())
                lazy[i] = mine.detach()
                extra["uffd_sock"] = opened[-1]
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
        kids, nkids = _kid_structs(preps, tree, specs, keep)
        r = preps[0]
        made: list = []

        def spawn():
            made.append(pidns_mod.new(restorer, spawn_args(cg)))
            try:
                sp = specs[0]
                return lib.cx_spawn_tree(restorer, sp[0], sp[1], sp[2], sp[3], sp[4],
                                         r.m["process"]["umask"], rs.process.session_mode(r.m),
                                         rpid, sp[5], *spawn_args(cg), nkids, kids)
            finally:
                made[0].leave()
        try:
            if paths.mnt_fd >= 0:           # from a thread in the tree's mount namespace
                pid = paths.spawn(spawn, ns.fd if ns is not None else -1)
            else:
                pid = spawn()
        finally:
            pns = made[0] if made else None
            if ns is not None:              # back home before any thread is started here
                ns.close()
                ns = None
        if pid < 0:
            raise CxlforkError(f"spawning the restorer of the tree's root: {os.strerror(-pid)}")
        clones.append(rs.Clone(pid, specs[0][6]))
        pns.start(pid, rpid)
        for fd in opened:
            os.close(fd)
        opened = []
        err0 = lambda: rs._error_text(clones[0])     # noqa: E731
        hosts = _host_pids(pid, {p.m["process"]["pid"] for p in preps[1:]}, 30.0, err0)
        for p, sp in zip(preps[1:], specs[1:]):
            clones.append(rs.Clone(hosts[p.m["process"]["pid"]], sp[6]))
        for i, (p, c) in enumerate(zip(preps, clones)):
            if i in lazy:
                rs._lazy_add(p, c.pid, lazy.pop(i))
        _host_pids(pid, {z["pid"] for z in tree.get("zombies", [])}, 30.0, err0, zombies=True)
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
        if ns is not None:
            ns.close()
        for fd in opened + list(go_w.values()) + list(lazy.values()):
            os.close(fd)
        for sp in specs[len(clones):]:
            os.close(sp[6])
        rs._kill(clones)
        if pns is not None:
            pns.kill()
        raise
    return clones[0].pid

"""Ghost pool: pre-spawned, empty restorer processes ("ghosts") that later restores fill in.

A ghost is cxlfork-restorer spawned and exec'd ahead of time in ghost mode: it has no fd but
one end of a unix socket, its cwd is "/", and it blocks in recvmsg on that socket. A restore
into a ghost (`prepared.restore(n, ghosts=pool)`) sends it the clone's fds (SCM_RIGHTS) with
their numbers, cwd, umask and session mode; the ghost lays out its fd table and runs the plan
as a spawned restorer does (rlimits, signals, memory... all come from the plan, at restore).
So the vfork + exec of the restorer leaves the restore path; what remains is one sendmsg and
the ghost's wake-up.

    pool = GhostPool(4)                      # spawns 4 ghosts, refills in a background thread
    with prepare_restore(image) as p:
        pids = p.restore(1, stdio=(0, 1, 2), ghosts=pool)
    pool.close()                             # kills and reaps the idle ghosts

A clone of an image with inet or named unix sockets gets a network namespace of its own
(cxlfork.state.netns): a ghost, spawned in ours, setns()es into it when it is filled; a warm
pool makes each ghost's namespace when it spawns the ghost, so it is off the restore path.

A ghost's PID is fixed when it is spawned, so `same_pid` restores cannot use one. A warm pool
made with `pidns="new"` keeps namespaced ghosts: each is spawned in a new PID namespace of its
own under its image's checkpointed PID (cxlfork.state.pidns), for `pidns="new"` restores. When the pool
is empty (or a ghost has died) a restore spawns its restorer as usual (counted in
`stats()["fallbacks"]`). A ghost whose owner closes the pool or dies reads EOF and exits.
"""
from __future__ import annotations

import os
import select
import socket
import threading

from cxlfork.cgtarget import CgroupTarget, spawn_args
from cxlfork.errors import CxlforkError
from cxlfork.native import ffi, lib, restorer_path
from cxlfork.state import netns
from cxlfork.state import pidns as pidns_mod
from cxlfork.state.memory import make_objects

GHOST_FD = 3                 # the socket's number in the ghost
MAX_FDS = 253                # SCM_MAX_FD: one message carries the whole fd table


class Ghost:
    """One idle ghost: its PID (a child of this process), our end of its socket and, for a
    warm ghost, the fds of the shared-memory objects it has mapped ({object id: fd})."""

    def __init__(self, pid: int, sock: int, objfds: dict[int, int] | None = None):
        self.pid = pid
        self.sock = sock
        self.objfds = objfds
        self.netns = None          # a warm ghost's clone's network namespace, made ahead

    def alive(self) -> bool:
        """Still waiting: no hang-up and nothing (an error line) on its socket."""
        return not select.select([self.sock], [], [], 0)[0]

    def discard(self) -> None:
        """Close our end (the ghost reads EOF and exits), kill and reap it."""
        if self.sock >= 0:
            os.close(self.sock)
            self.sock = -1
        for fd in (self.objfds or {}).values():
            os.close(fd)
        self.objfds = None
        if self.netns is not None:
            self.netns.close()
            self.netns = None
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def spawn_ghost(prepared=None, timeout_s: float = 30.0, cgroup: CgroupTarget | None = None,
                prefault: bool = False, pidns: str = "host") -> Ghost:
    """Spawn one ghost (vfork-style clone + exec of the restorer). Cold (prepared None): in
    ghost mode, waiting for a whole restore. Warm: it runs the memory, signal and mm part of
    prepared's plan now (with the files, store and objects it needs) and waits for the
    clone's own fds; returns once it is ready, or raises with the restorer's error line.
    cgroup: born in that cgroup (charged there from its first page), else in ours.
    prefault (warm only): the ghost also maps its store pages read-only into its page tables.
    pidns "new" (warm only): born in a new PID namespace of its own, under the checkpointed
    PID (its threads get their tids when it is filled)."""
    if pidns == "new" and prepared is None:
        raise CxlforkError("a cold ghost cannot be made in a new PID namespace: its PID there "
                           "is its image's, unknown until it is filled (use a warm pool, "
                           "GhostPool(size, prepared=p, pidns='new'))")
    path = restorer_path().encode()
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    opened: list[int] = []
    objfds = None
    try:
        if prepared is None:
            args = [b"ghost", str(GHOST_FD).encode()]
            src, dst = [theirs.fileno()], [GHOST_FD]
        else:
            p = prepared
            plan_fd, sock_num = p.warm_plan(prefault)
            objfds = make_objects(p.m, p.store_fd, opened)
            fds = {"plan": plan_fd, "store": p.store_fd, "exe": p.exe_fd,
                   **{("file", i): fd for i, fd in p.file_fds.items()},
                   **{("obj", oid): fd for oid, fd in objfds.items()}}
            src = list(fds.values()) + [theirs.fileno(), theirs.fileno()]
            dst = [p.num[k] for k in fds] + [sock_num, p.num["err"]]  # errors: the socket
            args = [str(p.num["plan"]).encode()]
        argv = [ffi.new("char[]", path)] + [ffi.new("char[]", a) for a in args] + [ffi.NULL]
        ns, set_tid = None, 0
        if pidns == "new":             # this thread's children are born in it
            ns = pidns_mod.new(path, spawn_args(cgroup))
            set_tid = prepared.m["process"]["pid"]
        try:
            pid = lib.cx_spawn(path, ffi.new("char *[]", argv), ffi.new("int[]", src),
                               ffi.new("int[]", dst), len(src), b"/", 0o022, 0, set_tid, -1,
                               *spawn_args(cgroup))
        finally:
            if ns is not None:
                ns.leave()
        if ns is not None:
            if pid < 0:
                ns.kill()
            else:
                ns.start(pid, set_tid)  # the init ends with the ghost (or its clone)
    except BaseException:
        for fd in opened:
            os.close(fd)
        mine.close()
        raise
    finally:
        theirs.close()
    if pid < 0:
        for fd in opened:
            os.close(fd)
        mine.close()
        where = f" into cgroup {cgroup.path}" if cgroup is not None else ""
        raise CxlforkError(f"spawning a ghost restorer{where}: {os.strerror(-pid)}")
    g = Ghost(pid, mine.detach(), objfds)
    if prepared is not None:
        ready = select.select([g.sock], [], [], timeout_s)[0]
        got = os.read(g.sock, 512) if ready else b""
        if got != b"r":
            g.discard()
            why = got.decode(errors="replace").strip() if got else \
                "it exited" if ready else f"not ready within {timeout_s:g} s"
            raise CxlforkError(f"a warm ghost for {prepared.image} failed: {why}")
        if netns.needed(prepared.m):
            # the clone's network namespace, made here (off the restore path); if it cannot
            # be made, the restore makes it (or says why not, or uses --netns host)
            try:
                g.netns = netns.NetNs.make(prepared.m)
            except CxlforkError:
                g.netns = None
    return g


class GhostPool:
    """size idle ghosts, refilled in a background thread (refill="background") or by calling
    .refill() (refill="manual"). Thread-safe. Close it (or use it as a context manager): idle
    ghosts are killed and reaped; ghosts already restored into are clones, not the pool's.
    cgroup (a cgroup directory): every ghost is born in it (see cxlfork.cgtarget), so all a
    warm ghost maps and copies is charged there; restores from this pool that spawn their
    restorer (pool empty) must pass the same cgroup. prefault (warm pools of mow or hybrid):
    each ghost fills its store mappings' page tables read-only after the warm plan, so the
    clone reads store pages without minor faults (costs page tables per idle ghost)."""

    def __init__(self, size: int, refill: str = "background", prepared=None,
                 cgroup: str | None = None, prefault: bool = False, pidns: str = "host"):
        if not isinstance(size, int) or size < 1:
            raise CxlforkError(f"ghost pool size must be a positive integer, not {size!r}")
        if refill not in ("background", "manual"):
            raise CxlforkError(f"ghost pool refill must be 'background' or 'manual', "
                               f"not {refill!r}")
        restorer_path()
        if prepared is not None and not prepared.fds_open:
            raise CxlforkError(f"ghost pool: the prepared restore of {prepared.image} is "
                               "closed")
        if prefault and prepared is None:
            raise CxlforkError("ghost pool prefault needs warm ghosts (prepared=)")
        if prefault:
            prepared.warm_plan(prefault)             # refuses lazy moa with one error
        if pidns not in pidns_mod.MODES:
            raise CxlforkError(f"ghost pool pidns {pidns!r}: expected one of "
                               f"{', '.join(pidns_mod.MODES)}")
        if pidns == "new" and prepared is None:
            raise CxlforkError("a ghost pool with pidns='new' needs warm ghosts (prepared=): "
                               "each ghost's PID in its namespace is its image's")
        self.prepared = prepared
        self.prefault = prefault
        self.pidns = pidns
        self.size = size
        self.cgroup = CgroupTarget(cgroup) if cgroup is not None else None
        self._idle: list[Ghost] = []
        self._lock = threading.Condition()
        self._closed = False
        self._counts = {"spawned": 0, "taken": 0, "fallbacks": 0, "dead": 0}
        self._thread = None
        self.last_error = None        # of the background refill
        try:
            self.refill()
        except BaseException:
            self.close()
            raise
        if refill == "background":
            self._thread = threading.Thread(target=self._refiller, name="cxlfork-ghost-refill",
                                            daemon=True)
            self._thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def refill(self) -> int:
        """Spawn ghosts until size are idle; returns how many were spawned."""
        made = 0
        while True:
            with self._lock:
                if self._closed or len(self._idle) >= self.size:
                    return made
            g = spawn_ghost(self.prepared, cgroup=self.cgroup, prefault=self.prefault,
                            pidns=self.pidns)
            with self._lock:
                if self._closed:
                    g.discard()
                    return made
                self._idle.append(g)
                self._counts["spawned"] += 1
            made += 1

    def _refiller(self) -> None:
        while True:
            with self._lock:
                while not self._closed and len(self._idle) >= self.size:
                    self._lock.wait()
                if self._closed:
                    return
            try:
                self.refill()
            except CxlforkError as e:     # e.g. out of PIDs: try again a second later
                with self._lock:
                    self.last_error = str(e)
                    if not self._closed:
                        self._lock.wait(1.0)

    def take(self) -> Ghost | None:
        """An idle ghost for one restore (the caller owns it from now on), or None when the
        pool is empty or closed (the restore then spawns its restorer)."""
        dead = []
        with self._lock:
            g = None
            while self._idle and not self._closed and g is None:
                g = self._idle.pop(0)
                if not g.alive():                # killed by someone: skip it
                    dead.append(g)
                    g = None
            self._counts["dead"] += len(dead)
            self._counts["taken" if g else "fallbacks"] += 1
            self._lock.notify_all()
        for d in dead:
            d.discard()
        return g

    def stats(self) -> dict:
        """size, idle, and counts of ghosts spawned, taken, dead and of restores that found
        the pool empty (fallbacks)."""
        with self._lock:
            return {"size": self.size, "idle": len(self._idle), **self._counts}

    def pids(self) -> list[int]:
        """PIDs of the idle ghosts."""
        with self._lock:
            return [g.pid for g in self._idle]

    def close(self) -> None:
        """Stop refilling, kill and reap every idle ghost. Idempotent."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        for g in idle:
            g.discard()
        if self.cgroup is not None:
            self.cgroup.close()

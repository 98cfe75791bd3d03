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

A ghost's PID is fixed when it is spawned, so `same_pid` restores cannot use one. When the pool
is empty (or a ghost has died) a restore spawns its restorer as usual (counted in
`stats()["fallbacks"]`). A ghost whose owner closes the pool or dies reads EOF and exits.
"""
from __future__ import annotations

import os
import socket
import threading

from cxlfork.errors import CxlforkError
from cxlfork.native import ffi, lib, restorer_path

GHOST_FD = 3                 # the socket's number in the ghost
MAX_FDS = 253                # SCM_MAX_FD: one message carries the whole fd table


class Ghost:
    """One idle ghost: its PID (a child of this process) and our end of its socket."""

    def __init__(self, pid: int, sock: int):
        self.pid = pid
        self.sock = sock

    def discard(self) -> None:
        """Close our end (the ghost reads EOF and exits), kill and reap it."""
        if self.sock >= 0:
            os.close(self.sock)
            self.sock = -1
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def spawn_ghost() -> Ghost:
    """Spawn one ghost (vfork-style clone + exec of the restorer in ghost mode)."""
    path = restorer_path().encode()
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        argv = [ffi.new("char[]", path), ffi.new("char[]", b"ghost"),
                ffi.new("char[]", str(GHOST_FD).encode()), ffi.NULL]
        pid = lib.cx_spawn(path, ffi.new("char *[]", argv), ffi.new("int[]", [theirs.fileno()]),
                           ffi.new("int[]", [GHOST_FD]), 1, b"/", 0o022, 0, 0, -1)
    finally:
        theirs.close()
    if pid < 0:
        mine.close()
        raise CxlforkError(f"spawning a ghost restorer: {os.strerror(-pid)}")
    return Ghost(pid, mine.detach())


class GhostPool:
    """size idle ghosts, refilled in a background thread (refill="background") or by calling
    .refill() (refill="manual"). Thread-safe. Close it (or use it as a context manager): idle
    ghosts are killed and reaped; ghosts already restored into are clones, not the pool's."""

    def __init__(self, size: int, refill: str = "background"):
        if not isinstance(size, int) or size < 1:
            raise CxlforkError(f"ghost pool size must be a positive integer, not {size!r}")
        if refill not in ("background", "manual"):
            raise CxlforkError(f"ghost pool refill must be 'background' or 'manual', "
                               f"not {refill!r}")
        restorer_path()
        self.size = size
        self._idle: list[Ghost] = []
        self._lock = threading.Condition()
        self._closed = False
        self._counts = {"spawned": 0, "taken": 0, "fallbacks": 0, "dead": 0}
        self._thread = None
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
            g = spawn_ghost()
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
            except CxlforkError:          # e.g. out of PIDs: try again at the next take
                with self._lock:
                    if not self._closed:
                        self._lock.wait(1.0)

    def take(self) -> Ghost | None:
        """An idle ghost for one restore (the caller owns it from now on), or None when the
        pool is empty or closed (the restore then spawns its restorer)."""
        with self._lock:
            g = self._idle.pop(0) if self._idle and not self._closed else None
            self._counts["taken" if g else "fallbacks"] += 1
            self._lock.notify_all()
        return g

    def dead(self, g: Ghost) -> None:
        """A taken ghost turned out to be gone (its socket refused the restore): reap it."""
        with self._lock:
            self._counts["dead"] += 1
        g.discard()

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

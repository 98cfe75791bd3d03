"""Where a function's restored clones come from: cxlfork ghosts (pre-spawned restorers), warm
for the function's current prepared restore where that is possible, and placed in the
function's memory cgroup before a restore fills them.

    FunctionGhosts(name, size, cgroup, prepared)
        .source(prepared)   what to pass as `ghosts=` to prepared.restore (None: plain spawn)
        .stats()            size, idle, spawned, taken, fallbacks, dead, warm, on the spot
        .close()            kills and reaps the idle ghosts

With `ghost_pool = N > 0` a function keeps N ghosts, refilled in the background by cxlfork's
GhostPool. They are *warm* (`GhostPool(prepared=p)`: the memory part of the plan already
run, so a restore only hands over fds and registers) for the prepared restore of the
function's image and clone policy; the porter makes a new pool when that changes (policy
switch, hot-page profile), off the request path. With a memory cgroup, every new ghost is
moved into the function's cgroup as soon as it is spawned; a ghost is spawned in the porter's
own cgroup, and the kernel does not move charges, so what a warm ghost copies when it is
spawned would stay charged outside the limit: with a cgroup only mow pools are warm (a mow
ghost maps the store and copies nothing), the others are cold ghosts that run the whole plan
inside the cgroup at restore. With a cgroup and no usable idle ghost a restore spawns a cold
ghost on the spot and moves it before the restore, so every clone is charged to its cgroup
from its first page. Without a cgroup and a pool, restores spawn their restorer as cxlfork
does by default.
"""
from __future__ import annotations

import threading

from cxlfork.ghosts import GhostPool, spawn_ghost


class _CgroupGhostPool(GhostPool):
    """cxlfork's GhostPool whose ghosts are moved into a cgroup right after they are spawned
    (by the refill, in the background) or at the latest when taken. move: None = no cgroup."""

    def __init__(self, size: int, move, prepared=None):
        self._move = move
        self._moved: set[int] = set()
        self._moved_lock = threading.Lock()
        super().__init__(size, refill="background", prepared=prepared)

    def _place(self, pid: int) -> None:
        with self._moved_lock:
            if pid in self._moved:
                return
            self._moved.add(pid)
        self._move(pid)

    def refill(self) -> int:
        made = super().refill()
        if self._move is not None:
            for pid in self.pids():
                self._place(pid)
        return made

    def take(self):
        g = super().take()
        if g is not None and self._move is not None:
            self._place(g.pid)
            with self._moved_lock:
                self._moved.discard(g.pid)
        return g


class _Placed:
    """The `ghosts=` object of a restore with a cgroup: an idle ghost of the pool (if it suits
    the prepared restore), else a cold ghost spawned now and moved into the cgroup."""

    def __init__(self, owner: "FunctionGhosts", pool):
        self.owner, self.pool = owner, pool
        self.prepared = pool.prepared if pool is not None else None

    def take(self):
        g = self.pool.take() if self.pool is not None else None
        if g is None:
            g = spawn_ghost()
            try:
                self.owner.move(g.pid)
            except BaseException:
                g.discard()
                raise
            with self.owner.lock:
                self.owner.on_the_spot += 1
        return g


class FunctionGhosts:
    """The ghosts of one function (see the module docstring). Thread-safe."""

    def __init__(self, name: str, size: int, cgroup=None, prepared=None):
        self.name = name
        self.cgroup = cgroup
        self.lock = threading.Lock()
        self.on_the_spot = 0              # restores that spawned their ghost (no pool/empty)
        warm = prepared is not None and (cgroup is None or prepared.policy == "mow")
        self.move = (lambda pid: cgroup.move(name, pid)) if cgroup is not None else None
        self.pool = _CgroupGhostPool(size, self.move, prepared if warm else None) \
            if size > 0 else None

    def source(self, prepared):
        """The `ghosts=` argument of prepared.restore: the pool (if it suits `prepared`), an
        object that places each clone's ghost in the cgroup, or None (plain spawn)."""
        pool = self.pool
        if pool is not None and pool.prepared is not None and pool.prepared is not prepared:
            pool = None                   # warm for another policy / profile
        if self.cgroup is not None:
            return _Placed(self, pool)
        return pool

    def suits(self, prepared) -> bool:
        """True when this pool serves `prepared` as well as a new pool would."""
        if self.pool is None:
            return True
        warm = self.cgroup is None or prepared.policy == "mow"
        return self.pool.prepared is prepared if warm else self.pool.prepared is None

    def stats(self) -> dict:
        st = self.pool.stats() if self.pool is not None else {"size": 0, "idle": 0}
        return {**st, "warm": bool(self.pool is not None and self.pool.prepared is not None),
                "spawned_on_the_spot": self.on_the_spot,
                "idle_pids": self.pool.pids() if self.pool is not None else []}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

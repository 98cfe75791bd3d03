"""Where a function's restored clones come from: cxlfork ghosts (pre-spawned empty restorers)
that sit in the function's memory cgroup before a restore fills them.

    FunctionGhosts(name, size, cgroup)
        .source()   what to pass as `ghosts=` to cxlfork's restore (None: plain spawn)
        .stats()    size, idle, spawned, taken, fallbacks, dead (None without a pool)
        .close()    kills and reaps the idle ghosts

With `ghost_pool = N > 0` each function keeps N ghosts, refilled in the background by
cxlfork's GhostPool; the porter moves every new ghost into the function's memory cgroup as
soon as it is spawned, off the restore path. With a cgroup and no pool (or an empty one) a
restore spawns one ghost on the spot and moves it before handing it the restore, so that every
page a clone gets at restore (copies of moa-eager / hybrid) is charged to its cgroup. Without
either, restores spawn their restorer as cxlfork does by default.
"""
from __future__ import annotations

import threading

from cxlfork.ghosts import GhostPool, spawn_ghost


class _CgroupGhostPool(GhostPool):
    """cxlfork's GhostPool whose ghosts are moved into a cgroup right after they are spawned
    (by the refill, in the background) or at the latest when taken."""

    def __init__(self, size: int, move):
        self._move = move
        self._moved: set[int] = set()
        self._moved_lock = threading.Lock()
        super().__init__(size, refill="background")

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


class FunctionGhosts:
    """The ghosts of one function (see the module docstring). Thread-safe."""

    def __init__(self, name: str, size: int, cgroup=None):
        self.name = name
        self.cgroup = cgroup
        move = (lambda pid: cgroup.move(name, pid)) if cgroup is not None else None
        self._move = move
        self.pool = _CgroupGhostPool(size, move) if size > 0 else None
        self.on_the_spot = 0              # restores that spawned their ghost (no pool/empty)

    def source(self):
        """The `ghosts=` argument of a restore: the pool, this object (it spawns and places
        a ghost per restore) or None (cxlfork spawns the restorer)."""
        if self.cgroup is not None:
            return self
        return self.pool

    # the two calls cxlfork's restore makes on its `ghosts=` object
    def take(self):
        g = self.pool.take() if self.pool is not None else None
        if g is None:
            g = spawn_ghost()
            try:
                self._move(g.pid)
            except BaseException:
                g.discard()
                raise
            self.on_the_spot += 1
        return g

    def dead(self, g) -> None:
        if self.pool is not None:
            self.pool.dead(g)
        else:
            g.discard()

    def stats(self) -> dict:
        st = self.pool.stats() if self.pool is not None else {"size": 0, "idle": 0}
        return {**st, "spawned_on_the_spot": self.on_the_spot}

    def idle(self) -> int:
        return self.pool.stats()["idle"] if self.pool is not None else 0

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

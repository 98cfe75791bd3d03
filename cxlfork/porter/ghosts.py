"""Where a function's restored clones come from: a pool of cxlfork ghosts (pre-spawned
restorers), warm for the function's current prepared restore, born in the function's memory
cgroup when the porter has a limit.

    FunctionGhosts(name, size, cgroup_dir, prepared)
        .source(prepared)   what to pass as `ghosts=` to prepared.restore (None: plain spawn)
        .stats()            size, idle, spawned, taken, fallbacks, dead, warm, idle_pids
        .close()            kills and reaps the idle ghosts

With `ghost_pool = N > 0` a function keeps N ghosts, refilled in the background by cxlfork's
GhostPool. They are *warm* (`GhostPool(prepared=p)`: the memory part of the plan already
run, so a restore only hands over fds and registers) for the prepared restore of the
function's image and clone policy; the porter makes a new pool when that changes (policy
switch, hot-page profile), off the request path. With a memory cgroup every ghost is born in
the function's cgroup (`GhostPool(cgroup=)`: on cgroup v1 the child joins it before it execs
the restorer, on v2 clone3 places it), so everything a warm ghost maps and copies when it is
spawned (all of a moa or moa-eager plan's copies, a hybrid plan's writable pages) is charged
under the limit, and warm pools serve every policy. A restore that finds no idle ghost spawns
its restorer in the same cgroup (`prepared.restore(cgroup=)`). `ghost_prefault = true`:
warm ghosts of non-lazy plans (mow, hybrid, moa-eager) also fill their store mappings' page
tables read-only (`GhostPool(prefault=True)`), so the clone's first request reads store pages
without minor faults.
"""
from __future__ import annotations

from cxlfork.ghosts import GhostPool


class FunctionGhosts:
    """The ghosts of one function (see the module docstring). Thread-safe."""

    def __init__(self, name: str, size: int, cgroup_dir: str | None = None, prepared=None,
                 prefault: bool = False):
        self.name = name
        prefault = prefault and prepared is not None and not prepared.lazy
        self.pool = GhostPool(size, refill="background", prepared=prepared,
                              cgroup=cgroup_dir, prefault=prefault) if size > 0 else None

    def source(self, prepared):
        """The `ghosts=` argument of prepared.restore: the pool if it suits `prepared`, else
        None (the restore spawns its restorer)."""
        pool = self.pool
        if pool is not None and pool.prepared is not None and pool.prepared is not prepared:
            return None                   # warm for another policy / profile
        return pool

    def suits(self, prepared) -> bool:
        """True when this pool serves `prepared` as well as a new pool would."""
        return self.pool is None or self.pool.prepared is prepared

    def stats(self) -> dict:
        st = self.pool.stats() if self.pool is not None else {"size": 0, "idle": 0}
        return {**st, "warm": bool(self.pool is not None and self.pool.prepared is not None),
                "idle_pids": self.pool.pids() if self.pool is not None else []}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

"""Spawning restorers and ghosts straight into a cgroup.

A process moved into a memory cgroup after it has touched pages leaves their charges where
they were (the kernel no longer moves charges), so a clone whose every page must count
against a limit has to be *born* there. `CgroupTarget(path)` opens a cgroup directory once
and tells `cx_spawn` how the new process gets in:

- cgroup v2 (the directory has `cgroup.controllers`): `clone3(CLONE_INTO_CGROUP)` with an fd
  of the directory; the kernel places the child before it runs.
- cgroup v1 (e.g. `/sys/fs/cgroup/memory/...`): the child writes "0" to the directory's open
  `cgroup.procs` first thing, before it execs the restorer, so the restorer's own pages and
  everything its plan maps or copies are charged there.

    with CgroupTarget("/sys/fs/cgroup/memory/mygroup") as cg:
        ... GhostPool(4, cgroup=cg.path) / prepared.restore(1, cgroup=cg.path) ...
"""
from __future__ import annotations

import os

from cxlfork.errors import CxlforkError
from cxlfork.native import lib


class CgroupTarget:
    """An open cgroup directory for cx_spawn: .fd, .kind (lib.CX_CG_DIR / CX_CG_PROCS)."""

    def __init__(self, path: str):
        self.path = os.path.realpath(path)
        if not os.path.isfile(os.path.join(self.path, "cgroup.procs")):
            raise CxlforkError(f"{path} is not a cgroup directory (no cgroup.procs)")
        v2 = os.path.exists(os.path.join(self.path, "cgroup.controllers"))
        try:
            if v2:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            else:
                self.fd = os.open(os.path.join(self.path, "cgroup.procs"),
                                  os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            raise CxlforkError(f"opening cgroup {path}: {e.strerror}") from e
        self.kind = lib.CX_CG_DIR if v2 else lib.CX_CG_PROCS
        self.version = 2 if v2 else 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Close the fd. Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def spawn_args(cg: CgroupTarget | None) -> tuple[int, int]:
    """The (cgfd, cgkind) arguments of cx_spawn for cg (None: the caller's own cgroup)."""
    return (cg.fd, cg.kind) if cg is not None else (-1, lib.CX_CG_NONE)

"""The mover interface: carry out one direction of a migration plan on a live process.

    outcome = mover.move(pid, addrs, node)     # page-aligned virtual addresses, one node

A mover works in batches of at most ``batch_pages`` pages, so a target is never held up by
more than one batch at a time, and paces itself to ``rate_bps`` bytes per second. The
outcome says what happened to every page: moved, still where it was (busy, node full), or
gone (unmapped / not present), with failures counted by errno name.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tiermem.errors import TiermemError


class TargetGone(TiermemError):
    """The process exited (ESRCH) while its pages were being moved."""


@dataclass
class MoveOutcome:
    node: int
    requested: int = 0
    moved: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    gone: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))   # EFAULT/ENOENT
    failed: dict[str, int] = field(default_factory=dict)    # errno name -> pages
    node_full: bool = False          # ENOMEM seen: the destination node has no room
    batches: int = 0
    seconds: float = 0.0
    dry_run: bool = False

    @property
    def n_moved(self) -> int:
        return int(self.moved.size)

    def add_failures(self, other: dict[str, int]) -> None:
        for k, v in other.items():
            self.failed[k] = self.failed.get(k, 0) + v


class Mover:
    """Base class; subclasses set ``name`` and implement ``move``."""

    name = "base"

    def __init__(self, rate_bps: float, batch_pages: int):
        if rate_bps <= 0:
            raise TiermemError(f"mover: rate must be positive, got {rate_bps} B/s")
        if not 1 <= batch_pages <= 65536:
            raise TiermemError(f"mover: batch_pages must be 1..65536, got {batch_pages}")
        self.rate_bps = float(rate_bps)
        self.batch_pages = int(batch_pages)

    def move(self, pid: int, addrs: np.ndarray, node: int) -> MoveOutcome:
        raise TiermemError(f"mover {self.name} does not implement move()")

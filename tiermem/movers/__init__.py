"""Movers: carry out migration plans on a live host, behind the interface in movers.base.

``MOVERS`` maps a name to its class: ``numa`` (move_pages in rate-limited batches) and
``dry-run`` (queries only, moves nothing).
"""
from __future__ import annotations

from tiermem.errors import TiermemError
from tiermem.movers.base import MoveOutcome, Mover, TargetGone
from tiermem.movers.dryrun import DryRunMover
from tiermem.movers.numa import NumaMover

MOVERS: dict[str, type[Mover]] = {NumaMover.name: NumaMover, DryRunMover.name: DryRunMover}


def make_mover(name: str, rate_bps: float, batch_pages: int) -> Mover:
    cls = MOVERS.get(name)
    if cls is None:
        raise TiermemError(f"unknown mover {name!r} (known: {', '.join(sorted(MOVERS))})")
    return cls(rate_bps, batch_pages)


__all__ = ["MOVERS", "MoveOutcome", "Mover", "TargetGone", "make_mover"]

"""The per-function clone-policy switch for `policy = "auto"`.

Policies ordered by local memory and by access speed: mow (map the store, copy on write) <
hybrid (copy the pages clones touched) < moa (copy everything). Each evaluation moves at most
one step, and at most once per HOLD_S seconds:

    pressure >= HIGH               -> one step toward mow   (reason "pressure")
    p99 > slo and pressure < LOW   -> one step toward moa   (reason "slo")
    p99 < slo / 2 and pressure >= MID -> one step toward mow (reason "headroom")

pressure = the porter's local memory / its limit (0 without a limit); p99 over the restored
starts and warm invocations of the last WINDOW_S seconds.
"""
from __future__ import annotations

LADDER = ("mow", "hybrid", "moa")
HIGH, MID, LOW = 0.9, 0.5, 0.7
HOLD_S = 5.0
WINDOW_S = 30.0
MIN_SAMPLES = 8


def next_policy(current: str, p99_ms: float | None, slo_ms: float, pressure: float,
                ) -> tuple[str, str] | None:
    """(new policy, reason) or None to keep the current one."""
    i = LADDER.index(current)
    if pressure >= HIGH and i > 0:
        return LADDER[i - 1], f"pressure {pressure:.2f} >= {HIGH}"
    if p99_ms is None:
        return None
    if p99_ms > slo_ms and pressure < LOW and i < len(LADDER) - 1:
        return LADDER[i + 1], f"p99 {p99_ms:.1f} ms > SLO {slo_ms:g} ms"
    if p99_ms < slo_ms / 2 and pressure >= MID and i > 0:
        return LADDER[i - 1], f"p99 {p99_ms:.1f} ms < SLO/2 with pressure {pressure:.2f}"
    return None

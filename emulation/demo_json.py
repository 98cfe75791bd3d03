"""demo-out/demo.json: the demo's figures, one entry per (workload, mode) run.

    {"runs": [{"workload": "dense"|"sparse", "mode": "tiermemd-m5"|"kernel",
               "time_to_90_s": float or null, "hot_fast_share": float,
               "work_rate": float}, ...]}

write_demo_json checks every run before anything is written (a run with a missing or
non-finite figure, an unknown workload or mode, a share outside [0, 1], a negative rate is
refused with one line) and writes atomically.
"""
from __future__ import annotations

import json
import math
import os

from tiermem.errors import TiermemError

WORKLOADS = ("dense", "sparse")
MODES = ("tiermemd-m5", "kernel")


def _num(x, what: str, allow_none: bool = False) -> float | None:
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise TiermemError(f"demo.json: {what} is {x!r}, not a measured number")
    return float(x)


def demo_entries(runs: list[dict]) -> list[dict]:
    out = []
    for i, r in enumerate(runs):
        where = f"run {i} ({r.get('workload')}/{r.get('mode')})"
        if r.get("workload") not in WORKLOADS or r.get("mode") not in MODES:
            raise TiermemError(f"demo.json: {where}: workload must be one of {WORKLOADS} and "
                               f"mode one of {MODES}")
        e = {"workload": r["workload"], "mode": r["mode"],
             "time_to_90_s": _num(r.get("time_to_90_s"), f"{where}: time_to_90_s", True),
             "hot_fast_share": _num(r.get("hot_fast_share"), f"{where}: hot_fast_share"),
             "work_rate": _num(r.get("work_rate"), f"{where}: work_rate")}
        if not 0.0 <= e["hot_fast_share"] <= 1.0:
            raise TiermemError(f"demo.json: {where}: hot_fast_share {e['hot_fast_share']} "
                               "is not a share in [0, 1]")
        if e["work_rate"] < 0 or (e["time_to_90_s"] is not None and e["time_to_90_s"] < 0):
            raise TiermemError(f"demo.json: {where}: negative time or rate")
        out.append(e)
    return out


def write_demo_json(runs: list[dict], path: str) -> str:
    doc = {"runs": demo_entries(runs)}
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(path + ".tmp", path)
    return path

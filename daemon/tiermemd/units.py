"""Parsing of the units operators write in tiermemd's config: durations, sizes, rates, shares.

    "500ms" "1s" "2m"          -> seconds (float)
    "64MiB" "1GiB" "512MB" "4k" -> bytes (int)   (bare integers are bytes)
    "200MB/s" "1GiB/s"          -> bytes per second (float)
    "5%"                        -> a fraction of a whole (0.05), for watermarks

Each parser raises ValueError with the reason; config.py adds file:key in front.
"""
from __future__ import annotations

import math
import re

MAX_DURATION_S = 7 * 86400.0     # longer loop intervals or windows overflow budgets
MAX_SIZE = 2**50                 # 1 PiB: no memory tier here is larger
MAX_RATE = 2**40                 # 1 TiB/s: above any memory bus; budgets stay in range

_DURATION = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 2**20, "mb": 10**6,
         "mib": 2**20, "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12,
         "tib": 2**40}
_NUM = r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*"


def duration(v) -> float:
    """Seconds from '500ms', '1s', '2m', or a bare number of seconds."""
    if isinstance(v, bool):
        raise ValueError(f"expected a duration like '1s' or '500ms', got {v!r}")
    if isinstance(v, (int, float)):
        s = float(v)
    else:
        m = re.fullmatch(_NUM + r"([a-z]*)\s*", str(v).lower())
        if not m or m.group(2) not in _DURATION:
            raise ValueError(f"bad duration {v!r}: expected a number with a unit "
                             f"({', '.join(_DURATION)}), e.g. '1s' or '500ms'")
        s = float(m.group(1)) * _DURATION[m.group(2)]
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"duration must be a positive, finite number, got {v!r}")
    if s > MAX_DURATION_S:
        raise ValueError(f"duration must be at most {MAX_DURATION_S:g} s (a week), got {v!r}")
    return s


def size(v) -> int:
    """Bytes from '64MiB', '1GiB', '512MB', '4k', or a bare integer of bytes."""
    if isinstance(v, bool):
        raise ValueError(f"expected a size like '64MiB', got {v!r}")
    if isinstance(v, int):
        b = v
    else:
        m = re.fullmatch(_NUM + r"([a-z]*)\s*", str(v).lower())
        if not m or m.group(2) not in _SIZE:
            raise ValueError(f"bad size {v!r}: expected a number with a unit "
                             "(B, KiB, MiB, GiB, TiB, kB, MB, GB), e.g. '64MiB'")
        f = float(m.group(1)) * _SIZE[m.group(2)]
        if not math.isfinite(f):
            raise ValueError(f"size must be finite, got {v!r}")
        b = int(f)
    if b < 0:
        raise ValueError(f"size must be >= 0, got {v!r}")
    if b > MAX_SIZE:
        raise ValueError(f"size must be at most 1 PiB, got {v!r}")
    return b


def rate(v) -> float:
    """Bytes per second from '200MB/s', '1GiB/s'."""
    if isinstance(v, str) and v.strip().lower().endswith("/s"):
        b = size(v.strip()[:-2])
        if b <= 0:
            raise ValueError(f"rate must be positive, got {v!r}")
        if b > MAX_RATE:
            raise ValueError(f"rate must be at most 1 TiB/s, got {v!r}")
        return float(b)
    raise ValueError(f"bad rate {v!r}: expected a size per second, e.g. '200MB/s' or '1GiB/s'")


def size_or_share(v) -> tuple[str, float]:
    """('share', 0.05) for '5%', ('bytes', n) for a size."""
    if isinstance(v, str) and v.strip().endswith("%"):
        try:
            f = float(v.strip()[:-1]) / 100
        except ValueError:
            raise ValueError(f"bad percentage {v!r}") from None
        if not math.isfinite(f) or not 0 <= f <= 1:
            raise ValueError(f"percentage must be within 0%..100%, got {v!r}")
        return "share", f
    return "bytes", float(size(v))

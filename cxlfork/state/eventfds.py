"""eventfds: the counter and EFD_SEMAPHORE from fdinfo at checkpoint; a new eventfd with the
same counter and O_NONBLOCK at restore (a counter above 2^32-1 is written in two steps)."""
from __future__ import annotations

import os


def collect(f: dict, rec: dict) -> None:
    info = f["info"]
    rec.update(kind="eventfd", count=int(info.get("eventfd-count", "0"), 16),
               semaphore=info.get("eventfd-semaphore", "0").strip() == "1")


def reopen(f: dict, flags: int, opened: list[int]) -> int:
    efl = os.EFD_CLOEXEC | (os.EFD_NONBLOCK if flags & os.O_NONBLOCK else 0) | \
        (os.EFD_SEMAPHORE if f.get("semaphore") else 0)
    s = os.eventfd(min(f["count"], 2**32 - 1), efl)
    opened.append(s)
    if f["count"] >= 2**32:
        os.eventfd_write(s, f["count"] - (2**32 - 1))
    return s

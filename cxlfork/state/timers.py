"""Timers: POSIX timers (timer_create) and interval timers (setitimer).

Checkpoint (`collect`, inside the injection window): /proc/PID/timers lists each POSIX
timer's ID, clock, signal, signal value and whom it notifies (psutil has none of it); its
remaining time and interval come from timer_gettime injected into the process, and the three
interval timers (ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF) from injected getitimer calls.
Refused, naming the timer: timers that signal a thread other than the main one (glibc's
SIGEV_THREAD timers do: their helper thread's tid does not survive), SIGEV_THREAD timers,
CPU-time clocks (process/thread CPU clocks) and clocks other than REALTIME, MONOTONIC,
BOOTTIME and TAI.

Restore: the plan (cxlfork.plan, OP_TIMER_CREATE/OP_TIMER_SET/OP_SETITIMER) recreates each
POSIX timer under its old ID (prctl PR_TIMER_CREATE_RESTORE_IDS, Linux 6.17+; on an older
kernel the restore fails with that step named) and arms it, and the interval timers, with
the remaining times they had at the checkpoint, per clone, right before the hand-over.
Expirations pending or overrun at the checkpoint are not carried over.
"""
from __future__ import annotations

import struct

from cxlfork import procfs
from cxlfork.errors import CxlforkError, ImageError, Refused

CLOCKS = {0: "CLOCK_REALTIME", 1: "CLOCK_MONOTONIC", 7: "CLOCK_BOOTTIME", 11: "CLOCK_TAI"}
SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD_ID = 0, 1, 4
ITIMERS = ("real", "virtual", "prof")         # which = 0, 1, 2
NR_TIMER_GETTIME, NR_GETITIMER = 224, 36
NS = 10**9


def _posix_timers(pid: int) -> list[dict]:
    """/proc/PID/timers, parsed: id, signo, value, notify (name), target (pid/tid), clock."""
    out, cur = [], None
    for line in procfs.read_text(pid, "timers").splitlines():
        key, _, val = line.partition(":")
        val = val.strip()
        if key == "ID":
            cur = {"id": int(val)}
            out.append(cur)
        elif cur is None:
            continue
        elif key == "signal":
            sig, _, value = val.partition("/")
            cur["signo"], cur["value"] = int(sig), int(value or "0", 16)
        elif key == "notify":
            how, _, who = val.partition("/")
            kind, _, num = who.partition(".")
            cur["notify"], cur["target"], cur["target_id"] = how, kind, int(num or "0")
        elif key == "ClockID":
            cur["clock"] = int(val)
    return out


def _gettime(tr, nr: int, *args: int) -> tuple[int, ...]:
    r = tr.inject_nr(nr, *args, tr.scratch)
    if r < 0:
        raise CxlforkError(f"reading a timer of PID {tr.pid} (syscall {nr}): errno {-r}")
    return struct.unpack("<4q", tr.read(tr.scratch, 32))


def collect(tr) -> dict:
    """{"posix": [...], "itimers": {...}} of the frozen process tr (main thread, inside its
    injection window: the scratch page is mapped)."""
    pid = tr.pid
    posix = []
    for t in _posix_timers(pid):
        name = f"POSIX timer ID {t['id']} of PID {pid}"
        if t.get("clock") not in CLOCKS:
            raise Refused(f"{name} runs on clock {t.get('clock')} (a CPU-time clock or one "
                          "other than REALTIME/MONOTONIC/BOOTTIME/TAI); not supported")
        if t.get("notify") == "signal":
            notify = SIGEV_SIGNAL
        elif t.get("notify") == "none":
            notify = SIGEV_NONE
        else:
            raise Refused(f"{name} notifies by {t.get('notify')!r} (SIGEV_THREAD); "
                          "not supported")
        to_main = t.get("target") == "tid"
        if to_main and t["target_id"] != pid:
            raise Refused(f"{name} signals thread {t['target_id']}, not the main thread "
                          "(SIGEV_THREAD_ID; glibc's SIGEV_THREAD timers are such); thread "
                          "IDs do not survive a restore: not supported")
        isec, insec, vsec, vnsec = _gettime(tr, NR_TIMER_GETTIME, t["id"])
        posix.append({"id": t["id"], "clock": t["clock"],
                      "notify": notify | (SIGEV_THREAD_ID if to_main else 0),
                      "signo": t["signo"], "value": t["value"],
                      "interval_ns": isec * NS + insec, "value_ns": vsec * NS + vnsec})
    itimers = {}
    for which, name in enumerate(ITIMERS):
        isec, iusec, vsec, vusec = _gettime(tr, NR_GETITIMER, which)
        if isec or iusec or vsec or vusec:
            itimers[name] = {"interval_us": isec * 10**6 + iusec,
                             "value_us": vsec * 10**6 + vusec}
    return {"posix": posix, "itimers": itimers}


def check(m: dict, image: str) -> None:
    """Validate the manifest's timers field (optional: older images have none)."""
    t = m.get("timers")
    if t is None:
        return

    def bad(where, why):
        raise ImageError(f"image {image}: manifest field timers{where}: {why}")

    def num(d, k, lo, hi, where):
        v = d.get(k) if isinstance(d, dict) else None
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v < hi:
            bad(f"{where}.{k}", f"{v!r} is not an integer in [{lo}, {hi})")
    if not isinstance(t, dict) or not isinstance(t.get("posix"), list) \
            or not isinstance(t.get("itimers"), dict):
        bad("", "expected {posix: [...], itimers: {...}}")
    ids = set()
    for i, p in enumerate(t["posix"]):
        w = f".posix[{i}]"
        num(p, "id", 0, 2**31, w)
        if p["id"] in ids:
            bad(w, f"timer ID {p['id']} listed twice")
        ids.add(p["id"])
        num(p, "clock", 0, 12, w)
        if p["clock"] not in CLOCKS:
            bad(f"{w}.clock", f"clock {p['clock']} is not supported")
        num(p, "notify", 0, 8, w)
        if p["notify"] not in (SIGEV_SIGNAL, SIGEV_NONE, SIGEV_SIGNAL | SIGEV_THREAD_ID):
            bad(f"{w}.notify", f"notify {p['notify']} is not supported")
        num(p, "signo", 0, 65, w)
        num(p, "value", 0, 2**64, w)
        num(p, "interval_ns", 0, 2**62, w)
        num(p, "value_ns", 0, 2**62, w)
    for k, v in t["itimers"].items():
        if k not in ITIMERS:
            bad(f".itimers.{k}", "unknown interval timer")
        num(v, "interval_us", 0, 2**62, f".itimers.{k}")
        num(v, "value_us", 0, 2**62, f".itimers.{k}")

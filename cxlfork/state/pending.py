"""Pending signals: the signals queued for the process (its shared queue) and for its main
thread (its own queue) at the checkpoint, typically blocked ones a signalfd or sigwait reads
later, with their whole siginfo (sender PID/UID, si_code, value).

Checkpoint (`collect`, the process frozen under ptrace): PTRACE_PEEKSIGINFO, which copies the
queues without dequeuing anything (the original keeps them). Refused, naming the signal: a
signal pending only for a thread other than the main one (thread IDs do not survive a
restore), a pending SIGSEGV (the restorer's hand-over is a SIGSEGV), more than MAX queued.

Restore: the plan (cxlfork.plan OP_SIGQUEUE) queues each again from the clone itself, which
the kernel allows with any si_code (rt_sigqueueinfo / rt_tgsigqueueinfo to oneself), while
the restorer still blocks every signal; the clone's own mask, installed at the hand-over,
then decides as in the original. Signals that arrive during the checkpoint itself are given
back to the original only (cxlfork.ptrace)."""
from __future__ import annotations

import base64
import os
import struct

from cxlfork.errors import CxlforkError, ImageError, Refused
from cxlfork.native import ffi, lib

SIGINFO = 128
MAX = 1024
SIGSEGV = 11


def _peek(tid: int, shared: bool) -> list[bytes]:
    buf = ffi.new("char[]", SIGINFO * MAX)
    n = lib.cx_peek_siginfo(tid, 1 if shared else 0, MAX, buf)
    if n < 0:
        raise CxlforkError(f"reading the pending signals of thread {tid}: {os.strerror(-n)}")
    data = ffi.buffer(buf, n * SIGINFO)[:]
    if n == MAX and lib.cx_peek_siginfo(tid, 1 if shared else 0, MAX + 1, buf) > MAX:
        raise Refused(f"thread {tid} has more than {MAX} signals pending; not supported")
    return [data[i * SIGINFO:(i + 1) * SIGINFO] for i in range(n)]


def collect(tr) -> dict:
    """{"shared": [siginfo b64...], "private": [...]} of the frozen process tr."""
    pid = tr.pid
    out = {"shared": _peek(pid, True), "private": _peek(pid, False)}
    for q in out.values():
        for si in q:
            if struct.unpack_from("<i", si)[0] == SIGSEGV:
                raise Refused(f"PID {pid} has a SIGSEGV pending; cxlfork's restorer hands "
                              "over through a SIGSEGV: not supported")
    for t in tr.threads:
        own = _peek(t.pid, False)
        if own:
            sig = struct.unpack_from("<i", own[0])[0]
            raise Refused(f"thread {t.pid} of PID {pid} has signal {sig} pending for itself "
                          "alone; thread IDs do not survive a restore: not supported")
    return {k: [base64.b64encode(si).decode() for si in v] for k, v in out.items()}


def check(m: dict, image: str) -> None:
    """Validate the manifest's pending field (optional: older images have none)."""
    p = m.get("pending")
    if p is None:
        return
    if not isinstance(p, dict) or set(p) != {"shared", "private"}:
        raise ImageError(f"image {image}: manifest field pending: expected shared and private")
    for k, q in p.items():
        if not isinstance(q, list) or len(q) > MAX:
            raise ImageError(f"image {image}: manifest field pending.{k}: expected a list of "
                             f"at most {MAX}")
        for i, s in enumerate(q):
            try:
                si = base64.b64decode(s, validate=True)
            except (ValueError, TypeError):
                si = b""
            if len(si) != SIGINFO or not 1 <= struct.unpack_from("<i", si)[0] <= 64 or \
                    struct.unpack_from("<i", si)[0] in (9, 19, SIGSEGV):
                raise ImageError(f"image {image}: manifest field pending.{k}[{i}]: not a "
                                 "siginfo of a signal that can be queued")


def records(m: dict) -> list[tuple[bytes, bool]]:
    """(siginfo, to the main thread only) of each pending signal, shared queue first."""
    p = m.get("pending") or {"shared": [], "private": []}
    return [(base64.b64decode(s), False) for s in p["shared"]] + \
        [(base64.b64decode(s), True) for s in p["private"]]

"""Processes that must die with the porter even when it is SIGKILLed, and have no pipe to the
porter of their own: restored HTTP clones (a stdio worker ends on its stdin's EOF; a cold
HTTP instance has PR_SET_PDEATHSIG; a cxlfork clone has neither, and a process's death
signal cannot be set from outside).

A small watcher process holds a pidfd of each such process (sent as "+PID" / "-PID" lines
on its stdin, a pipe whose only writer is the porter): when that pipe reaches EOF — the
porter exited, however — it SIGKILLs every process it still holds and exits. A pidfd names
the process, not the number, so a PID reused after the process ended is never hit.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading

WATCHER = r"""
import os, signal, sys
held = {}
for line in sys.stdin.buffer:
    sign, pid = line[:1], int(line[1:])
    if sign == b"+":
        try:
            held[pid] = os.pidfd_open(pid)
        except OSError:
            pass
    elif pid in held:
        os.close(held.pop(pid))
for fd in held.values():
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        pass
"""


class Lifeline:
    def __init__(self):
        self.lock = threading.Lock()
        self.p: subprocess.Popen | None = None

    def _send(self, line: bytes) -> None:
        with self.lock:
            if self.p is None:
                self.p = subprocess.Popen([sys.executable, "-S", "-c", WATCHER],
                                          stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, close_fds=True,
                                          start_new_session=True, bufsize=0)
            try:
                self.p.stdin.write(line)
            except (BrokenPipeError, OSError):
                pass

    def watch(self, pid: int) -> None:
        """Kill pid when the porter ends (call while the process is known alive)."""
        self._send(b"+%d\n" % pid)

    def forget(self, pid: int) -> None:
        self._send(b"-%d\n" % pid)

    def close(self) -> None:
        """The porter's clean stop (its processes are killed already): end the watcher."""
        with self.lock:
            p, self.p = self.p, None
        if p is not None:
            p.stdin.close()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

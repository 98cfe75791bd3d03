"""One worker process of a function, started cold (spawn + init) or restored from a cxlfork
checkpoint, talking newline-delimited JSON over its stdin/stdout pipes, one request at a time.

The porter never calls waitpid on a live instance (a checkpoint ptraces it, and a wait from
another thread could take its stop); a process is reaped only after it was killed or its
stdout reached EOF.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import threading
import time

from cxlfork.errors import CxlforkError

MAX_LINE = 64 << 20


class WorkerDied(Exception):
    """The worker exited (or closed stdout) before answering."""


class WorkerBadAnswer(WorkerDied):
    """The worker is alive but broke the protocol (a line that is not JSON, a wrong id)."""


class WorkerTimeout(Exception):
    """No answer within the timeout."""


class WorkerFailed(Exception):
    """The worker answered with {"error": ...} (its own error, the instance lives on)."""


def _status_text(st: int) -> str:
    if os.WIFEXITED(st):
        return f"exited with status {os.WEXITSTATUS(st)}"
    if os.WIFSIGNALED(st):
        return f"was killed by signal {signal.Signals(os.WTERMSIG(st)).name}"
    return f"wait status {st:#x}"


def cxlfork_policy(policy: str) -> tuple[str, bool]:
    """A porter clone policy as cxlfork's (policy, eager): "moa" is cxlfork's lazy
    migrate-on-access (blocks copied on first touch), "moa-eager" copies every page at restore
    (the CRIU-like restore)."""
    if policy == "moa-eager":
        return "moa", True
    return policy, False


def restore_clone(image: str, policy: str, stdio, prepared=None, ghosts=None,
                  cgroup: str | None = None) -> list[int]:
    """One clone of image for the porter: through `prepared` (only the per-clone part of the
    restore) when given, else a one-shot cxlfork restore under the porter's policy name."""
    if prepared is not None:
        return prepared.restore(1, stdio=stdio, ghosts=ghosts, cgroup=cgroup)
    from cxlfork.restore import restore
    cx_policy, eager = cxlfork_policy(policy)
    return restore(image, policy=cx_policy, n=1, stdio=stdio, eager=eager, ghosts=ghosts,
                   cgroup=cgroup)


class Instance:
    """A running worker. kind: "cold" or "restored"; state: starting/idle/busy/checkpointing/
    dead."""

    def __init__(self, pid: int, stdin_fd: int, stdout_fd: int, kind: str, policy: str,
                 popen: subprocess.Popen | None = None):
        self.pid, self.kind, self.policy = pid, kind, policy
        self.stdin_fd, self.stdout_fd = stdin_fd, stdout_fd
        self.popen = popen
        self.buf = b""
        self.state = "starting"
        self.started = time.monotonic()
        self.last_used = self.started
        self.served = 0
        self.next_id = 1
        self.local_bytes = 0
        self.shared_bytes = 0
        self.start_ms = 0.0
        self.exit_text = ""
        self.phases: dict[str, float] = {}     # where the start's time went, ms
        self.lock = threading.Lock()

    # -- starting ------------------------------------------------------------------------
    @classmethod
    def spawn(cls, command: list[str], env: dict, log_fd: int,
              cgroup_procs_fd: int = -1) -> "Instance":
        """Start the worker program (a new session; stderr to the function's log). With
        cgroup_procs_fd (an open cgroup.procs) the child joins that cgroup before it execs,
        so every page of the instance is charged there."""
        join = None
        if cgroup_procs_fd >= 0:
            def join():
                os.write(cgroup_procs_fd, b"0")
        try:
            p = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=log_fd, env=env, close_fds=True, bufsize=0,
                                 start_new_session=True, preexec_fn=join)
        except OSError as e:
            raise WorkerDied(f"cannot start {command[0]}: {e.strerror}") from e
        except subprocess.SubprocessError as e:      # the child could not join the cgroup
            raise WorkerDied(f"cannot start {command[0]}: joining the function's memory "
                             f"cgroup failed ({e})") from e
        inst = cls(p.pid, p.stdin.fileno(), p.stdout.fileno(), "cold", "cold", popen=p)
        inst.t_spawn = time.perf_counter()
        return inst

    def initialise(self, init: dict, timeout: float) -> None:
        """Send {"init": ...} and wait for {"ready": true}."""
        self._send({"init": init})
        ans = self._read(timeout, "init")
        if ans.get("ready") is not True:
            raise WorkerDied(f"init failed: {ans.get('error', ans)}")
        self.start_ms = (time.perf_counter() - self.t_spawn) * 1e3
        self.phases["spawn_init"] = self.start_ms

    @classmethod
    def restore(cls, image: str, policy: str, log_fd: int, prepared=None,
                ghosts=None, cgroup: str | None = None) -> "Instance":
        """Restore one clone of IMAGE with a porter policy (cxlfork_policy); with `prepared`
        (cxlfork.restore.prepare_restore of that image and policy) only the per-clone part of
        the restore is paid; `ghosts`: where the clone's process comes from (FunctionGhosts
        .source()); cgroup: the cgroup directory a spawned restorer is born in (ghosts were
        born there too)."""
        t0 = time.perf_counter()
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        try:
            pids = restore_clone(image, policy, (in_r, out_w, log_fd), prepared, ghosts, cgroup)
        except BaseException:
            for fd in (in_r, in_w, out_r, out_w):
                os.close(fd)
            raise
        os.close(in_r)
        os.close(out_w)
        inst = cls(pids[0], in_w, out_r, "restored", policy)
        inst.start_ms = (time.perf_counter() - t0) * 1e3
        inst.phases["restore"] = inst.start_ms
        return inst

    # -- talking -------------------------------------------------------------------------
    def gone(self) -> bool:
        """True when an idle instance's stdout is readable: it hit EOF (the process died,
        e.g. OOM-killed while idle) or wrote without being asked; either way it is unusable."""
        if self.buf:
            return True
        try:
            r, _, _ = select.select([self.stdout_fd], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(r)

    def _send(self, msg: dict) -> None:
        data = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        try:
            while data:
                n = os.write(self.stdin_fd, data)
                data = data[n:]
        except (BrokenPipeError, OSError) as e:
            raise WorkerDied(f"stdin closed ({e.strerror})") from e

    def _read(self, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerTimeout(f"no answer to the {what} within {timeout:g} s")
            r, _, _ = select.select([self.stdout_fd], [], [], left)
            if not r:
                continue
            chunk = os.read(self.stdout_fd, 1 << 16)
            if not chunk:
                raise WorkerDied(f"closed its stdout during the {what}")
            self.buf += chunk
            if len(self.buf) > MAX_LINE:
                raise WorkerDied(f"answer to the {what} longer than {MAX_LINE >> 20} MiB")
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            ans = json.loads(line)
        except ValueError as e:
            raise WorkerBadAnswer(f"answered the {what} with a line that is not JSON: "
                             f"{line[:120]!r}") from e
        if not isinstance(ans, dict):
            raise WorkerBadAnswer(f"answered the {what} with {line[:120]!r}, not an object")
        return ans

    def call(self, payload, timeout: float):
        """One request; returns the worker's output (raises WorkerFailed/Died/Timeout)."""
        rid = self.next_id
        self.next_id += 1
        self._send({"id": rid, "input": payload})
        ans = self._read(timeout, "request")
        if ans.get("id") != rid:
            raise WorkerBadAnswer(f"answered request {ans.get('id')!r}, expected {rid}")
        if "error" in ans:
            raise WorkerFailed(str(ans["error"]))
        if "output" not in ans:
            raise WorkerBadAnswer("answer has neither output nor error")
        return ans["output"]

    # -- ending --------------------------------------------------------------------------
    def kill(self) -> str:
        """SIGKILL and reap; returns how it ended. Idempotent and thread-safe. The pipes stay
        open (a thread may be reading them): the instance's owner calls close()."""
        with self.lock:
            if self.state == "dead":
                return self.exit_text
            self.state = "dead"
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                if self.popen is not None:
                    st = self.popen.wait()
                    self.exit_text = (f"exited with status {st}" if st >= 0 else
                                      f"was killed by signal {signal.Signals(-st).name}")
                else:
                    _, st = os.waitpid(self.pid, 0)
                    self.exit_text = _status_text(st)
            except ChildProcessError:
                self.exit_text = "is gone"
            return self.exit_text

    def close(self) -> None:
        """Close the pipes (after kill). Idempotent."""
        with self.lock:
            fds, self.stdin_fd, self.stdout_fd = (self.stdin_fd, self.stdout_fd), -1, -1
            if self.popen is not None:
                for f in (self.popen.stdin, self.popen.stdout):
                    try:
                        f.close()
                    except OSError:
                        pass
                return
            for fd in fds:
                if fd >= 0:
                    os.close(fd)


__all__ = ["Instance", "WorkerDied", "WorkerTimeout", "WorkerFailed", "CxlforkError"]

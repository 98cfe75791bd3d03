"""One instance of an HTTP function: a server in a network namespace of its own, listening on
127.0.0.1:8080 there, that the porter reaches from its side (a socket created inside that
namespace, cxlfork.porter.netns), one request at a time on a kept-alive connection.

protocol "openwhisk" (the OpenWhisk action interface, apache/openwhisk docs/actions-new.md):
    POST /init  {"value": init}            once; 200 = ready, else {"error": ...}: start failed
    POST /run   {"value": input, "namespace", "action_name", "activation_id", "deadline"}
                200 + a JSON object = the result; another status with {"error": ...} = the
                action's own error (instance kept, 500); anything else (not HTTP, not a JSON
                object) = the instance is broken (killed, 502)
protocol "http" (Knative-style): any HTTP server on $PORT (8080); the client's request is
    forwarded as is (method, path below /functions/NAME/invoke, query, headers, body) and the
    answer comes back as is.

It has the interface of instance.Instance (spawn, initialise, call, gone, kill, close), so
the pool treats both alike. Liveness is a pidfd (readable once the process exited).
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import errno
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import threading
import time
import uuid

from cxlfork.porter import netns
from cxlfork.porter.instance import (WorkerBadAnswer, WorkerDied, WorkerFailed, WorkerTimeout,
                                     _status_text)

PORT = 8080
MAX_BODY = 64 << 20
# hop-by-hop headers (RFC 9110 7.6.1) are the porter's own on each leg, never forwarded
HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
       "upgrade", "content-length", "host"}


PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


class _Spawner:
    """Starts cold HTTP instances from one long-lived thread, each with PR_SET_PDEATHSIG =
    SIGKILL: the kernel kills them when that thread ends, i.e. with the porter even when the
    porter is SIGKILLed (a stdio worker ends on its stdin's EOF; an HTTP server has no such
    pipe). The signal fires when the *thread* that forked the child exits, hence one thread
    for the porter's life rather than the request threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.jobs = None

    def run(self, fn):
        with self.lock:
            if self.jobs is None:
                self.jobs = concurrent.futures.ThreadPoolExecutor(1, "http-spawner")
        return self.jobs.submit(fn).result()


_spawner = _Spawner()


def _die_with_parent(parent: int) -> None:
    """In the child: SIGKILL when the spawner thread ends; gone already if the porter died
    between the fork and here."""
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os._exit(1)


@dataclasses.dataclass
class HttpRequest:
    """A client request for a protocol = "http" function, forwarded as is."""
    method: str
    path: str                                   # below /functions/NAME/invoke, with ?query
    headers: list[tuple[str, str]]
    body: bytes


@dataclasses.dataclass
class HttpResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes


class _Conn(http.client.HTTPConnection):
    """An HTTP connection to 127.0.0.1:PORT inside an instance's network namespace."""

    def __init__(self, ns_fd: int, timeout: float):
        super().__init__("127.0.0.1", PORT, timeout=timeout)
        self.ns_fd = ns_fd

    def connect(self):
        s = netns.socket_in(self.ns_fd)
        s.settimeout(self.timeout)
        try:
            s.connect(("127.0.0.1", PORT))
        except BaseException:
            s.close()
            raise
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = s


class HttpInstance:
    """A running HTTP server of a function. kind: "cold" or "restored"."""

    def __init__(self, pid: int, kind: str, policy: str, protocol: str, function: str,
                 popen: subprocess.Popen | None = None):
        self.pid, self.kind, self.policy = pid, kind, policy
        self.protocol, self.function = protocol, function
        self.popen = popen
        self.pidfd = os.pidfd_open(pid)
        try:
            self.ns_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(self.pidfd)
            raise
        self.conn: _Conn | None = None
        self.lifeline = None                    # a restored clone's (see restore)
        self.state = "starting"
        self.started = time.monotonic()
        self.last_used = self.started
        self.served = 0
        self.local_bytes = 0
        self.shared_bytes = 0
        self.start_ms = 0.0
        self.exit_text = ""
        self.phases: dict[str, float] = {}
        self.lock = threading.Lock()
        self.t_spawn = time.perf_counter()

    # -- starting ------------------------------------------------------------------------
    @classmethod
    def spawn(cls, protocol: str, function: str, command: list[str], env: dict, log_fd: int,
              cgroup_procs_fd: int = -1) -> "HttpInstance":
        """Start the server in a new session and a network namespace of its own (loopback
        up), stdin /dev/null, stdout and stderr to the function's log; $PORT = 8080."""
        parent = os.getpid()

        def child():
            _die_with_parent(parent)
            if cgroup_procs_fd >= 0:
                os.write(cgroup_procs_fd, b"0")
            netns.new_netns_in_child()
        try:
            p = _spawner.run(lambda: subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                env=dict(env, PORT=str(PORT)), close_fds=True, start_new_session=True,
                preexec_fn=child))
        except OSError as e:
            raise WorkerDied(f"cannot start {command[0]}: {e.strerror}") from e
        except subprocess.SubprocessError as e:
            raise WorkerDied(f"cannot start {command[0]} in a network namespace of its own "
                             f"with its memory cgroup: {e}") from e
        try:
            inst = cls(p.pid, "cold", "cold", protocol, function, popen=p)
        except OSError as e:
            p.kill()
            p.wait()
            raise WorkerDied(f"{command[0]} (PID {p.pid}) ended before the porter could open "
                             f"its network namespace: {e}") from e
        if os.fstat(inst.ns_fd).st_ino == netns.ns_inode():
            inst.kill()
            inst.close()
            raise WorkerDied(f"{command[0]} did not get a network namespace of its own")
        return inst

    @classmethod
    def restore(cls, protocol: str, function: str, image: str, policy: str, log_fd: int,
                prepared=None, ghosts=None, cgroup: str | None = None,
                lifeline=None) -> "HttpInstance":
        """One cxlfork clone of an HTTP instance's checkpoint: cxlfork gives it a network
        namespace of its own with its listening socket made again there (netns="new"); its
        stdin is /dev/null, stdout and stderr the function's log. Connections the original
        had are reset in the clone (cxlfork.state.inet), so it serves fresh ones only.
        lifeline (cxlfork.porter.lifeline.Lifeline): kills the clone if the porter dies."""
        from cxlfork.porter.instance import restore_clone
        t0 = time.perf_counter()
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            pids = restore_clone(image, policy, (null, log_fd, log_fd), prepared, ghosts, cgroup)
        finally:
            os.close(null)
        if lifeline is not None:
            lifeline.watch(pids[0])
        try:
            inst = cls(pids[0], "restored", policy, protocol, function)
            inst.lifeline = lifeline
        except OSError as e:
            try:
                os.kill(pids[0], signal.SIGKILL)
                if lifeline is not None:
                    lifeline.forget(pids[0])
                os.waitpid(pids[0], 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            raise WorkerDied(f"restored clone PID {pids[0]} ended at once: {e}") from e
        inst.start_ms = (time.perf_counter() - t0) * 1e3
        inst.phases["restore"] = inst.start_ms
        return inst

    def quiesce(self, timeout: float = 1.0) -> None:
        """Before a checkpoint: close the porter's connection and wait (up to timeout) until
        the server has closed its end, so that it waits in accept() holding its listener only
        and the clones start clean."""
        self._drop()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._connections():
            time.sleep(0.005)

    def _connections(self) -> int:
        """TCP connections (established or half-closed by the peer) in its namespace."""
        n = 0
        for name in ("tcp", "tcp6"):
            try:
                with open(f"/proc/{self.pid}/net/{name}") as f:
                    next(f, None)
                    n += sum(line.split()[3] in ("01", "08") for line in f)
            except OSError:
                pass
        return n

    def wait_listening(self, timeout: float) -> None:
        """Connect until the server accepts on 127.0.0.1:8080 in its namespace."""
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            if self.gone():
                raise WorkerDied(f"{self._ended()} before listening on 127.0.0.1:{PORT}")
            conn = _Conn(self.ns_fd, max(0.05, deadline - time.monotonic()))
            try:
                conn.connect()
            except ConnectionRefusedError:
                conn.close()
            except OSError as e:
                conn.close()
                raise WorkerDied(f"connecting to 127.0.0.1:{PORT} in its network namespace: "
                                 f"{e}") from e
            else:
                self.conn = conn
                return
            if time.monotonic() + delay > deadline:
                raise WorkerTimeout(f"did not listen on 127.0.0.1:{PORT} (in its network "
                                    f"namespace) within {timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def initialise(self, init: dict, timeout: float) -> None:
        """Wait until it listens; an OpenWhisk action then gets POST /init {"value": init}."""
        t_end = time.monotonic() + timeout
        self.wait_listening(timeout)
        if self.protocol == "openwhisk":
            left = max(0.001, t_end - time.monotonic())
            st, _, _, body = self._exchange("POST", "/init", [("Content-Type",
                                            "application/json")],
                                            _dumps({"value": init}), left, "init")
            if st != 200:
                raise WorkerDied(f"/init answered {st}: {_error_text(body)}")
        self.start_ms = (time.perf_counter() - self.t_spawn) * 1e3
        self.phases["spawn_init"] = self.start_ms

    # -- talking -------------------------------------------------------------------------
    def _exchange(self, method, path, headers, body, timeout, what):
        """One HTTP request on the kept-alive connection (a new one if there is none, or if
        a reused one turns out closed before any answer byte): (status, reason, headers,
        body). Raises WorkerTimeout, WorkerBadAnswer (not HTTP), WorkerDied."""
        for attempt in (0, 1):
            reused = self.conn is not None
            if self.conn is None:
                self.conn = _Conn(self.ns_fd, timeout)
            conn = self.conn
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            try:
                conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                conn.putheader("Host", f"127.0.0.1:{PORT}")
                for k, v in headers:
                    conn.putheader(k, v)
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                r = conn.getresponse()
                data = r.read(MAX_BODY + 1)
                if len(data) > MAX_BODY:
                    raise WorkerBadAnswer(f"answer to the {what} larger than "
                                          f"{MAX_BODY >> 20} MiB")
                if r.will_close:
                    self._drop()
                return r.status, r.reason, r.getheaders(), data
            except (socket.timeout, TimeoutError) as e:
                self._drop()
                raise WorkerTimeout(f"no answer to the {what} within {timeout:g} s") from e
            except (http.client.RemoteDisconnected, BrokenPipeError,
                    ConnectionResetError) as e:
                self._drop()
                if reused and attempt == 0 and not self.gone():
                    continue                    # a kept-alive connection the server closed
                if self.gone(wait=0.5):
                    raise WorkerDied(self._ended()) from e
                raise WorkerBadAnswer(f"closed the connection during the {what} "
                                      f"({type(e).__name__})") from e
            except ConnectionRefusedError as e:
                self._drop()
                if self.gone(wait=0.5):
                    raise WorkerDied(self._ended()) from e
                raise WorkerBadAnswer(f"stopped listening on 127.0.0.1:{PORT}") from e
            except (http.client.HTTPException, ValueError) as e:
                self._drop()
                raise WorkerBadAnswer(f"answered the {what} with something that is not "
                                      f"HTTP ({type(e).__name__}: {str(e)[:120]})") from e
            except OSError as e:
                self._drop()
                raise WorkerDied(f"connection to 127.0.0.1:{PORT} failed during the {what}: "
                                 f"{e}") from e

    def call(self, payload, timeout: float):
        """One invocation: an OpenWhisk /run (payload = the input JSON; returns the result
        object) or a forwarded HTTP request (payload = HttpRequest; returns HttpResponse)."""
        if self.protocol == "http":
            hdrs = [(k, v) for k, v in payload.headers if k.lower() not in HOP]
            st, reason, rh, body = self._exchange(payload.method, payload.path, hdrs,
                                                  payload.body, timeout, "request")
            return HttpResponse(st, reason, [(k, v) for k, v in rh if k.lower() not in HOP],
                                body)
        msg = {"value": payload, "namespace": "_", "action_name": f"/_/{self.function}",
               "activation_id": uuid.uuid4().hex,
               "deadline": int((time.time() + timeout) * 1000)}
        st, _, _, body = self._exchange("POST", "/run", [("Content-Type", "application/json")],
                                        _dumps(msg), timeout, "/run")
        try:
            out = json.loads(body)
        except ValueError as e:
            raise WorkerBadAnswer(f"answered /run with {st} and a body that is not JSON: "
                                  f"{body[:120]!r}") from e
        if not isinstance(out, dict):
            raise WorkerBadAnswer(f"answered /run with {st} and {body[:120]!r}, not a JSON "
                                  "object")
        if st != 200:
            if "error" not in out:
                raise WorkerBadAnswer(f"answered /run with {st} and no \"error\" field")
            raise WorkerFailed(_error_text(body))
        return out

    # -- liveness and ending -------------------------------------------------------------
    def gone(self, wait: float = 0.0) -> bool:
        """True once the process exited (its pidfd is readable). wait: how long to wait for
        that, after its connection broke (a dying process closes its sockets before its
        exit is reported)."""
        try:
            r, _, _ = select.select([self.pidfd], [], [], wait)
        except (OSError, ValueError):
            return True
        return bool(r)

    def _ended(self) -> str:
        if self.popen is not None:
            st = self.popen.poll()
            if st is not None:
                return (f"exited with status {st}" if st >= 0 else
                        f"was killed by signal {signal.Signals(-st).name}")
        return "exited"

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def kill(self) -> str:
        """SIGKILL its process group (a cold instance leads its own session) and reap."""
        with self.lock:
            if self.state == "dead":
                return self.exit_text
            self.state = "dead"
            for f in (lambda: os.killpg(self.pid, signal.SIGKILL),
                      lambda: signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)):
                try:
                    f()
                except (ProcessLookupError, PermissionError, OSError):
                    pass
            try:
                if self.popen is not None:
                    st = self.popen.wait()
                    self.exit_text = (f"exited with status {st}" if st >= 0 else
                                      f"was killed by signal {signal.Signals(-st).name}")
                else:
                    if self.lifeline is not None:     # before the PID can be reused
                        self.lifeline.forget(self.pid)
                    _, st = os.waitpid(self.pid, 0)
                    self.exit_text = _status_text(st)
            except ChildProcessError:
                self.exit_text = "is gone"
            return self.exit_text

    def close(self) -> None:
        """Close the connection, the namespace fd and the pidfd (after kill): the namespace
        goes with the last of them. Idempotent."""
        with self.lock:
            self._drop()
            for name in ("ns_fd", "pidfd"):
                fd = getattr(self, name)
                if fd >= 0:
                    setattr(self, name, -1)
                    try:
                        os.close(fd)
                    except OSError as e:
                        if e.errno != errno.EBADF:
                            raise


def _dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _error_text(body: bytes) -> str:
    """The "error" of an OpenWhisk error answer, as one line."""
    try:
        e = json.loads(body)
        if isinstance(e, dict) and "error" in e:
            e = e["error"]
        text = e if isinstance(e, str) else json.dumps(e)
    except ValueError:
        text = body[:200].decode("utf-8", "replace") or "(empty body)"
    return " ".join(text.split())

"""The porter's HTTP API (a ThreadingHTTPServer; loopback unless configured otherwise).

    POST   /functions/NAME/invoke   JSON body -> the worker's JSON output (200), with headers
                                    X-Porter-Start (cold|warm|restored), X-Porter-Instance
                                    (PID), X-Porter-Latency-Ms
    GET    /functions               the registered functions and their clone policy
    POST   /functions               register one: {"name": N, "command": [...], ...} (the keys
                                    of a [functions.NAME] table)
    GET    /stats                   JSON: per function latency, starts, instances, memory
    GET    /metrics                 Prometheus text format
    GET    /healthz                 "ok"
    ANY    /functions/NAME/invoke[/PATH][?Q]   a protocol = "http" function: the request as
                                    is (method, /PATH?Q, headers, body) to an instance, its
                                    answer as is (plus the X-Porter-* headers)

Every error is JSON with one line: {"error": "..."}: 400 malformed JSON or config, 404
unknown function or path, 403 caller not allowed ([porter] invoke_uids, allow_register), 405 wrong method,
409 already registered, 411 no body length, 413 body too large,
500 the function's own error, 502 the worker crashed or failed to start (it is replaced),
503 no instance available (busy, memory limit, shutting down), 504 the worker hung past
its timeout (killed, replaced).
"""
from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cxlfork.porter.cgroup import CgroupError
from cxlfork.porter.config import ConfigError, function_from_dict
from cxlfork.porter.peer import peer_uid
from cxlfork.porter.pool import InvokeError, Unavailable

MAX_BODY = 16 << 20


class _Handler(BaseHTTPRequestHandler):
    porter = None                       # set by make_server
    protocol_version = "HTTP/1.1"
    timeout = 120                       # a client that stalls mid-request loses its socket
    server_version = "cxlfork-porter"

    def log_message(self, fmt, *args):  # no per-request stderr noise
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json",
              headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj, separators=(",", ":")).encode() + b"\n",
                   headers=headers)

    def _error(self, status: int, msg: str) -> None:
        self._json(status, {"error": " ".join(str(msg).split())})

    def _body(self):
        """The parsed JSON body, or None after an error answer."""
        n = self.headers.get("Content-Length")
        if n is None:
            self._error(411, "a Content-Length header is required")
            return None
        try:
            n = int(n)
        except ValueError:
            self._error(400, f"bad Content-Length {n!r}")
            return None
        if n < 0:
            self.close_connection = True
            self._error(400, f"bad Content-Length {n} (negative)")
            return None
        if n > MAX_BODY:
            self.close_connection = True
            self._error(413, f"request body larger than {MAX_BODY >> 20} MiB")
            return None
        raw = self.rfile.read(n)
        if len(raw) < n:                     # the client closed mid-body: nobody to answer
            self.close_connection = True
            self.porter.log(f"client {self.client_address[0]}:{self.client_address[1]} closed "
                            f"after {len(raw)} of {n} body bytes; request dropped")
            return None
        try:
            return (json.loads(raw),)
        except ValueError as e:
            self._error(400, f"request body is not valid JSON: {e}")
            return None

    def _peer_uid(self):
        return peer_uid(self.client_address[1], self.server.server_address[1])

    def _may_invoke(self) -> bool:
        """Invoking and listing: the uids in [porter] invoke_uids (root only by default)."""
        allowed = self.porter.cfg.invoke_uids
        if "*" in allowed:
            return True
        uid = self._peer_uid()
        if uid is not None and uid in allowed:
            return True
        who = "a peer not on this host" if uid is None else f"uid {uid}"
        self._error(403, f"{who} may not use this porter (allowed uids: "
                         f"{', '.join(map(str, allowed)) or 'none'}; see [porter] invoke_uids)")
        return False

    def _may_register(self) -> bool:
        """Registering a command: off unless allow_register, and then root callers only, so a
        registered command never runs with more privilege than its registrant."""
        if not self.porter.cfg.allow_register:
            self._error(403, "registering functions over HTTP is off ([porter] "
                             "allow_register = false); add them to the config file")
            return False
        uid = self._peer_uid()
        if uid != 0:
            who = "a peer not on this host" if uid is None else f"uid {uid}"
            self._error(403, f"only root may register functions ({who} asked): a registered "
                             f"command runs with the porter's (root) privileges")
            return False
        return True

    def do_GET(self):
        p = self.porter
        path = self.path.split("?", 1)[0]
        fwd = self._http_function()
        if fwd is not None:
            self._forward(*fwd)
            return
        if path not in ("/healthz", "/metrics") and not self._may_invoke():
            return
        if path == "/stats":
            self._json(200, p.stats())
        elif path == "/metrics":
            self._send(200, p.metrics.text(), "text/plain; version=0.0.4")
        elif path == "/functions":
            self._json(200, {n: {"policy": p.pool(n).policy, "command": p.pool(n).cfg.command,
                                 "protocol": p.pool(n).cfg.protocol}
                             for n in p.names()})
        elif path == "/healthz":
            self._send(200, b"ok\n", "text/plain")
        elif path.startswith("/functions/") and path.endswith("/invoke"):
            self._error(405, "use POST to invoke a function")
        else:
            self._error(404, f"no such path {path}")

    def _http_function(self):
        """(pool, the path below /functions/NAME/invoke with its query) when the request is
        for a protocol = "http" function, else None."""
        path, sep, query = self.path.partition("?")
        parts = path.split("/", 4)                # "", "functions", NAME, "invoke", REST
        if len(parts) < 4 or parts[0] or parts[1] != "functions" or parts[3] != "invoke":
            return None
        pool = self.porter.pool(parts[2])
        if pool is None or pool.cfg.protocol != "http":
            return None
        return pool, "/" + (parts[4] if len(parts) > 4 else "") + sep + query

    def _raw_body(self):
        """The request body as bytes (none without Content-Length), or None after an error."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._error(411, "chunked request bodies are not supported: send a Content-Length")
            return None
        n = self.headers.get("Content-Length", "0")
        try:
            n = int(n)
        except ValueError:
            n = -1
        if n < 0 or n > MAX_BODY:
            self.close_connection = True
            self._error(413 if n > MAX_BODY else 400, f"bad Content-Length {n}")
            return None
        raw = self.rfile.read(n)
        if len(raw) < n:
            self.close_connection = True
            return None
        return raw

    def _forward(self, pool, rest: str) -> None:
        """A protocol = "http" function: the request as is to an instance, its answer back."""
        from cxlfork.porter.http_instance import HttpRequest
        if not self._may_invoke():
            return
        body = self._raw_body()
        if body is None:
            return
        req = HttpRequest(self.command, rest, list(self.headers.items()), body)
        try:
            resp, start, inst, ms = pool.invoke(req)
        except (InvokeError, Unavailable) as e:
            self._error(e.status, str(e))
            return
        except Exception as e:             # noqa: BLE001 - a porter bug: answer, log it
            self.porter.log(f"internal error invoking {pool.name}: {type(e).__name__}: {e}")
            self._error(500, f"internal error: {type(e).__name__}: {e}")
            return
        self.send_response(resp.status, resp.reason)
        for k, v in resp.headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(resp.body)))
        self.send_header("X-Porter-Start", start)
        self.send_header("X-Porter-Instance", str(inst.pid))
        self.send_header("X-Porter-Latency-Ms", f"{ms:.3f}")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(resp.body)

    def do_POST(self):
        p = self.porter
        path = self.path.split("?", 1)[0]
        parts = path.strip("/").split("/")
        fwd = self._http_function()
        if fwd is not None:
            self._forward(*fwd)
            return
        if not self._may_invoke():
            return
        if len(parts) == 3 and parts[0] == "functions" and parts[2] == "invoke":
            pool = p.pool(parts[1])
            if pool is None:
                self._error(404, f"unknown function {parts[1]!r} (registered: "
                                 f"{', '.join(p.names()) or 'none'})")
                return
            body = self._body()
            if body is None:
                return
            try:
                out, start, inst, ms = pool.invoke(body[0])
            except InvokeError as e:
                self._error(e.status, str(e))
                return
            except Unavailable as e:
                self._error(e.status, str(e))
                return
            except Exception as e:             # noqa: BLE001 - a porter bug: answer, log it
                p.log(f"internal error invoking {parts[1]}: {type(e).__name__}: {e}")
                self._error(500, f"internal error: {type(e).__name__}: {e}")
                return
            self._json(200, out, {"X-Porter-Start": start, "X-Porter-Instance": str(inst.pid),
                                  "X-Porter-Latency-Ms": f"{ms:.3f}"})
        elif path == "/functions":
            if not self._may_register():
                return
            body = self._body()
            if body is None:
                return
            d = body[0]
            if not isinstance(d, dict) or not isinstance(d.get("name"), str):
                self._error(400, "body must be an object with a \"name\" and the keys of a "
                                 "[functions.NAME] table")
                return
            name = d.pop("name")
            try:
                fc = function_from_dict(name, d, p.cfg, "request")
            except ConfigError as e:
                self._error(400, str(e))
                return
            if p.pool(name) is not None:
                self._error(409, f"function {name!r} is already registered")
                return
            try:
                p.add_function(fc)
            except ConfigError as e:
                self._error(409, str(e))
                return
            except CgroupError as e:
                self._error(500, str(e))
                return
            self._json(201, {"registered": name, "policy": p.pool(name).policy})
        else:
            self._error(404, f"no such path {path}")

    def do_PUT(self):
        fwd = self._http_function()
        if fwd is not None:
            self._forward(*fwd)
            return
        if self.command == "HEAD":              # an error body would be taken as the next answer
            self.close_connection = True
        self._error(405, f"method {self.command} not allowed on {self.path}")

    do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_PUT


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # The listen backlog: connections the kernel queues before the porter accepts them (a
    # thread each). socketserver's default of 5 reset 96 of a burst of 200; the kernel caps
    # it at net.core.somaxconn (4096 on Linux >= 5.4).
    request_queue_size = 1024
    porter = None

    def handle_error(self, request, client_address):
        """One log line for a connection that broke (a client gone mid-answer), not the
        socketserver's traceback."""
        import sys
        e = sys.exc_info()[1]
        log = self.porter.log if self.porter is not None else print
        log(f"client {client_address[0]}:{client_address[1]}: connection dropped: "
            f"{type(e).__name__}: {e}")


def make_server(porter, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("Handler", (_Handler,), {"porter": porter})
    srv = _Server((host, port), handler)
    srv.porter = porter
    return srv

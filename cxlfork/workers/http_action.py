"""A worker's handler served as an OpenWhisk action: `python -m cxlfork.workers.http_action
MODULE` (e.g. cxlfork.workers.llm) listens on 0.0.0.0:$PORT (8080) with the action interface
of apache/openwhisk docs/actions-new.md, so the same model runs as a porter stdio worker or as
an HTTP function (protocol = "openwhisk"):

    POST /init {"value": {...}}   MODULE.init(value) once (OpenWhisk's own keys name, main,
                                  code, binary are dropped; `env` is set in os.environ);
                                  200 {"ok": true}; a failure 502 {"error": "init: ..."} (a
                                  missing model names its file); a second /init 403
    POST /run  {"value": input, "activation_id", "deadline", ...}
                                  the keys besides value become __OW_<KEY> in os.environ;
                                  200 + MODULE.handle(state, input) (a JSON object), or
                                  502 {"error": "..."} for the handler's error

One thread, one connection at a time (OpenWhisk never overlaps activations), so between
requests the server waits in accept() or in a read of the kept-alive connection.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

OW_KEYS = ("name", "main", "code", "binary")


class _Action(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    worker = None                       # the worker module (init, handle)
    state: dict = {}

    def log_message(self, fmt, *args):
        pass

    def _answer(self, status: int, obj) -> None:
        body = json.dumps(obj, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        try:
            n = int(self.headers.get("Content-Length", "0"))
            msg = json.loads(self.rfile.read(n) or b"{}")
            if not isinstance(msg, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            self._answer(400, {"error": f"request body is not a JSON object: {e}"})
            return
        if self.path == "/init":
            self._init(msg.get("value") or {})
        elif self.path == "/run":
            self._run(msg)
        else:
            self._answer(404, {"error": f"no route {self.path} (/init, /run)"})

    def _init(self, value) -> None:
        if "state" in self.state:
            self._answer(403, {"error": "Cannot initialize the action more than once."})
            return
        if not isinstance(value, dict):
            self._answer(502, {"error": "init: the value must be a JSON object"})
            return
        cfg = {k: v for k, v in value.items() if k not in OW_KEYS and k != "env"}
        os.environ.update({k: str(v) for k, v in (value.get("env") or {}).items()})
        try:
            self.state["state"] = self.worker.init(cfg)
        except Exception as e:          # noqa: BLE001 - the action's init error, one line
            self._answer(502, {"error": " ".join(f"init: {type(e).__name__}: {e}".split())})
            return
        self._answer(200, {"ok": True})

    def _run(self, msg: dict) -> None:
        if "state" not in self.state:
            self._answer(502, {"error": "the action was not initialized (POST /init first)"})
            return
        for k, v in msg.items():
            if k != "value":
                os.environ["__OW_" + k.upper()] = str(v)
        try:
            out = self.worker.handle(self.state["state"], msg.get("value"))
        except Exception as e:          # noqa: BLE001 - the function's own error
            self._answer(502, {"error": " ".join(f"{type(e).__name__}: {e}".split())})
            return
        if not isinstance(out, dict):
            self._answer(502, {"error": "The action did not return a dictionary."})
            return
        self._answer(200, out)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m cxlfork.workers.http_action WORKER_MODULE", file=sys.stderr)
        return 2
    try:
        mod = importlib.import_module(argv[0])
        mod.init, mod.handle
    except (ImportError, AttributeError) as e:
        print(f"http_action: {argv[0]}: not a worker module with init and handle ({e})",
              file=sys.stderr)
        return 1
    handler = type("Action", (_Action,), {"worker": mod, "state": {}})
    HTTPServer(("0.0.0.0", int(os.environ.get("PORT", "8080"))), handler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

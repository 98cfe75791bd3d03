"""A Python action runtime written from the OpenWhisk action interface alone (apache/openwhisk
docs/actions-new.md), with the standard library: an HTTP server on 0.0.0.0:8080.

    POST /init {"value": {"name", "main", "code", "binary", "env"}}
        compiles `code` (plain text; binary actions are refused), looks up `main` (default
        "main"), sets `env`; 200 {"ok": true}; a second /init is 403; a failure 502 {"error"}
    POST /run  {"value": {...}, "namespace", "action_name", "activation_id", "deadline", ...}
        every key but "value" becomes __OW_<KEY> in os.environ for the activation; the
        result of main(value) must be a dict: 200 and it, else 502 {"error": ...}
    the activation's log is framed by the OpenWhisk markers on stdout and stderr

It knows nothing of the porter: the tests use it as an unmodified OpenWhisk-style runtime.
"""
import json
import os
import sys
import traceback
from http.server import BaseHTTPRequestHandler, HTTPServer

START = "XXX_THE_START_OF_A_WHISK_ACTIVATION_XXX"
END = "XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX"
action = {}


class Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def answer(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def payload(self):
        n = int(self.headers.get("Content-Length", "0"))
        return json.loads(self.rfile.read(n) or b"{}")

    def do_POST(self):
        try:
            msg = self.payload()
        except ValueError as e:
            self.answer(400, {"error": f"request is not JSON: {e}"})
            return
        if self.path == "/init":
            self.init(msg.get("value") or {})
        elif self.path == "/run":
            self.run(msg)
        else:
            self.answer(404, {"error": f"no route {self.path}"})

    def init(self, value):
        if action:
            self.answer(403, {"error": "Cannot initialize the action more than once."})
            return
        if value.get("binary"):
            self.answer(502, {"error": "binary actions are not supported by this runtime"})
            return
        code = value.get("code")
        if not code:
            self.answer(502, {"error": "Missing main/no code to execute."})
            return
        scope = {"__name__": "__action__"}
        try:
            exec(compile(code, value.get("name") or "action", "exec"), scope)
        except Exception as e:
            self.answer(502, {"error": f"initialization failed: {type(e).__name__}: {e}"})
            return
        main = scope.get(value.get("main") or "main")
        if not callable(main):
            self.answer(502, {"error": f"the action has no function "
                                       f"{value.get('main') or 'main'!r}"})
            return
        os.environ.update({k: str(v) for k, v in (value.get("env") or {}).items()})
        action["main"] = main
        self.answer(200, {"ok": True})

    def run(self, msg):
        if "main" not in action:
            self.answer(502, {"error": "the action was not initialized"})
            return
        for k, v in msg.items():
            if k != "value":
                os.environ["__OW_" + k.upper()] = str(v)
        print(START, "with id", msg.get("activation_id"), flush=True)
        try:
            result = action["main"](msg.get("value") or {})
        except Exception as e:
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {e}"}
            status = 502
        else:
            status = 200
            if not isinstance(result, dict):
                result, status = {"error": "The action did not return a dictionary."}, 502
        for f in (sys.stdout, sys.stderr):
            print(END, file=f, flush=True)
        self.answer(status, result)


if __name__ == "__main__":
    HTTPServer(("0.0.0.0", 8080), Proxy).serve_forever()

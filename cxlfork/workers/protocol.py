"""The porter's worker protocol, worker side: newline-delimited JSON over stdin/stdout.

    porter -> worker   {"init": {...}}                   once, first line
    worker -> porter   {"ready": true}                   or {"error": "..."} and exit
    porter -> worker   {"id": N, "input": <any JSON>}    one request at a time
    worker -> porter   {"id": N, "output": <any JSON>}   or {"id": N, "error": "..."}

A worker opens no sockets and starts no processes (threads are fine: cxlfork checkpoints them;
the llm worker has llama.cpp's), so cxlfork can checkpoint it while it waits for the next
request line; a restored clone continues in that read.
"""
from __future__ import annotations

import json
import sys


def _send(out, msg: dict) -> None:
    out.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
    out.flush()


def serve(init, handle) -> None:
    """init(config dict) -> state; handle(state, input) -> output (JSON-able). Exceptions in
    handle become {"error": ...} answers; an exception in init ends the worker (status 1)."""
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    first = inp.readline()
    try:
        msg = json.loads(first)
        if not isinstance(msg, dict) or "init" not in msg:
            raise ValueError("the first line must be {\"init\": {...}}")
        state = init(msg["init"] or {})
    except Exception as e:            # noqa: BLE001 - reported to the porter, then exit
        _send(out, {"error": f"init: {type(e).__name__}: {e}"})
        sys.exit(1)
    _send(out, {"ready": True})
    while True:
        line = inp.readline()
        if not line:
            return
        try:
            req = json.loads(line)
            rid = req["id"]
        except (ValueError, KeyError, TypeError):
            _send(out, {"id": None, "error": "request line is not {\"id\": N, \"input\": ...}"})
            continue
        try:
            _send(out, {"id": rid, "output": handle(state, req.get("input"))})
        except Exception as e:        # noqa: BLE001 - the function's own error, per request
            _send(out, {"id": rid, "error": f"{type(e).__name__}: {e}"})

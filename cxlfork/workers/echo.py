"""Echo worker (pure Python): answers {"echo": input, "pid": PID, "n": requests so far}.

For tests of the porter's error paths, an input object may ask it to misbehave:
{"crash": CODE} exits with status CODE mid-request; {"sleep": S} sleeps S seconds first.
init: {"ballast_mib": M} allocates M MiB at init (state clones share).
"""
import os
import time

from cxlfork.workers.protocol import serve


def init(cfg):
    mib = int(cfg.get("ballast_mib", 0))
    return {"n": 0, "ballast": bytearray(b"\x5a" * (mib << 20))}


def handle(state, inp):
    state["n"] += 1
    if isinstance(inp, dict):
        if "crash" in inp:
            os._exit(int(inp["crash"]))
        if "sleep" in inp:
            time.sleep(float(inp["sleep"]))
    return {"echo": inp, "pid": os.getpid(), "n": state["n"]}


if __name__ == "__main__":
    serve(init, handle)

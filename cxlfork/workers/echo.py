"""Echo worker (pure Python): answers {"echo": input, "pid": PID, "n": requests so far}.

For tests of the porter's error paths, an input object may ask it to misbehave:
{"crash": CODE} exits with status CODE mid-request; {"sleep": S} sleeps S seconds first;
{"alloc_mib": M} touches M MiB more for the request (to cross a memory limit).
init: {"ballast_mib": M} allocates M MiB at init (state clones share).
"""
import os
import time

from cxlfork.workers.protocol import serve


def _touched(mib: int) -> bytearray:
    """mib MiB with every page written (no transient copy: the peak is mib MiB)."""
    b = bytearray(mib << 20)
    for i in range(0, len(b), 4096):
        b[i] = 0x5A
    return b


def init(cfg):
    mib = int(cfg.get("ballast_mib", 0))
    return {"n": 0, "ballast": _touched(mib)}


def handle(state, inp):
    state["n"] += 1
    if isinstance(inp, dict):
        if "crash" in inp:
            os._exit(int(inp["crash"]))
        if "sleep" in inp:
            time.sleep(float(inp["sleep"]))
        if "alloc_mib" in inp:
            block = _touched(int(inp["alloc_mib"]))
            return {"allocated_mib": len(block) >> 20, "pid": os.getpid()}
    return {"echo": inp, "pid": os.getpid(), "n": state["n"]}


if __name__ == "__main__":
    serve(init, handle)

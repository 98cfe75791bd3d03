"""The real LLM worker (SmolLM2-135M-Instruct Q4_1 on llama.cpp): it answers a factual
question greedily, a restored cxlfork clone answers token for token like the warm original,
and a missing or corrupt model file is one line naming it at cold start (the porter: 502 with
that line while it keeps serving other functions)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from cxlfork_util import cxlfork, new_store, readline, restore_popen, rmtree

PY = sys.executable
FRANCE = {"prompt": "What is the capital of France?", "max_new_tokens": 16}


def _models_installed() -> str | None:
    try:
        from cxlfork.workers.models import smollm2_gguf
        import llama_cpp  # noqa: F401
        smollm2_gguf()
    except Exception as e:                 # noqa: BLE001 - the reason is the skip message
        return f"{type(e).__name__}: {e} (run `make .stamps/porter-workers`)"
    return None


pytestmark = pytest.mark.skipif(_models_installed() is not None,
                                reason=str(_models_installed()))


class Worker:
    """`python -m cxlfork.workers.MODULE` over the porter's protocol (close_fds: only the two
    pipes, so cxlfork can checkpoint it)."""

    def __init__(self, module: str, init: dict, err=subprocess.DEVNULL):
        self.p = subprocess.Popen([PY, "-m", f"cxlfork.workers.{module}"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                  close_fds=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        self.ready = self._send({"init": init}, timeout=120)
        self.n = 0

    def _send(self, msg, timeout=60.0) -> dict:
        self.p.stdin.write(json.dumps(msg).encode() + b"\n")
        self.p.stdin.flush()
        return json.loads(readline(self.p.stdout, timeout))

    def ask(self, inp) -> dict:
        self.n += 1
        ans = self._send({"id": self.n, "input": inp})
        assert ans.get("id") == self.n and "output" in ans, ans
        return ans["output"]

    def close(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


def test_llm_answers_paris_greedily_and_deterministically():
    w = Worker("llm", {})
    try:
        assert w.ready == {"ready": True}
        a = w.ask(FRANCE)
        assert "Paris" in a["text"], a
        assert a["tokens"] and len(a["tokens"]) <= 16 and a["prompt_tokens"] > 10
        assert a["ttft_ms"] > 0 and a["tokens_per_s"] > 0
        assert w.ask(FRANCE)["tokens"] == a["tokens"]          # greedy: the same again
        # sampling with a seed is reproducible too
        s = {"prompt": "Write one sentence about the sea.", "max_new_tokens": 24,
             "temperature": 1.0, "seed": 5}
        assert w.ask(s)["tokens"] == w.ask(s)["tokens"]
        bad = w._send({"id": 99, "input": {"prompt": "x", "max_new_tokens": 0}})
        assert "max_new_tokens must be 1.." in bad["error"]
    finally:
        w.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cxlfork ptrace)")
@pytest.mark.parametrize("n_threads", [1, 2])
def test_restored_clone_generates_the_same_tokens_as_the_warm_original(n_threads):
    d = tempfile.mkdtemp(prefix="workers-llm-")
    store = new_store()
    w = Worker("llm", {"n_threads": n_threads})
    try:
        ref = w.ask(FRANCE)                                    # warm
        img = os.path.join(d, "llm.img")
        cxlfork("checkpoint", w.p.pid, "-o", img, "--store", store)
        assert w.ask(FRANCE)["tokens"] == ref["tokens"]        # the original lives on
        for policy in ("mow", "moa"):
            c = restore_popen(img, "--policy", policy)
            try:
                c.stdin.write(json.dumps({"id": 7, "input": FRANCE}).encode() + b"\n")
                c.stdin.flush()
                ans = json.loads(readline(c.stdout, 60))
                assert ans["id"] == 7 and ans["output"]["tokens"] == ref["tokens"], (policy,
                                                                                      ans)
                c.stdin.close()                                # EOF: the clone exits
                assert c.wait(timeout=60) == 0, c.stderr.read()
            finally:
                if c.poll() is None:
                    c.kill()
                    c.wait()
    finally:
        w.close()
        cxlfork("rm", os.path.join(d, "llm.img"), check=False)
        rmtree(d)
        shutil.rmtree(store, ignore_errors=True)


def test_missing_and_corrupt_model_file_is_one_line_naming_it(tmp_path):
    missing = str(tmp_path / "no-such.gguf")
    w = Worker("llm", {"model": missing})
    try:
        err = w.ready["error"]
        assert missing in err and "\n" not in err and "No such file" in err, err
        assert w.p.wait(timeout=30) == 1
    finally:
        w.close()
    for name, data in (("text.gguf", b"not a model at all\n" * 100),
                       ("truncated.gguf", None)):
        path = tmp_path / name
        if data is None:                  # the real file's first 1 MiB: header, no tensors
            from cxlfork.workers.models import smollm2_gguf
            with open(smollm2_gguf(), "rb") as f:
                data = f.read(1 << 20)
        path.write_bytes(data)
        w = Worker("llm", {"model": str(path)})
        try:
            err = w.ready["error"]
            assert str(path) in err and "corrupt" in err and "\n" not in err, err
            assert w.p.wait(timeout=30) == 1
        finally:
            w.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the porter's cxlfork)")
def test_porter_answers_502_naming_the_model_and_serves_the_others(tmp_path):
    from test_porter_service import Porter
    missing = str(tmp_path / "gone.gguf")
    p = Porter(str(tmp_path), f"""
[functions.llm]
command = ["python", "-m", "cxlfork.workers.llm"]
init = {{ model = "{missing}" }}
env = {{ PORTER_TEST_TAG = "@TAG@" }}

[functions.echo]
command = ["python", "-m", "cxlfork.workers.echo"]
env = {{ PORTER_TEST_TAG = "@TAG@" }}
""")
    try:
        code, out, _ = p.invoke("llm", FRANCE)
        assert code == 502 and missing in out["error"] and "\n" not in out["error"], out
        code, out, _ = p.invoke("echo", [1])
        assert code == 200 and out["echo"] == [1]
        code, out, _ = p.invoke("llm", FRANCE)               # still 502, still one line
        assert code == 502 and missing in out["error"], out
        assert p.invoke("echo", [2])[0] == 200
    finally:
        rc, err = p.stop()
        shutil.rmtree(p.store, ignore_errors=True)
    assert rc == 0, err

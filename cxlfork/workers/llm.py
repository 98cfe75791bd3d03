"""LLM worker: a small decoder-only transformer (numpy, float32, one BLAS thread).

init:   {"weights": FILE (default: llm_weights.default_path()), "max_new_tokens": 16}
        loads the safetensors file into numpy arrays (anonymous memory: a checkpoint puts them
        in the CXL page store, restored clones share them) and runs one warm-up generation.
input:  {"prompt": "text", "max_new_tokens": N (<= 64), "seed": S (optional: sampling at
        temperature 1; default greedy)}
output: {"tokens": [...], "text": "...", "prompt_tokens": P, "ttft_ms": T, "total_ms": T2}

Byte-level vocabulary (token = byte). The weights are random (see llm_weights): a real forward
pass with a real per-request KV cache (allocated for each request, freed after), not a
trained model.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from cxlfork.workers.protocol import serve


class Model:
    def __init__(self, path: str):
        from safetensors import safe_open
        if not os.path.exists(path):
            raise FileNotFoundError(f"weights file {path} is missing; generate it with "
                                    "'python -m cxlfork.workers.llm_weights'")
        with safe_open(path, framework="np") as f:
            self.cfg = json.loads(f.metadata()["config"])
            self.w = {k: np.array(f.get_tensor(k), dtype=np.float32, copy=True)
                      for k in f.keys()}
        c = self.cfg
        self.L, self.d, self.H, self.ctx = c["layers"], c["d_model"], c["heads"], c["ctx"]
        self.hd = self.d // self.H
        self.bytes = sum(a.nbytes for a in self.w.values())

    @staticmethod
    def _ln(x, g, b):
        m = x.mean(-1, keepdims=True)
        v = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) / np.sqrt(v + 1e-5) * g + b

    def _forward(self, toks: np.ndarray, pos0: int, k_cache, v_cache) -> np.ndarray:
        """Run tokens at positions pos0.. through the model, filling the KV cache; returns
        the logits of the last position."""
        w, T = self.w, len(toks)
        x = w["tok_emb"][toks] + w["pos_emb"][pos0:pos0 + T]
        n = pos0 + T
        mask = np.triu(np.full((T, n), -1e9, np.float32), k=pos0 + 1)
        for i in range(self.L):
            p = f"h{i}."
            h = self._ln(x, w[p + "ln1.g"], w[p + "ln1.b"])
            qkv = h @ w[p + "attn.qkv"] + w[p + "attn.qkv_b"]
            q, k, v = np.split(qkv, 3, axis=-1)
            k_cache[i, pos0:n] = k
            v_cache[i, pos0:n] = v
            q = q.reshape(T, self.H, self.hd).transpose(1, 0, 2)
            K = k_cache[i, :n].reshape(n, self.H, self.hd).transpose(1, 2, 0)
            V = v_cache[i, :n].reshape(n, self.H, self.hd).transpose(1, 0, 2)
            a = (q @ K) / np.float32(np.sqrt(self.hd)) + mask
            a = np.exp(a - a.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            o = (a @ V).transpose(1, 0, 2).reshape(T, self.d)
            x = x + o @ w[p + "attn.o"]
            h = self._ln(x, w[p + "ln2.g"], w[p + "ln2.b"])
            h = h @ w[p + "ff.w1"] + w[p + "ff.b1"]
            h = 0.5 * h * (1 + np.tanh(0.7978846 * (h + 0.044715 * h ** 3)))   # GELU
            x = x + h @ w[p + "ff.w2"]
        x = self._ln(x[-1], w["ln_f.g"], w["ln_f.b"])
        return x @ w["tok_emb"].T

    def generate(self, prompt: bytes, max_new: int, seed=None) -> dict:
        t0 = time.perf_counter()
        toks = np.frombuffer(prompt, np.uint8).astype(np.int64)[-(self.ctx - max_new):]
        if len(toks) == 0:
            toks = np.array([10], np.int64)              # an empty prompt starts from "\n"
        k_cache = np.zeros((self.L, self.ctx, self.d), np.float32)    # private per request
        v_cache = np.zeros((self.L, self.ctx, self.d), np.float32)
        rng = np.random.default_rng(seed) if seed is not None else None
        out, pos, ttft = [], 0, 0.0
        cur = toks
        for step in range(max_new):
            logits = self._forward(cur, pos, k_cache, v_cache)
            pos += len(cur)
            if rng is None:
                nxt = int(np.argmax(logits))
            else:
                pr = np.exp(logits - logits.max())
                nxt = int(rng.choice(len(pr), p=pr / pr.sum()))
            if step == 0:
                ttft = time.perf_counter() - t0
            out.append(nxt)
            cur = np.array([nxt], np.int64)
        return {"tokens": out, "text": bytes(out).decode("utf-8", errors="replace"),
                "prompt_tokens": int(len(toks)), "ttft_ms": round(ttft * 1e3, 3),
                "total_ms": round((time.perf_counter() - t0) * 1e3, 3)}


def init(cfg):
    from cxlfork.workers.llm_weights import default_path
    model = Model(cfg.get("weights") or default_path())
    limit = int(cfg.get("max_new_tokens", 16))
    model.generate(b"warm-up", 2)
    return {"model": model, "max_new": limit}


def handle(state, inp):
    if not isinstance(inp, dict) or not isinstance(inp.get("prompt"), str):
        raise ValueError("input must be {\"prompt\": \"text\", \"max_new_tokens\": N}")
    n = int(inp.get("max_new_tokens", state["max_new"]))
    if not 1 <= n <= 64:
        raise ValueError("max_new_tokens must be 1..64")
    seed = inp.get("seed")
    return state["model"].generate(inp["prompt"].encode(), n,
                                   None if seed is None else int(seed))


if __name__ == "__main__":
    serve(init, handle)

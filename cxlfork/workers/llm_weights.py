"""Deterministic weights for the porter's LLM worker, written to a safetensors file.

The model is a small decoder-only transformer (GPT-2 layout, pre-LayerNorm, tied embeddings)
over a byte vocabulary (256 tokens). The weights are random (seeded normal draws, GPT-2's
initialisation scales): the forward pass and its memory behaviour are real, the text is not
meaningful. Nothing is downloaded.

    python -m cxlfork.workers.llm_weights [--out FILE] [--layers 4] [--d-model 384] ...
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

DEFAULT_DIR = "/var/cache/tiermem/llm"
CONFIG = {"vocab": 256, "layers": 4, "d_model": 384, "heads": 6, "d_ff": 1536, "ctx": 256,
          "seed": 7}


def default_path(cfg: dict = CONFIG) -> str:
    return os.path.join(DEFAULT_DIR, f"tiny-gpt-L{cfg['layers']}-d{cfg['d_model']}-"
                                     f"s{cfg['seed']}.safetensors")


def make(cfg: dict) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(cfg["seed"])
    d, f, L = cfg["d_model"], cfg["d_ff"], cfg["layers"]

    def normal(*shape, std=0.02):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std))

    t = {"tok_emb": normal(cfg["vocab"], d), "pos_emb": normal(cfg["ctx"], d, std=0.01),
         "ln_f.g": np.ones(d, np.float32), "ln_f.b": np.zeros(d, np.float32)}
    proj_std = 0.02 / np.sqrt(2 * L)
    for i in range(L):
        p = f"h{i}."
        t[p + "ln1.g"] = np.ones(d, np.float32)
        t[p + "ln1.b"] = np.zeros(d, np.float32)
        t[p + "attn.qkv"] = normal(d, 3 * d)
        t[p + "attn.qkv_b"] = np.zeros(3 * d, np.float32)
        t[p + "attn.o"] = normal(d, d, std=proj_std)
        t[p + "ln2.g"] = np.ones(d, np.float32)
        t[p + "ln2.b"] = np.zeros(d, np.float32)
        t[p + "ff.w1"] = normal(d, f)
        t[p + "ff.b1"] = np.zeros(f, np.float32)
        t[p + "ff.w2"] = normal(f, d, std=proj_std)
    return t


def generate(path: str | None = None, cfg: dict = CONFIG) -> str:
    """Write the weights file (atomically) unless it is already there; returns its path."""
    from safetensors.numpy import save_file
    path = path or default_path(cfg)
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    save_file(make(cfg), tmp, metadata={"config": json.dumps(cfg), "weights": "random"})
    os.rename(tmp, path)
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help=f"file (default {default_path()})")
    for k in ("layers", "d_model", "heads", "d_ff", "ctx", "seed"):
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=CONFIG[k])
    a = ap.parse_args(argv)
    cfg = dict(CONFIG, **{k: getattr(a, k) for k in ("layers", "d_model", "heads", "d_ff",
                                                      "ctx", "seed")})
    if cfg["d_model"] % cfg["heads"]:
        ap.error("--d-model must be a multiple of --heads")
    p = generate(a.out or default_path(cfg), cfg)
    print(f"{p}: {os.path.getsize(p) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()

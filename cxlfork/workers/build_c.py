"""Build the C worker (wordcount.c) with gcc into a cache directory; prints its path.

    python -m cxlfork.workers.build_c [--out DIR]    (default /var/cache/tiermem/workers)
"""
from __future__ import annotations

import argparse
import os
import subprocess

from tiermem.errors import TiermemError

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DIR = "/var/cache/tiermem/workers"


def build(out_dir: str = DEFAULT_DIR, name: str = "wordcount") -> str:
    """Compile NAME.c unless the binary is newer than the source; returns the binary path."""
    src = os.path.join(HERE, name + ".c")
    out = os.path.join(out_dir, name)
    if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(src):
        return out
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{out}.tmp.{os.getpid()}"
    r = subprocess.run(["gcc", "-O2", "-Wall", "-o", tmp, src], capture_output=True, text=True)
    if r.returncode != 0:
        raise TiermemError(f"gcc failed on {src}: {r.stderr.strip().splitlines()[-1:]}")
    os.rename(tmp, out)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DEFAULT_DIR)
    print(build(ap.parse_args().out))

"""Atomic file writes (temp file in the same directory, then rename), shared by the trace and
record formats (.npz) and the heatmap PNG, so a crash never leaves a half-written file under
the real name."""
from __future__ import annotations

import os
import tempfile

import numpy as np

from tiermem.errors import TiermemError


def write_atomic(path: str, what: str, suffix: str, write) -> None:
    """Call write(f) with a binary file in path's directory, then rename it to path; on any
    error the temporary file is removed and path is left as it was."""
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise TiermemError(f"cannot write {what} {path}: directory {d} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{what}-", suffix=suffix, dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_atomic(path: str, arrays: dict, what: str, compressed: bool = False) -> None:
    """Write arrays to path as .npz; `what` names the file kind in errors ('trace', ...)."""
    write_atomic(path, what, ".npz",
                 lambda f: (np.savez_compressed if compressed else np.savez)(f, **arrays))


def read_meta(z, where: str, fmt: str, version: int, kind: str) -> dict:
    """The JSON `meta` array of an opened .npz, checked for its format name and version."""
    import json
    try:
        meta = json.loads(str(z["meta"]))
    except (ValueError, TypeError) as e:
        raise TiermemError(f"{where}: meta is not JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise TiermemError(f"{where}: meta.format is not {fmt!r}")
    if meta.get("version") != version:
        raise TiermemError(f"{where}: {kind} format version {meta.get('version')!r} "
                           f"not supported (this tiermem reads version {version})")
    return meta

"""Python face of cxlfork's C helpers (cxlfork._native) and the path of the static restorer."""
from __future__ import annotations

import os

from tiermem.errors import TiermemError

try:
    from cxlfork._native import ffi, lib
except ImportError as e:  # pragma: no cover - only when the package was not built
    raise TiermemError(
        "cxlfork's C helpers are not built (cxlfork._native missing): run "
        "'pip install -e .' (needs a C compiler) or 'make setup'") from e

HERE = os.path.dirname(os.path.abspath(__file__))
RESTORER = os.path.join(HERE, "cxlfork-restorer")


def restorer_path() -> str:
    if not os.access(RESTORER, os.X_OK):
        raise TiermemError(f"cxlfork's restorer binary is missing ({RESTORER}): run "
                           "'pip install -e .' (needs gcc) or 'make setup'")
    return RESTORER

"""Tiering policies: one module per policy behind the interface in tiermem.policies.base.

``POLICIES`` maps a policy name to its class. ``make_policy(name, params)`` builds one with
validated parameters; ``load_policy_file(path)`` loads a user's policy from a single .py file
(any Policy subclass defined in it) and registers it under its ``name``.
"""
from __future__ import annotations

import importlib.util
import inspect
import os

from tiermem.errors import TiermemError
from tiermem.policies.base import Policy
from tiermem.policies.damon import Damon
from tiermem.policies.m5 import M5
from tiermem.policies.oracle import Oracle
from tiermem.policies.static import FirstTouch, Interleave, WeightedInterleave
from tiermem.policies.tpp import TPP

POLICIES: dict[str, type[Policy]] = {
    M5.name: M5,
    Damon.name: Damon,
    TPP.name: TPP,
    Oracle.name: Oracle,
    FirstTouch.name: FirstTouch,
    Interleave.name: Interleave,
    WeightedInterleave.name: WeightedInterleave,
}


def make_policy(name: str, params: dict | None = None, where: str | None = None) -> Policy:
    """A policy by registered name with validated parameters (TiermemError naming the key)."""
    cls = POLICIES.get(name)
    if cls is None:
        raise TiermemError(f"unknown policy {name!r} (known: {', '.join(sorted(POLICIES))})")
    return cls(params or {}, where)


def load_policy_file(path: str) -> list[type[Policy]]:
    """Import a single-file user policy and register every Policy subclass it defines."""
    if not os.path.isfile(path):
        raise TiermemError(f"policy file {path}: no such file")
    mod_name = "tiermem_user_policy_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise TiermemError(f"policy file {path}: not a Python file")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # the user's code: report it in one line
        raise TiermemError(f"policy file {path}: {type(e).__name__}: {e}") from e
    found = [c for _, c in inspect.getmembers(mod, inspect.isclass)
             if issubclass(c, Policy) and c.__module__ == mod_name]
    if not found:
        raise TiermemError(f"policy file {path}: defines no subclass of "
                           "tiermem.policies.base.Policy")
    for c in found:
        if not isinstance(getattr(c, "name", None), str) or c.name in ("", "base"):
            raise TiermemError(f"policy file {path}: class {c.__name__} must set a name")
        POLICIES[c.name] = c
    return found

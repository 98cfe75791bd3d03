"""Porter configuration in TOML, validated with messages of the form `file:key: reason`.

    [porter]
    host = "127.0.0.1"            # loopback by default
    port = 8470                   # 0: any free port (printed at start)
    run_dir = ""                  # images and worker logs; "" = a fresh temporary directory
    store = ""                    # cxlfork page store directory; "" = cxlfork's default
    local_memory_limit_mib = 0    # 0 = no limit; else a memory cgroup's limit (enforced by
                                  # the kernel), the pressure signal's 100%, admission limit
    keepalive_s = 60              # idle instances are reclaimed after this (scale to zero)
    pressure_keepalive_s = 2      # ... and after this while pressure >= 0.8
    checkpoint_after = 16         # K: invocations served before the checkpoint
    ghost_pool = 0                # per function: idle pre-spawned restorers (cxlfork ghosts)
    ghost_prefault = false        # warm mow/hybrid ghosts fill their store page tables
    allow_register = false        # POST /functions (root callers only) when true
    invoke_uids = [0]             # local uids that may invoke and list functions; "*" = any
    pool = false                  # checkpoints go to the memory pool shared by several
                                  # hosts, an image registry: a porter on any of them
                                  # restores them (cxlfork/porter/registry.py)

    [functions.NAME]
    command = ["python", "-m", "cxlfork.workers.llm"]   # "python" = the porter's interpreter
    protocol = "stdio"            # stdio (the porter's worker protocol) | openwhisk (an
                                  # action server on 8080: /init, /run) | http (any HTTP
                                  # server on $PORT = 8080, requests forwarded as is); HTTP
                                  # instances each run in a network namespace of their own
    init = {}                     # sent once as {"init": ...} (openwhisk: POST /init {"value": ...})
    policy = "auto"               # auto | mow | moa | moa-eager | hybrid | cold (never checkpoint)
    slo_ms = 1000                 # target p99 for auto
    timeout_s = 30                # per request; past it the instance is killed (504)
    init_timeout_s = 60
    max_instances = 4
    queue_timeout_s = 10          # wait for a free instance before 503
    checkpoint_after = 16         # overrides [porter]
    keepalive_s = 60              # overrides [porter]
    env = {}
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import tomllib

from tiermem.errors import TiermemError

POLICIES = ("auto", "mow", "moa", "moa-eager", "hybrid", "cold")
PROTOCOLS = ("stdio", "openwhisk", "http")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(TiermemError):
    """A bad config value: the message is `file:key: reason`."""


@dataclasses.dataclass
class FunctionConfig:
    name: str
    command: list[str]
    init: dict
    protocol: str = "stdio"
    policy: str = "auto"
    slo_ms: float = 1000.0
    timeout_s: float = 30.0
    init_timeout_s: float = 60.0
    max_instances: int = 4
    queue_timeout_s: float = 10.0
    checkpoint_after: int = 16
    keepalive_s: float = 60.0
    env: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PorterConfig:
    host: str = "127.0.0.1"
    port: int = 8470
    run_dir: str = ""
    store: str = ""
    local_memory_limit_mib: float = 0.0
    keepalive_s: float = 60.0
    pressure_keepalive_s: float = 2.0
    checkpoint_after: int = 16
    ghost_pool: int = 0
    ghost_prefault: bool = False
    allow_register: bool = False
    pool: bool = False
    invoke_uids: list = dataclasses.field(default_factory=lambda: [0])
    functions: dict[str, FunctionConfig] = dataclasses.field(default_factory=dict)


class _Checker:
    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, why: str):
        raise ConfigError(f"{self.source}:{key}: {why}")

    def number(self, d: dict, key: str, path: str, default, lo=None, integer=False):
        v = d.get(key, default)
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if not ok or isinstance(v, bool):
            self.fail(path, f"must be {'an integer' if integer else 'a number'}, got {v!r}")
        if not integer and not math.isfinite(v):
            self.fail(path, f"must be a finite number, got {v!r}")
        if lo is not None and v < lo:
            self.fail(path, f"must be >= {lo}, got {v}")
        return v

    def unknown(self, d: dict, allowed, prefix: str):
        for k in d:
            if k not in allowed:
                self.fail(f"{prefix}{k}", f"unknown key (known: {', '.join(sorted(allowed))})")


def function_from_dict(name: str, d: dict, porter: PorterConfig, source: str) -> FunctionConfig:
    """Validate one function's table (from the config file, or a POST /functions body)."""
    c = _Checker(source)
    p = f"functions.{name}."
    if not NAME_RE.match(name):
        c.fail(f"functions.{name}", "a function name is 1-64 of A-Z a-z 0-9 _ . - "
                                    "starting with a letter or digit")
    if not isinstance(d, dict):
        c.fail(f"functions.{name}", "must be a table")
    fields = {f.name for f in dataclasses.fields(FunctionConfig)} - {"name"}
    c.unknown(d, fields, p)
    cmd = d.get("command")
    if not (isinstance(cmd, list) and cmd and all(isinstance(x, str) and x for x in cmd)):
        c.fail(p + "command", "must be a non-empty list of strings (the worker's argv)")
    cmd = [sys.executable if i == 0 and x == "python" else x for i, x in enumerate(cmd)]
    if "/" in cmd[0] and not os.access(cmd[0], os.X_OK):
        c.fail(p + "command", f"{cmd[0]} is not an executable file")
    protocol = d.get("protocol", "stdio")
    if protocol not in PROTOCOLS:
        c.fail(p + "protocol", f"must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    init = d.get("init", {})
    if not isinstance(init, dict):
        c.fail(p + "init", "must be a table (sent to the worker as {\"init\": ...}, to an "
                           "OpenWhisk action as POST /init {\"value\": ...})")
    if protocol == "http" and "init" in d:
        c.fail(p + "init", 'protocol "http" has no init request (a Knative-style server '
                           'configures itself; use env); use protocol = "openwhisk" for /init')
    policy = d.get("policy", "auto")
    if policy not in POLICIES:
        c.fail(p + "policy", f"must be one of {', '.join(POLICIES)}, got {policy!r}")
    env = d.get("env", {})
    if not (isinstance(env, dict) and all(isinstance(v, str) for v in env.values())):
        c.fail(p + "env", "must be a table of strings")
    return FunctionConfig(
        name=name, command=cmd, init=init, policy=policy, env=env, protocol=protocol,
        slo_ms=c.number(d, "slo_ms", p + "slo_ms", 1000.0, lo=0.001),
        timeout_s=c.number(d, "timeout_s", p + "timeout_s", 30.0, lo=0.001),
        init_timeout_s=c.number(d, "init_timeout_s", p + "init_timeout_s", 60.0, lo=0.001),
        max_instances=c.number(d, "max_instances", p + "max_instances", 4, lo=1, integer=True),
        queue_timeout_s=c.number(d, "queue_timeout_s", p + "queue_timeout_s", 10.0, lo=0),
        checkpoint_after=c.number(d, "checkpoint_after", p + "checkpoint_after",
                                  porter.checkpoint_after, lo=1, integer=True),
        keepalive_s=c.number(d, "keepalive_s", p + "keepalive_s", porter.keepalive_s, lo=0))


def from_dict(d: dict, source: str) -> PorterConfig:
    c = _Checker(source)
    c.unknown(d, {"porter", "functions"}, "")
    pt = d.get("porter", {})
    if not isinstance(pt, dict):
        c.fail("porter", "must be a table")
    fields = {f.name for f in dataclasses.fields(PorterConfig)} - {"functions"}
    c.unknown(pt, fields, "porter.")
    cfg = PorterConfig()
    for k in ("host", "run_dir", "store"):
        v = pt.get(k, getattr(cfg, k))
        if not isinstance(v, str):
            c.fail(f"porter.{k}", f"must be a string, got {v!r}")
        setattr(cfg, k, v)
    cfg.port = c.number(pt, "port", "porter.port", cfg.port, lo=0, integer=True)
    if cfg.port > 65535:
        c.fail("porter.port", f"must be <= 65535, got {cfg.port}")
    cfg.local_memory_limit_mib = c.number(pt, "local_memory_limit_mib",
                                          "porter.local_memory_limit_mib", 0.0, lo=0)
    cfg.keepalive_s = c.number(pt, "keepalive_s", "porter.keepalive_s", cfg.keepalive_s, lo=0)
    cfg.pressure_keepalive_s = c.number(pt, "pressure_keepalive_s",
                                        "porter.pressure_keepalive_s",
                                        cfg.pressure_keepalive_s, lo=0)
    cfg.checkpoint_after = c.number(pt, "checkpoint_after", "porter.checkpoint_after",
                                    cfg.checkpoint_after, lo=1, integer=True)
    cfg.ghost_pool = c.number(pt, "ghost_pool", "porter.ghost_pool", 0, lo=0, integer=True)
    cfg.ghost_prefault = pt.get("ghost_prefault", False)
    if not isinstance(cfg.ghost_prefault, bool):
        c.fail("porter.ghost_prefault", f"must be true or false, got {cfg.ghost_prefault!r}")
    cfg.allow_register = pt.get("allow_register", False)
    if not isinstance(cfg.allow_register, bool):
        c.fail("porter.allow_register", f"must be true or false, got {cfg.allow_register!r}")
    cfg.pool = pt.get("pool", False)
    if not isinstance(cfg.pool, bool):
        c.fail("porter.pool", f"must be true or false, got {cfg.pool!r}")
    uids = pt.get("invoke_uids", [0])
    if not (isinstance(uids, list) and all(
            (isinstance(u, int) and not isinstance(u, bool) and u >= 0) or u == "*"
            for u in uids)):
        c.fail("porter.invoke_uids", f'must be a list of uids (integers >= 0) or "*", got {uids!r}')
    cfg.invoke_uids = uids
    fns = d.get("functions", {})
    if not isinstance(fns, dict):
        c.fail("functions", "must be a table of [functions.NAME] tables")
    for name, fd in fns.items():
        cfg.functions[name] = function_from_dict(name, fd, cfg, source)
    return cfg


def load(path: str) -> PorterConfig:
    try:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}): TOML files are UTF-8") from e
    return from_dict(d, path)

"""tiermemd's TOML config: load, validate every key with 'file:key: reason', defaults.

    [daemon]     interval, socket, state_dir, metrics ("host:port" or ""), rescan_every
    [nodes]      fast = [..], slow = [..]        (default: the kernel's memory tiers)
    [migration]  bandwidth = "200MB/s", batch_pages, mover ("numa" or "dry-run")
    [watermarks] low, min: fast-tier free memory ("256MiB" or "5%" of the fast tier)
    [[targets]]  name, pids | cmdline | cgroup, sampler, policy, policy_file,
                 [targets.sampler_params], [targets.policy_params]

daemon/tiermemd.example.toml documents every key.
"""
from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field

from tiermem.errors import TiermemError
from tiermemd import units

NO_SAMPLER = "none"     # the policy gets empty batches (static policies need no samples)


class ConfigError(TiermemError):
    exit_code = 2


@dataclass
class TargetConfig:
    name: str
    pids: list[int] = field(default_factory=list)
    cmdline: str | None = None
    cgroup: str | None = None
    sampler: str = NO_SAMPLER
    sampler_params: dict = field(default_factory=dict)
    policy: str = "first-touch"
    policy_params: dict = field(default_factory=dict)
    policy_file: str | None = None

    @property
    def cmdline_re(self):
        return re.compile(self.cmdline) if self.cmdline else None


@dataclass
class Config:
    path: str
    interval_s: float = 1.0
    socket: str = "/run/tiermemd.sock"
    state_dir: str = "/run/tiermemd"
    metrics: tuple[str, int] | None = ("127.0.0.1", 9473)
    rescan_every: int = 30
    fast_nodes: list[int] | None = None
    slow_nodes: list[int] | None = None
    bandwidth_bps: float = 256e6
    batch_pages: int = 512
    mover: str = "numa"
    low: tuple[str, float] = ("share", 0.02)
    min: tuple[str, float] = ("share", 0.01)
    kernel_floor: bool = True      # default watermarks: raised to the kernel's (engine)
    targets: list[TargetConfig] = field(default_factory=list)

    def budget_pages(self, page_size: int) -> int:
        return max(1, int(self.bandwidth_bps * self.interval_s) // page_size)


_SECTIONS = {
    "daemon": {"interval", "socket", "state_dir", "metrics", "rescan_every"},
    "nodes": {"fast", "slow"},
    "migration": {"bandwidth", "batch_pages", "mover"},
    "watermarks": {"low", "min"},
    "targets": None,
}
_TARGET_KEYS = {"name", "pids", "cmdline", "cgroup", "sampler", "sampler_params", "policy",
                "policy_params", "policy_file"}


def _known(kind: str, names) -> str:
    return f"(known {kind}: {', '.join(sorted(names))})"


def sampler_registry() -> dict:
    """Sampler classes by name (tiermem.samplers' registry when it has one)."""
    from tiermem import samplers
    reg = getattr(samplers, "REGISTRY", None)
    if reg:
        return dict(reg)
    from tiermem.samplers.damon import DamonSampler
    from tiermem.samplers.ebpf import FaultSampler, MemSampler
    return {c.name: c for c in (DamonSampler, FaultSampler, MemSampler)}


def sampler_names() -> list[str]:
    return sorted(set(sampler_registry()) | {NO_SAMPLER})


def sampler_params(name: str) -> dict[str, type]:
    """The config-settable parameters of a sampler and the type each takes (int, float,
    bool or str), from its constructor's signature."""
    import inspect
    sig = inspect.signature(sampler_registry()[name], eval_str=True)
    out = {}
    for n, p in sig.parameters.items():
        if n in ("self", "force", "attach"):
            continue
        ann = p.annotation
        types = set(getattr(ann, "__args__", (ann,))) - {type(None)}
        out[n] = next((t for t in (bool, int, float, str) if t in types), str)
    return out


# Upper bounds of integer sampler parameters, by the unit their name ends with.
_SAMPLER_MAX = {"_us": int(units.MAX_DURATION_S * 1e6), "_ms": int(units.MAX_DURATION_S * 1e3),
                "_mb": 1 << 30}
_SAMPLER_INT_MAX = 2**32 - 1           # counts (regions, accesses): a kernel unsigned int


def _check_sampler_value(key: str, typ: type, v) -> str | None:
    """Why v is not a valid value of sampler parameter key (None if it is)."""
    if typ is bool:
        return None if isinstance(v, bool) else f"must be true or false, got {v!r}"
    if typ is str:
        return None if isinstance(v, str) else f"must be a string, got {v!r}"
    if typ is int:
        top = next((m for suf, m in _SAMPLER_MAX.items() if key.endswith(suf)),
                   _SAMPLER_INT_MAX)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= top:
            return f"must be an integer 0..{top}, got {v!r}"
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or not 0 <= v <= 1e12:
        return f"must be a finite number 0..1e12, got {v!r}"
    return None


def load(path: str, topology=None, check_files: bool = True) -> Config:
    """Read and validate the config at path. topology (tiermem.topology.Topology) is used to
    check node ids; None reads the running kernel's."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}): TOML files are UTF-8") from None
    return parse(raw, path, topology, check_files)


def parse(raw: dict, path: str = "<config>", topology=None, check_files: bool = True) -> Config:
    def err(key: str, reason: str):
        raise ConfigError(f"{path}:{key}: {reason}")

    for k in raw:
        if k not in _SECTIONS:
            err(k, f"unknown section {_known('sections', _SECTIONS)}")
    for sec, keys in _SECTIONS.items():
        if keys is None or sec not in raw:
            continue
        if not isinstance(raw[sec], dict):
            err(sec, "must be a table")
        for k in raw[sec]:
            if k not in keys:
                err(f"{sec}.{k}", f"unknown key {_known('keys', keys)}")

    cfg = Config(path=os.path.abspath(path))

    def conv(sec, key, fn, attr=None):
        if key in raw.get(sec, {}):
            try:
                setattr(cfg, attr or key, fn(raw[sec][key]))
            except (ValueError, TypeError, OverflowError) as e:
                err(f"{sec}.{key}", str(e))

    d = raw.get("daemon", {})
    conv("daemon", "interval", units.duration, "interval_s")
    for key in ("socket", "state_dir"):
        if key in d:
            if not isinstance(d[key], str) or not d[key].startswith("/"):
                err(f"daemon.{key}", f"must be an absolute path, got {d[key]!r}")
            setattr(cfg, key, d[key])
    if "metrics" in d:
        cfg.metrics = _parse_listen(d["metrics"], lambda r: err("daemon.metrics", r))
    if "rescan_every" in d:
        v = d["rescan_every"]
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 10000:
            err("daemon.rescan_every", f"must be an integer 1..10000 (loops), got {v!r}")
        cfg.rescan_every = v

    conv("migration", "bandwidth", units.rate, "bandwidth_bps")
    m = raw.get("migration", {})
    if "batch_pages" in m:
        v = m["batch_pages"]
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 65536:
            err("migration.batch_pages", f"must be an integer 1..65536 (pages), got {v!r}")
        cfg.batch_pages = v
    if "mover" in m:
        from tiermem.movers import MOVERS
        if m["mover"] not in MOVERS:
            err("migration.mover", f"unknown mover {m['mover']!r} {_known('movers', MOVERS)}")
        cfg.mover = m["mover"]

    conv("watermarks", "low", units.size_or_share)
    conv("watermarks", "min", units.size_or_share)
    if raw.get("watermarks"):     # set by the user: taken as given, not raised
        cfg.kernel_floor = False
    if cfg.low[0] == cfg.min[0] and cfg.min[1] > cfg.low[1]:
        err("watermarks.min", "must not be above watermarks.low")

    _nodes(raw.get("nodes", {}), cfg, topology, err)

    tl = raw.get("targets", [])
    if not isinstance(tl, list) or not all(isinstance(t, dict) for t in tl):
        err("targets", "must be an array of tables ([[targets]])")
    if not tl:
        err("targets", "no targets: add at least one [[targets]] table")
    names = set()
    for i, t in enumerate(tl):
        tc = _target(t, f"targets[{i}]", err, path, check_files)
        if tc.name in names:
            err(f"targets[{i}].name", f"duplicate target name {tc.name!r}")
        names.add(tc.name)
        cfg.targets.append(tc)
    return cfg


def _parse_listen(v, fail):
    if v == "" or v is False:
        return None
    if not isinstance(v, str) or ":" not in v:
        fail(f"expected \"host:port\" (e.g. \"127.0.0.1:9473\") or \"\" to disable, got {v!r}")
    host, _, port = v.rpartition(":")
    host = host.strip("[]")
    try:
        p = int(port)
    except ValueError:
        fail(f"port must be an integer, got {port!r}")
    if not 0 < p < 65536:
        fail(f"port must be 1..65535, got {p}")
    if not host:
        fail("empty host: write 127.0.0.1 (loopback) or the address to bind")
    return host, p


def _nodes(n: dict, cfg: Config, topology, err) -> None:
    if not n:
        return
    if topology is None:
        from tiermem.topology import read_topology
        topology = read_topology()
    for key in ("fast", "slow"):
        if key not in n:
            continue
        v = n[key]
        if not isinstance(v, list) or not v or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in v):
            err(f"nodes.{key}", f"must be a non-empty list of node ids, got {v!r}")
        for x in v:
            if x not in topology.nodes:
                err(f"nodes.{key}", f"unknown node {x} (this host has nodes "
                                    f"{', '.join(map(str, sorted(topology.nodes)))})")
            if not topology.nodes[x].has_memory:
                err(f"nodes.{key}", f"node {x} has no memory")
        setattr(cfg, f"{key}_nodes", sorted(v))
    if cfg.fast_nodes and cfg.slow_nodes and set(cfg.fast_nodes) & set(cfg.slow_nodes):
        err("nodes.slow", f"node(s) {sorted(set(cfg.fast_nodes) & set(cfg.slow_nodes))} are "
                          "also in nodes.fast")


def _target(t: dict, where: str, err, path: str, check_files: bool) -> TargetConfig:
    for k in t:
        if k not in _TARGET_KEYS:
            err(f"{where}.{k}", f"unknown key {_known('keys', _TARGET_KEYS)}")
    name = t.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name or ""):
        err(f"{where}.name", f"required: 1-64 letters, digits, '_', '.', '-', got {name!r}")
    tc = TargetConfig(name=name)
    if "pids" in t:
        v = t["pids"]
        if not isinstance(v, list) or not all(isinstance(p, int) and not isinstance(p, bool)
                                              and p > 0 for p in v):
            err(f"{where}.pids", f"must be a list of positive integers, got {v!r}")
        tc.pids = list(v)
        if check_files:
            import psutil
            for pid in tc.pids:
                if not psutil.pid_exists(pid):
                    err(f"{where}.pids", f"no process with PID {pid}")
    if "cmdline" in t:
        v = t["cmdline"]
        if not isinstance(v, str) or not v:
            err(f"{where}.cmdline", "must be a non-empty regular expression string")
        try:
            re.compile(v)
        except re.error as e:
            err(f"{where}.cmdline", f"bad regular expression: {e}")
        tc.cmdline = v
    if "cgroup" in t:
        v = t["cgroup"]
        if not isinstance(v, str) or not v.startswith("/"):
            err(f"{where}.cgroup", f"must be an absolute cgroup v2 path, got {v!r}")
        if check_files and not os.path.isfile(os.path.join(v, "cgroup.procs")):
            err(f"{where}.cgroup", f"{v} is not a cgroup v2 directory (no cgroup.procs)")
        tc.cgroup = v
    if not (tc.pids or tc.cmdline or tc.cgroup):
        err(where, "no processes selected: set pids, cmdline or cgroup")

    for key in ("sampler_params", "policy_params"):
        if key in t:
            if not isinstance(t[key], dict):
                err(f"{where}.{key}", "must be a table")
            setattr(tc, key, dict(t[key]))

    if "policy_file" in t:
        v = t["policy_file"]
        if not isinstance(v, str):
            err(f"{where}.policy_file", "must be a path string")
        v = os.path.join(os.path.dirname(os.path.abspath(path)), v)
        from tiermem.policies import load_policy_file
        try:
            load_policy_file(v)
        except TiermemError as e:
            err(f"{where}.policy_file", str(e))
        tc.policy_file = v

    from tiermem.policies import POLICIES
    pol = t.get("policy", tc.policy)
    if pol not in POLICIES:
        err(f"{where}.policy", f"unknown policy {pol!r} {_known('policies', POLICIES)}")
    if POLICIES[pol].needs_future:
        err(f"{where}.policy", f"policy {pol!r} needs the future access trace: simulator only")
    tc.policy = pol
    try:
        POLICIES[pol].validate_params(tc.policy_params, f"{where}.policy_params")
    except TiermemError as e:
        raise ConfigError(f"{path}:{e}") from None

    smp = t.get("sampler", tc.sampler)
    known = sampler_names()
    if smp not in known:
        err(f"{where}.sampler", f"unknown sampler {smp!r} {_known('samplers', known)}")
    tc.sampler = smp
    if smp == NO_SAMPLER and tc.sampler_params:
        err(f"{where}.sampler_params", "sampler 'none' takes no parameters")
    elif smp != NO_SAMPLER:
        params = sampler_params(smp)
        for k in tc.sampler_params:
            if k not in params:
                err(f"{where}.sampler_params.{k}",
                    f"unknown parameter for sampler {smp} {_known('parameters', params)}")
            reason = _check_sampler_value(k, params[k], tc.sampler_params[k])
            if reason:
                err(f"{where}.sampler_params.{k}", reason)
        try:
            sampler_registry()[smp](**tc.sampler_params)     # constructors check values only
        except (TiermemError, TypeError, ValueError) as e:
            err(f"{where}.sampler_params", str(e))
    return tc

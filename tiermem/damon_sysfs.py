"""DAMON through its sysfs interface (/sys/kernel/mm/damon/admin): feature detection, one
kdamond of our own (start, snapshot its regions, stop), and detection of kdamonds left by
others or by a crashed earlier tiermem run.

Ownership policy. The sysfs interface cannot add a kdamond while any kdamond is running
(writing nr_kdamonds then fails with EBUSY), and it has no owner field. tiermem therefore
writes /run/tiermem/damon.json (kdamond index, kdamond pid, owner pid) when it starts one.
On start:
  * a running kdamond recorded there whose owner process is dead is *stale* (a crashed run);
  * any other running kdamond belongs to someone else (a DAMON module, damo, the platform).
Both make start refuse with one line naming the kdamond, unless force=True, which turns the
running kdamonds off and takes the interface over. On stop tiermem turns its kdamond off and
writes nr_kdamonds back to the count it found (0 when it created the first one).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import psutil

from tiermem import kfs
from tiermem.errors import TiermemError
from tiermem.procmaps import pid_alive

ADMIN = "/sys/kernel/mm/damon/admin"
KDAMONDS = ADMIN + "/kdamonds"
STATE_FILE = "/run/tiermem/damon.json"

# Sampling/aggregation limits tiermem accepts (the kernel accepts more; these keep kdamond
# from spinning and results meaningful). Microseconds.
MIN_SAMPLE_US = 100
MAX_SAMPLE_US = 10_000_000
MAX_AGGR_US = 60_000_000


@dataclass(frozen=True)
class Feature:
    name: str
    since: str          # first mainline kernel with it
    what: str


# Each feature, the mainline kernel that first had it, and what it is. Detection is by the
# files the sysfs interface shows (see detect_features).
FEATURES = [
    Feature("sysfs", "5.18", "the sysfs interface /sys/kernel/mm/damon/admin"),
    Feature("vaddr", "5.15", "virtual address spaces of processes (operations 'vaddr')"),
    Feature("paddr", "5.16", "the physical address space (operations 'paddr')"),
    Feature("fvaddr", "5.19", "fixed virtual address ranges (operations 'fvaddr')"),
    Feature("schemes", "5.16", "DAMOS: actions on regions by access pattern"),
    Feature("tried_regions", "6.2", "per-scheme snapshot of monitored regions "
            "('update_schemes_tried_regions')"),
    Feature("filters", "6.3", "DAMOS filters (schemes/N/filters)"),
    Feature("damos_before_apply", "6.6", "tracepoint damon:damos_before_apply"),
    Feature("apply_interval", "6.7", "per-scheme apply_interval_us"),
    Feature("quota_goals", "6.8", "DAMOS quota auto-tuning goals (quotas/goals)"),
    Feature("effective_quota", "6.9", "quotas/effective_bytes"),
    Feature("migrate_hot_cold", "6.11", "DAMOS actions migrate_hot / migrate_cold with "
            "target_nid"),
    Feature("intervals_goal", "6.15", "sampling/aggregation interval auto-tuning "
            "(monitoring_attrs/intervals/intervals_goal)"),
    Feature("core_ops_filters", "6.15", "DAMOS core_filters / ops_filters"),
    Feature("refresh_ms", "6.17", "periodic automatic refresh of sysfs results "
            "(kdamonds/N/refresh_ms)"),
    Feature("migration_dests", "6.17", "DAMOS multiple migration destinations (dests)"),
    Feature("addr_unit", "6.18", "address unit for paddr beyond 4 GiB on 32-bit "
            "(contexts/N/addr_unit)"),
    Feature("damon_aggregated", "5.15", "tracepoint damon:damon_aggregated (results per "
            "aggregation interval)"),
]
FEATURE_BY_NAME = {f.name: f for f in FEATURES}

# feature -> file under contexts/0 (ctx/...), schemes/0 (sch/...), or kdamonds/0 (kd/...)
_PROBE_FILES = {
    "schemes": "ctx/schemes",
    "tried_regions": "sch/tried_regions",
    "filters": "sch/filters",
    "apply_interval": "sch/apply_interval_us",
    "quota_goals": "sch/quotas/goals",
    "effective_quota": "sch/quotas/effective_bytes",
    "migrate_hot_cold": "sch/target_nid",
    "intervals_goal": "ctx/monitoring_attrs/intervals/intervals_goal",
    "core_ops_filters": "sch/ops_filters",
    "refresh_ms": "kd/refresh_ms",
    "migration_dests": "sch/dests",
    "addr_unit": "ctx/addr_unit",
}


def _kd(i: int) -> str:
    return f"{KDAMONDS}/{i}"


def _ctx(i: int) -> str:
    return f"{KDAMONDS}/{i}/contexts/0"


def nr_kdamonds() -> int:
    return kfs.read_int(KDAMONDS + "/nr_kdamonds", 0)


def kdamond_info(i: int) -> dict:
    """State of kdamond i as sysfs shows it (read only)."""
    ctx = _ctx(i)
    info = {"index": i, "state": kfs.read(_kd(i) + "/state", "?"),
            "pid": kfs.read_int(_kd(i) + "/pid", -1),
            "operations": kfs.read(ctx + "/operations", "") if kfs.exists(ctx) else "",
            "nr_targets": kfs.read_int(ctx + "/targets/nr_targets", 0) if kfs.exists(ctx) else 0}
    return info


def running_kdamonds() -> list[dict]:
    return [k for k in (kdamond_info(i) for i in range(nr_kdamonds())) if k["state"] == "on"]


def detect_features(tracefs: bool = True) -> list[dict]:
    """Every DAMON feature with the kernel it appeared in and whether this kernel has it.

    Probes the sysfs tree. When no kdamond directory exists it creates one for the probe and
    removes it (nr_kdamonds 1 -> 0); it never touches a kdamond that exists, running or not.
    """
    have: dict[str, bool] = {f.name: False for f in FEATURES}
    notes: dict[str, str] = {}
    if not kfs.exists(ADMIN):
        reason = ("no DAMON sysfs interface (/sys/kernel/mm/damon/admin missing: kernel "
                  "without CONFIG_DAMON_SYSFS)")
        return [dict(name=f.name, since=f.since, what=f.what, present=False, note=reason)
                for f in FEATURES]
    have["sysfs"] = True
    n = nr_kdamonds()
    undo: list[tuple[str, int]] = []     # (file, value to write back), in reverse order
    try:
        if n == 0:
            kfs.write(KDAMONDS + "/nr_kdamonds", 1)
            undo.append((KDAMONDS + "/nr_kdamonds", 0))
        # An idle kdamond with no context/scheme (e.g. left by a takeover) is an empty shell:
        # adding a context and a scheme to probe, then removing them, loses nothing.
        if kfs.read(_kd(0) + "/state", "off") != "on":
            if kfs.read_int(_kd(0) + "/contexts/nr_contexts", 0) == 0:
                kfs.write(_kd(0) + "/contexts/nr_contexts", 1)
                undo.append((_kd(0) + "/contexts/nr_contexts", 0))
            if kfs.read_int(_ctx(0) + "/schemes/nr_schemes", 0) == 0:
                kfs.write(_ctx(0) + "/schemes/nr_schemes", 1)
                undo.append((_ctx(0) + "/schemes/nr_schemes", 0))
        base = {"kd": _kd(0), "ctx": _ctx(0), "sch": _ctx(0) + "/schemes/0"}
        avail = kfs.read(_ctx(0) + "/avail_operations", "").split()
        if not avail:
            notes["vaddr"] = notes["paddr"] = notes["fvaddr"] = \
                "avail_operations missing or context not set up: unknown"
        for ops in ("vaddr", "paddr", "fvaddr"):
            have[ops] = ops in avail
        sch_exists = kfs.exists(base["sch"])
        for name, rel in _PROBE_FILES.items():
            top, _, sub = rel.partition("/")
            if top == "sch" and not sch_exists:
                notes[name] = "kdamond 0 has no scheme to probe (not created by tiermem)"
                continue
            have[name] = kfs.exists(base[top] + "/" + sub)
    finally:
        for f, v in reversed(undo):
            kfs.write(f, v)
    if tracefs:
        try:
            kfs.ensure_tracefs()
            have["damon_aggregated"] = kfs.exists(kfs.TRACEFS + "/events/damon/damon_aggregated")
            have["damos_before_apply"] = kfs.exists(
                kfs.TRACEFS + "/events/damon/damos_before_apply")
        except TiermemError as e:
            notes["damon_aggregated"] = notes["damos_before_apply"] = str(e)
    else:
        notes["damon_aggregated"] = notes["damos_before_apply"] = "tracefs not probed"
    out = []
    for f in FEATURES:
        note = notes.get(f.name, "")
        if not have[f.name] and not note:
            since = tuple(int(x) for x in f.since.split("."))
            if kfs.kernel_version() >= since:
                note = (f"not built into this kernel ({os.uname().release}; mainline has it "
                        f"since {f.since}: its config option is off)")
            else:
                note = f"missing: appeared in Linux {f.since}, this kernel is {os.uname().release}"
        out.append(dict(name=f.name, since=f.since, what=f.what, present=have[f.name],
                        note=note))
    return out


def has_operations(ops: str) -> bool:
    return any(f["name"] == ops and f["present"] for f in detect_features(tracefs=False))


# --- ownership bookkeeping ------------------------------------------------------------------

def _read_state() -> dict | None:
    try:
        with open(kfs.path(STATE_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_state(d: dict | None) -> None:
    p = kfs.path(STATE_FILE)
    if d is None:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
        return
    os.makedirs(os.path.dirname(p), exist_ok=True)
    tmp = p + f".{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(d, f)
    os.replace(tmp, p)


def describe_running(k: dict, st: dict | None) -> str:
    mine = st is not None and st.get("index") == k["index"] and st.get("kdamond_pid") == k["pid"]
    if mine and not pid_alive(int(st.get("owner_pid", -1))):
        who = f"stale: left by tiermem pid {st.get('owner_pid')} which is gone"
    elif mine:
        who = f"owned by running tiermem pid {st.get('owner_pid')}"
    else:
        who = "not started by tiermem"
    return (f"kdamond {k['index']} (pid {k['pid']}, operations {k['operations'] or '?'}, "
            f"{who})")


def check_free(force: bool = False) -> bool:
    """Refuse (or with force, turn off) running kdamonds, see the module docstring.
    True when kdamonds were taken over."""
    running = running_kdamonds()
    if not running:
        return False
    st = _read_state()
    desc = "; ".join(describe_running(k, st) for k in running)
    if not force:
        raise TiermemError(
            f"DAMON is busy: {desc}. The sysfs interface cannot add a kdamond while another "
            "runs; stop it, or pass --force to turn it off and take DAMON over")
    for k in running:
        turn_off(k["index"])
    _wait_off([k["index"] for k in running])
    if st is not None:
        _write_state(None)
    # Taken over: their configuration goes when nr_kdamonds is rewritten (the kernel
    # rebuilds every kdamond directory), so on stop none of them is put back.
    return True


def turn_off(index: int) -> None:
    """Turn kdamond `index` off. A kdamond stops by itself when all its vaddr targets exit,
    and then the kernel answers EPERM to 'off': that race counts as success."""
    kd = _kd(index)
    if kfs.read(kd + "/state", "off") != "on":
        return
    try:
        kfs.write(kd + "/state", "off")
    except TiermemError:
        if kfs.read(kd + "/state", "off") == "on":
            raise


def _wait_off(indices, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(kfs.read(_kd(i) + "/state", "off") == "off" for i in indices):
            return
        time.sleep(0.02)
    raise TiermemError(f"kdamond(s) {list(indices)} did not turn off within {timeout:.0f} s")


# --- one kdamond of ours -------------------------------------------------------------------

@dataclass
class DamonConfig:
    ops: str                          # 'vaddr' or 'paddr'
    pids: list[int] = field(default_factory=list)             # vaddr targets
    ranges: list[tuple[int, int]] = field(default_factory=list)  # paddr ranges [start, end)
    sample_us: int = 5_000
    aggr_us: int = 100_000
    update_us: int = 1_000_000
    min_nr_regions: int = 10
    max_nr_regions: int = 1000
    stat_scheme: bool = True          # a 'stat' scheme, for tried-regions snapshots

    def validate(self) -> None:
        if self.ops not in ("vaddr", "paddr"):
            raise TiermemError(f"DAMON operations must be vaddr or paddr, not {self.ops!r}")
        if not MIN_SAMPLE_US <= self.sample_us <= MAX_SAMPLE_US:
            raise TiermemError(f"DAMON sampling interval {self.sample_us} us out of range "
                               f"{MIN_SAMPLE_US}..{MAX_SAMPLE_US} us")
        if not self.sample_us <= self.aggr_us <= MAX_AGGR_US:
            raise TiermemError(f"DAMON aggregation interval {self.aggr_us} us out of range "
                               f"(sampling interval {self.sample_us} us .. {MAX_AGGR_US} us)")
        if self.update_us < self.aggr_us:
            raise TiermemError(f"DAMON update interval {self.update_us} us is shorter than the "
                               f"aggregation interval {self.aggr_us} us")
        if not 3 <= self.min_nr_regions <= self.max_nr_regions:
            raise TiermemError(f"DAMON regions: need 3 <= min ({self.min_nr_regions}) <= max "
                               f"({self.max_nr_regions})")
        if self.ops == "vaddr" and not self.pids:
            raise TiermemError("DAMON vaddr needs at least one target pid")
        if self.ops == "paddr" and not self.ranges:
            raise TiermemError("DAMON paddr needs at least one physical address range")
        for s, e in self.ranges:
            if not 0 <= s < e:
                raise TiermemError(f"bad physical range {s:#x}-{e:#x}")


class Kdamond:
    """One kdamond of tiermem's with one context: monitoring, plus (cfg.stat_scheme) a
    'stat' scheme whose tried_regions snapshot gives the monitoring results."""

    def __init__(self, cfg: DamonConfig, force: bool = False):
        cfg.validate()
        self.cfg = cfg
        self.force = force
        self.index: int | None = None
        self.prev_nr = 0
        self.pid = -1

    # setup
    def start(self) -> None:
        if not kfs.exists(ADMIN):
            raise TiermemError("DAMON sysfs interface not available: "
                               "/sys/kernel/mm/damon/admin missing (CONFIG_DAMON_SYSFS)")
        feats = {f["name"]: f for f in detect_features(tracefs=False)}
        if not feats[self.cfg.ops]["present"]:
            raise TiermemError(f"DAMON operations '{self.cfg.ops}' not available on this "
                               f"kernel ({os.uname().release}); it has: "
                               + (", ".join(o for o in ("vaddr", "paddr", "fvaddr")
                                            if feats[o]["present"]) or "none"))
        for p in self.cfg.pids:
            if not os.path.exists(f"/proc/{p}"):
                raise TiermemError(f"no process with pid {p}")
        took_over = check_free(self.force)
        self.prev_nr = 0 if took_over else nr_kdamonds()
        self.index = nr_kdamonds() if not took_over else 0
        kfs.write(KDAMONDS + "/nr_kdamonds", self.index + 1)
        try:
            self._configure()
            if self.cfg.stat_scheme and not kfs.exists(
                    _ctx(self.index) + "/schemes/0/tried_regions"):
                raise TiermemError("DAMON tried_regions (Linux 6.2) missing on this kernel: "
                                   "cannot read monitoring results")
            kfs.write(_kd(self.index) + "/state", "on")
            self.pid = self._wait_pid()
            _write_state({"index": self.index, "kdamond_pid": self.pid,
                          "owner_pid": os.getpid(), "started": time.time()})
        except BaseException:
            self.stop()
            raise

    def _wait_pid(self, timeout: float = 2.0) -> int:
        """The kdamond thread's pid, checked against /proc/PID/comm ('kdamond.N'): its CPU
        time and the tracepoint filter both use it, and a wrong one would read as a kdamond
        that does nothing."""
        deadline = time.monotonic() + timeout
        while True:
            pid = kfs.read_int(_kd(self.index) + "/pid", -1)
            if pid > 0 and kfs.read(f"/proc/{pid}/comm", "").startswith("kdamond"):
                return pid
            if kfs.read(_kd(self.index) + "/state", "off") != "on":
                raise TiermemError(f"kdamond {self.index} stopped right after it was turned "
                                   "on (its target exited?)")
            if time.monotonic() > deadline:
                raise TiermemError(f"kdamond {self.index} is on but its pid file says {pid}, "
                                   "which is not a kdamond thread")
            time.sleep(0.01)

    def _configure(self) -> None:
        kd, ctx = _kd(self.index), _ctx(self.index)
        c = self.cfg
        kfs.write(kd + "/contexts/nr_contexts", 1)
        kfs.write(ctx + "/operations", c.ops)
        ma = ctx + "/monitoring_attrs"
        kfs.write(ma + "/intervals/sample_us", c.sample_us)
        kfs.write(ma + "/intervals/aggr_us", c.aggr_us)
        kfs.write(ma + "/intervals/update_us", c.update_us)
        kfs.write(ma + "/nr_regions/min", c.min_nr_regions)
        kfs.write(ma + "/nr_regions/max", c.max_nr_regions)
        if c.ops == "vaddr":
            kfs.write(ctx + "/targets/nr_targets", len(c.pids))
            for i, p in enumerate(c.pids):
                kfs.write(f"{ctx}/targets/{i}/pid_target", p)
        else:
            kfs.write(ctx + "/targets/nr_targets", 1)
            t = ctx + "/targets/0"
            kfs.write(t + "/regions/nr_regions", len(c.ranges))
            for i, (s, e) in enumerate(c.ranges):
                kfs.write(f"{t}/regions/{i}/start", s)
                kfs.write(f"{t}/regions/{i}/end", e)
        if not c.stat_scheme:
            return
        # One 'stat' scheme matching every region: its tried_regions are the results.
        kfs.write(ctx + "/schemes/nr_schemes", 1)
        s = ctx + "/schemes/0"
        kfs.write(s + "/action", "stat")
        ap = s + "/access_pattern"
        kfs.write(ap + "/sz/min", 0)
        kfs.write(ap + "/sz/max", (1 << 64) - 1)
        kfs.write(ap + "/nr_accesses/min", 0)
        kfs.write(ap + "/nr_accesses/max", (1 << 32) - 1)
        kfs.write(ap + "/age/min", 0)
        kfs.write(ap + "/age/max", (1 << 32) - 1)

    @property
    def running(self) -> bool:
        return self.index is not None and kfs.read(_kd(self.index) + "/state", "off") == "on"

    def snapshot(self) -> dict[str, np.ndarray]:
        """The monitored regions now: arrays start, end, nr_accesses, age (all targets; the
        snapshot does not say which target a region belongs to).

        nr_accesses counts sampling intervals with an access during the last aggregation
        interval (0 .. aggr_us / sample_us)."""
        if self.index is None:
            raise TiermemError("kdamond not started")
        if not self.cfg.stat_scheme:
            raise TiermemError("this kdamond has no 'stat' scheme: no tried-regions snapshots")
        kd = _kd(self.index)
        if kfs.read(kd + "/state", "off") != "on":
            raise TiermemError(f"kdamond {self.index} stopped (its target exited?)")
        try:
            kfs.write(kd + "/state", "update_schemes_tried_regions")
        except TiermemError:
            if kfs.read(kd + "/state", "off") != "on":
                raise TiermemError(f"kdamond {self.index} stopped (its target exited?)")
            raise
        tr = _ctx(self.index) + "/schemes/0/tried_regions"
        names = [d for d in kfs.listdir(tr) if d.isdigit()]
        names.sort(key=int)
        n = len(names)
        out = {k: np.empty(n, np.uint64) for k in ("start", "end")}
        out.update({k: np.empty(n, np.uint32) for k in ("nr_accesses", "age")})
        for j, d in enumerate(names):
            base = f"{tr}/{d}/"
            out["start"][j] = int(kfs.read(base + "start"))
            out["end"][j] = int(kfs.read(base + "end"))
            out["nr_accesses"][j] = int(kfs.read(base + "nr_accesses"))
            out["age"][j] = int(kfs.read(base + "age"))
        return out

    def cpu_seconds(self) -> float:
        """CPU time the kdamond thread used so far (utime+stime from /proc/PID/stat)."""
        if self.pid <= 0:
            return 0.0
        return thread_cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.index is None:
            return
        turn_off(self.index)
        _wait_off([self.index])
        # Back to the count we found; fails only if someone else started one meanwhile.
        try:
            kfs.write(KDAMONDS + "/nr_kdamonds", self.prev_nr)
        finally:
            st = _read_state()
            if st and st.get("owner_pid") == os.getpid():
                _write_state(None)
            self.index = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


def thread_cpu_seconds(pid: int) -> float:
    """utime+stime of a task, seconds (0 when it is gone)."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system


def node_phys_range(nid: int) -> tuple[int, int]:
    """[start, end) of the physical memory of NUMA node nid, from its memory blocks (the
    span; holes inside it are skipped by DAMON paddr as non-RAM)."""
    node = f"/sys/devices/system/node/node{nid}"
    if not kfs.exists(node):
        raise TiermemError(f"NUMA node {nid} does not exist")
    blocks = [int(d[6:]) for d in kfs.listdir(node) if d.startswith("memory") and d[6:].isdigit()]
    if not blocks:
        raise TiermemError(f"NUMA node {nid} has no memory blocks in sysfs")
    bs = int(kfs.read("/sys/devices/system/memory/block_size_bytes"), 16)
    return min(blocks) * bs, (max(blocks) + 1) * bs

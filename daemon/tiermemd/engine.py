"""The daemon's loop: for every target process, sampler -> policy -> mover, each interval.

    discover processes -> (re)start samplers -> read batches -> policy.observe
    -> placement (scan or incremental) -> capacity from watermarks -> policy.plan
    -> demote, then promote, with the mover -> update placement and counters

Failures are contained: a process that exits, execs or is forked, a sampler that fails to
start or read, a policy that raises or breaks its contract, a full fast tier: each gives one
log line and the other targets keep being served. Pages are only ever moved with move_pages,
which copies the page and remaps it atomically, so no page is lost or corrupted.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from tiermem import native
from tiermem.access import PAGE_SHIFT, AccessBatch
from tiermem.errors import TiermemError
from tiermem.movers import TargetGone, make_mover
from tiermem.policies import POLICIES
from tiermem.policies.base import FAST, SLOW, Budget, Capacity, MigrationPlan, Placement
from tiermem.samplers.base import Target
from tiermem.samplers.ebpf import MAX_PIDS as EBPF_MAX_PIDS
from tiermemd import discovery, tracking
from tiermemd.config import NO_SAMPLER, Config, TargetConfig, sampler_registry
from tiermemd.metrics import Stats

PAGE = native.PAGE_SIZE
SAMPLER_RETRY_S = 30.0
log = logging.getLogger("tiermemd")


def node_mem_kb(nodes) -> tuple[int, int]:
    """(MemTotal, MemFree) in kB summed over the nodes (from sysfs node meminfo)."""
    from tiermem.topology import _meminfo_kb
    tot = free = 0
    for n in nodes:
        t, f = _meminfo_kb(n)
        tot, free = tot + t, free + f
    return tot, free


@dataclass
class Proc:
    """One process of one target."""
    pid: int
    ident: tuple
    target: str
    policy: object
    policy_name: str
    placement: Placement = field(default_factory=Placement.empty)
    other_pages: int = 0
    since_scan: int = 10**9
    recent: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    last_error: str = ""
    looked_up: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    found_at: float = field(default_factory=time.monotonic)
    firsts: set = field(default_factory=set)

    def first(self, what: str, detail: str) -> None:
        """Logs once per process when it first gets a batch / a non-empty plan / moves, with
        the seconds since it was discovered: where a slow start goes."""
        if what not in self.firsts:
            self.firsts.add(what)
            log.info("target %s: process %d: first %s at +%.2f s (%s)", self.target, self.pid,
                     what, time.monotonic() - self.found_at, detail)


class SamplerGroup:
    """One sampler instance serving every process of the targets that ask for the same
    sampler with the same parameters (DAMON, for one, runs one kdamond at a time)."""

    def __init__(self, name: str, params: dict):
        self.name, self.params = name, params
        self.sampler = None
        self.pids: frozenset[int] = frozenset()
        self.retry_at = 0.0
        self.error = ""
        self.cpu_before = 0.0      # CPU of stopped instances

    def cpu(self) -> float:
        return self.cpu_before + (self.sampler.cpu_seconds() if self.sampler else 0.0)

    def stop(self) -> None:
        if self.sampler is not None:
            s, self.sampler = self.sampler, None
            try:
                s.stop()
            finally:
                self.cpu_before += s.cpu_seconds()

    def ensure(self, pids: frozenset[int]) -> bool:
        """Running on exactly these pids (restarted when the set changed). False while it
        cannot start; the reason is logged once per failure."""
        if self.name == NO_SAMPLER:
            self.pids = pids
            return True
        if self.sampler is not None and pids == self.pids:
            return True
        self.stop()
        self.pids = pids
        if not pids:
            return False
        now = time.monotonic()
        if now < self.retry_at:
            return False
        cls = sampler_registry()[self.name]
        try:
            s = cls(**self.params)
        except Exception as e:
            self._fail(f"bad sampler_params: {e}", now, retry=False)
            return False
        t_start = time.monotonic()
        try:
            s.start(Target(pids=sorted(pids)))
        except Exception as e:  # sampler code: contain it, name it, retry later
            if self._gone():    # a process exited while it started: next loop, no back-off
                log.info("sampler %s: a process exited while it started (%s); starting "
                         "again on the rest", self.name, e)
                self.pids = frozenset()
                return False
            self._fail(f"{type(e).__name__}: {e}" if not isinstance(e, TiermemError)
                       else str(e), now)
            return False
        if s.space != "vaddr":
            s.stop()
            self._fail("it reports physical addresses (paddr); tiermemd moves pages per "
                       "process with move_pages, which needs virtual addresses: use DAMON "
                       "vaddr, ebpf or ebpf-mem", now, retry=False)
            return False
        if self.error:
            log.info("sampler %s recovered", self.name)
        self.sampler, self.error = s, ""
        log.info("sampler %s started on %d process(es) in %.2f s", self.name, len(pids),
                 time.monotonic() - t_start)
        return True

    def _fail(self, why: str, now: float, retry: bool = True) -> None:
        err = f"sampler {self.name} failed to start: {why}"
        self.retry_at = now + SAMPLER_RETRY_S if retry else float("inf")
        if err != self.error:           # one line per distinct failure, not per retry
            log.error("%s%s", err, f"; retrying every {SAMPLER_RETRY_S:.0f} s" if retry
                      else "")
        else:
            log.debug("%s (retry)", err)
        self.error = err

    def read(self) -> AccessBatch | None:
        if self.name == NO_SAMPLER or self.sampler is None:
            return None
        try:
            return self.sampler.read()
        except Exception as e:
            gone = self._gone()
            self.stop()
            self.pids = frozenset()
            if gone:
                # a process it followed exited (a kdamond stops when its target does): not
                # a sampler failure; the next loop starts it again on the processes left,
                # with no back-off (which left DAMON off for 30 s after each such exit)
                log.info("sampler %s: process(es) %s exited under it (%s); restarting",
                         self.name, ", ".join(map(str, gone)), e)
                return None
            self.error = f"sampler {self.name} failed to read: {e}"
            log.error("%s; restarting it", self.error)
            self.retry_at = time.monotonic() + SAMPLER_RETRY_S
            return None

    def _gone(self) -> list[int]:
        """The processes this group follows that have exited (or are zombies)."""
        return sorted(p for p in self.pids if discovery.proc_identity(p) is None)


# Processes one sampler instance can follow, when the sampler class does not say (max_pids).
# DAMON: one (its tried-regions snapshot carries no target id, and the sysfs interface runs
# one kdamond at a time, so a second instance cannot start either); eBPF: its pid map size.
SAMPLER_MAX_PIDS = {"damon": 1, "ebpf": EBPF_MAX_PIDS, "ebpf-mem": EBPF_MAX_PIDS}


def max_pids(name: str) -> int | None:
    if name == NO_SAMPLER:
        return None
    return getattr(sampler_registry()[name], "max_pids", None) or SAMPLER_MAX_PIDS.get(name)


def _key(tc: TargetConfig) -> tuple:
    return tc.sampler, json.dumps(tc.sampler_params, sort_keys=True)


class Engine:
    """All tiering state of a daemon; ``step()`` runs one loop. Thread-safe through lock."""

    def __init__(self, cfg: Config, topology, dry_run: bool = False, self_pids=()):
        self.lock = threading.RLock()
        self.dry_run = dry_run
        self.stats = Stats()
        self.procs: dict[int, Proc] = {}
        self.groups: dict[tuple, SamplerGroup] = {}
        self.policy_override: dict[str, str] = {}
        self.paused = False
        self.exclude = set(self_pids)
        self._rr = 0
        self._logged: set[str] = set()
        self._cmdlines = discovery.CmdlineCache()
        self._loop = 0
        self._prewarmed: set[str] = set()
        self.configure(cfg, topology)

    # -- configuration -------------------------------------------------------------------
    def configure(self, cfg: Config, topology) -> None:
        fast = cfg.fast_nodes or topology.fast_nodes
        slow = cfg.slow_nodes or [n for n in topology.slow_nodes if n not in fast]
        if not fast:
            raise TiermemError("no fast memory node found: set nodes.fast in the config")
        if not slow:
            log.warning("no slow memory tier on this host (nodes %s are all fast): tiermemd "
                        "will watch and report but has nothing to move", fast)
        old = getattr(self, "cfg", None)
        self.cfg, self.fast, self.slow = cfg, list(fast), list(slow)
        self.mover = make_mover("dry-run" if self.dry_run else cfg.mover, cfg.bandwidth_bps,
                                cfg.batch_pages)
        if old is not None:
            keep = {t.name for t in cfg.targets
                    if any(o == t for o in old.targets)}
            for pid in [p for p, s in self.procs.items() if s.target not in keep]:
                del self.procs[pid]
            self.policy_override = {k: v for k, v in self.policy_override.items() if k in keep}
            wanted = {_key(t) for t in cfg.targets}
            for k in [k for k in self.groups if k not in wanted]:
                self.groups.pop(k).stop()
            self.stats.targets = type(self.stats.targets)(
                self.stats.targets.default_factory,
                {k: v for k, v in self.stats.targets.items() if k in keep})
        self.targets = {t.name: t for t in cfg.targets}
        self._prewarm()

    def _prewarm(self) -> None:
        """Samplers with a costly start (DAMON's BPF program: a clang compile, tens of
        seconds under TCG) get it done now, in the background, so a process that appears
        later is sampled at once."""
        for tc in self.targets.values():
            if tc.sampler == NO_SAMPLER or tc.sampler in self._prewarmed:
                continue
            cls = sampler_registry()[tc.sampler]
            if not hasattr(cls, "prewarm"):
                continue
            self._prewarmed.add(tc.sampler)

            def run(cls=cls, name=tc.sampler, params=dict(tc.sampler_params)):
                t0 = time.monotonic()
                try:
                    if cls.prewarm(**params):
                        log.info("sampler %s prewarmed in %.2f s", name, time.monotonic() - t0)
                except Exception as e:       # the real start will say why, in its own line
                    log.debug("sampler %s: prewarm failed: %s", name, e)
            threading.Thread(target=run, name=f"prewarm-{tc.sampler}", daemon=True).start()

    def set_policy(self, target: str, name: str) -> None:
        with self.lock:
            if target not in self.targets:
                raise TiermemError(f"no target {target!r} (targets: "
                                   f"{', '.join(sorted(self.targets))})")
            if name not in POLICIES or POLICIES[name].needs_future:
                raise TiermemError(f"unknown policy {name!r} (known: "
                                   f"{', '.join(sorted(n for n, c in POLICIES.items() if not c.needs_future))})")
            self._make_policy(self.targets[target], name)      # validates
            self.policy_override[target] = name
            for p in self.procs.values():
                if p.target == target:
                    p.policy, p.policy_name = self._make_policy(self.targets[target], name), name
            log.info("target %s: policy switched to %s", target, name)

    def _make_policy(self, tc: TargetConfig, name: str | None = None):
        name = name or self.policy_override.get(tc.name, tc.policy)
        params = tc.policy_params if name == tc.policy else {}
        return POLICIES[name](params, f"target {tc.name}: policy {name}")

    # -- the loop ------------------------------------------------------------------------
    def step(self) -> None:
        with self.lock:
            if self.paused:
                return
            t0 = time.monotonic()
            moved_bytes = self._step()
            dt = time.monotonic() - t0
            with self.stats.lock:
                self.stats.loops += 1
                self.stats.loop_s = dt
                self.stats.bytes_moved += moved_bytes
                self.stats.mb_per_s = moved_bytes / 1e6 / max(self.cfg.interval_s, dt)

    def _discover(self) -> dict[str, set[int]]:
        seen: dict[str, set[int]] = {}
        claimed: set[int] = set()
        self._loop += 1
        if self._loop % self.cfg.rescan_every == 0:
            self._cmdlines.refresh()
        for name, tc in self.targets.items():
            pids = discovery.resolve(tc, self.exclude, self._cmdlines) - claimed  # first wins
            claimed |= pids
            seen[name] = pids
        for pid in list(self.procs):
            p = self.procs[pid]
            ident = discovery.proc_identity(pid)
            if pid not in seen.get(p.target, ()) or ident is None:
                log.info("target %s: process %d exited; dropped", p.target, pid)
                self._count_exit(p.target)
                del self.procs[pid]
            elif ident[0] != p.ident[0]:
                log.info("target %s: PID %d was reused by a new process", p.target, pid)
                self._count_exit(p.target)
                del self.procs[pid]
            elif ident[1] != p.ident[1]:
                log.info("target %s: process %d exec'd %s; starting over for it", p.target,
                         pid, ident[1])
                del self.procs[pid]
                for g in self.groups.values():
                    if pid in g.pids:       # a new address space: restart its sampler
                        g.stop()
                        g.pids = frozenset()
        for name, pids in seen.items():
            tc = self.targets[name]
            for pid in pids - set(self.procs):
                ident = discovery.proc_identity(pid)
                if ident is None:
                    continue
                try:
                    pol = self._make_policy(tc)
                except TiermemError as e:
                    self._once(f"target {name}: {e}")
                    continue
                self.procs[pid] = Proc(pid, ident, name, pol,
                                       self.policy_override.get(name, tc.policy))
                log.info("target %s: now tiering process %d (%s)", name, pid,
                         discovery.cmdline(pid)[:80])
        return seen

    def _once(self, msg: str) -> None:
        if msg not in self._logged:
            self._logged.add(msg)
            log.error("%s", msg)

    def _step(self) -> int:
        seen = self._discover()
        # samplers
        by_key: dict[tuple, set[int]] = {}
        for name, tc in self.targets.items():
            by_key.setdefault(_key(tc), set()).update(
                p for p in seen[name] if p in self.procs)
        ok_pids: set[int] = set()
        batches: dict[int, AccessBatch] = {}
        for key, pids in by_key.items():
            g = self.groups.get(key)
            if g is None:
                tc = next(t for t in self.targets.values() if _key(t) == key)
                g = self.groups[key] = SamplerGroup(tc.sampler, tc.sampler_params)
            cap = max_pids(g.name)
            if cap is not None and len(pids) > cap:
                keep = sorted(pids & g.pids)[:cap]          # no restart while they live
                keep += sorted(pids - set(keep))[:cap - len(keep)]
                for pid in sorted(pids - set(keep)):
                    self._once(f"target {self.procs[pid].target}: process {pid} is not "
                               f"sampled: sampler {g.name} follows {cap} process(es) at a "
                               "time; it waits for a free slot")
                pids = set(keep)
            if not g.ensure(frozenset(pids)):
                continue
            ok_pids |= pids
            b = g.read()
            if b is not None and len(b):
                for pid in np.unique(b.pid):
                    if int(pid) in pids:
                        batches[int(pid)] = b.select(b.pid == pid).page_aligned()
        for name, tc in self.targets.items():
            ts = self.stats.targets[name]
            g = self.groups.get(_key(tc))
            with self.stats.lock:
                ts.processes = sum(1 for p in self.procs.values() if p.target == name)
                if g is not None:
                    ts.sampler_cpu_s = g.cpu()
                    if g.error:
                        ts.last_error = g.error
        # policies and moves
        tot_kb, free_kb = node_mem_kb(self.fast)
        low_b, min_b = self._watermarks(tot_kb)
        state = {"budget": self.cfg.budget_pages(PAGE),
                 "room": int((free_kb * 1024 - min_b) // PAGE),
                 "deficit": max(0, int((low_b - free_kb * 1024) // PAGE)),
                 "promote_ok": free_kb * 1024 > min_b and bool(self.slow),
                 "moved_bytes": 0}
        if state["deficit"]:
            log.debug("fast tier free %.0f MiB under the low watermark %.0f MiB: demoting",
                      free_kb / 1024, low_b / 2**20)
        order = sorted(self.procs)
        if order:
            self._rr = (self._rr + 1) % len(order)
            order = order[self._rr:] + order[:self._rr]
        for pid in order:
            p = self.procs.get(pid)
            if p is None or pid not in ok_pids:
                continue
            try:
                self._tier_one(p, batches.get(pid), state)
            except TargetGone as e:
                log.info("target %s: %s; dropped", p.target, e)
                self._count_exit(p.target)
                self.procs.pop(pid, None)
            except TiermemError as e:
                if "exited" in str(e) or "no process" in str(e):
                    log.info("target %s: process %d exited; dropped", p.target, pid)
                    self._count_exit(p.target)
                    self.procs.pop(pid, None)
                else:
                    self._proc_error(p, str(e))
        for name in self.targets:
            ts = self.stats.targets[name]
            mine = [p for p in self.procs.values() if p.target == name]
            with self.stats.lock:
                ts.fast_pages = sum(p.placement.count(FAST) for p in mine)
                ts.slow_pages = sum(p.placement.count(SLOW) for p in mine)
        return state["moved_bytes"]

    def _watermarks(self, tot_kb: int) -> tuple[float, float]:
        """(low, min) in bytes: the defaults raised to the kernel's own levels of the fast
        nodes (a [watermarks] table in the config is taken as given) (min to the promo watermark, low as far above it as the config's is above its
        min). Promoting below the kernel's promo watermark (what its NUMA-balancing
        promotion keeps free) or its high one wakes kswapd, and with nothing it may demote
        it drops the page cache over and over: a 2 GiB node of the emulated machine has
        min 44, high 66, promo 77 MiB, above the default 1 % / 2 % (20 / 41 MiB)."""
        from tiermem.topology import zone_watermarks
        lo, mn = self._wm(self.cfg.low, tot_kb), self._wm(self.cfg.min, tot_kb)
        if not self.cfg.kernel_floor:          # [watermarks] set in the config: as given
            return lo, mn
        k = {"high": 0, "promo": 0}
        for n in self.fast:
            w = zone_watermarks(n)
            k["high"] += w.get("high", 0)
            k["promo"] += w.get("promo", w.get("high", 0))
        floor = max(k["promo"], k["high"])
        if floor <= mn:
            return lo, mn
        return max(lo, floor + max(lo - mn, 0)), floor     # low stays above min

    @staticmethod
    def _wm(w: tuple[str, float], tot_kb: int) -> float:
        return w[1] * tot_kb * 1024 if w[0] == "share" else w[1]

    def _count_exit(self, target: str) -> None:
        with self.stats.lock:
            self.stats.targets[target].processes_exited += 1

    def _proc_error(self, p: Proc, msg: str) -> None:
        line = f"target {p.target}: process {p.pid}: {msg}"
        ts = self.stats.targets[p.target]
        with self.stats.lock:
            ts.errors += 1
            ts.last_error = line
        if msg != p.last_error:           # one line per distinct failure, not per loop
            log.error("%s; other targets unaffected", line)
            p.last_error = msg

    def _tier_one(self, p: Proc, batch: AccessBatch | None, st: dict) -> None:
        ts = self.stats.targets[p.target]
        # 1. observe
        if batch is not None:
            if len(batch):
                p.first("sampler batch", f"{len(batch)} samples")
            try:
                p.policy.observe(batch)
            except Exception as e:
                self._proc_error(p, f"policy {p.policy_name} failed in observe: "
                                    f"{type(e).__name__}: {e}")
                return
            p.recent = np.unique(batch.addr >> np.uint64(PAGE_SHIFT))
        # 2. placement
        p.since_scan += 1
        if p.since_scan >= self.cfg.rescan_every:
            p.placement, p.other_pages = tracking.scan(p.pid, self.fast, self.slow)
            p.since_scan = 0
            p.looked_up = np.empty(0, np.uint64)
        elif batch is not None and len(batch):
            # sampled pages the placement does not know (memory filled since the last scan)
            unknown = p.recent[p.placement.tier_of(p.recent) == 255]
            unknown = unknown[~np.isin(unknown, p.looked_up, assume_unique=True)]
            if unknown.size:
                p.placement, missed = tracking.add_sampled(p.pid, p.placement, unknown,
                                                           self.fast, self.slow)
                p.looked_up = np.union1d(p.looked_up, missed)
        pl = p.placement
        if batch is not None and len(batch):
            tiers = pl.tier_of(batch.addr >> np.uint64(PAGE_SHIFT))
            w = batch.weight
            known = w[tiers != 255].sum(dtype=np.float64)
            if known > 0:
                with self.stats.lock:
                    ts.fast_access_share = float(w[tiers == FAST].sum(dtype=np.float64) / known)
        if not self.slow or st["budget"] <= 0:
            return
        # 3. plan within capacity and budget
        # the deficit under the low watermark is the daemon's to demote (below): a capacity
        # shrunk by it made every plan of a policy that only swaps break the contract, so
        # nothing was demoted and nothing promoted, ever
        n_fast = pl.count(FAST)
        cap = Capacity(max(0, n_fast + max(st["room"], 0)))
        budget = Budget(st["budget"])
        try:
            plan = p.policy.plan(pl, cap, budget)
            if not isinstance(plan, MigrationPlan):
                raise TiermemError(f"plan() returned {type(plan).__name__}, not a MigrationPlan")
            plan.check(pl, cap, budget, who=f"policy {p.policy_name}")
        except Exception as e:
            self._proc_error(p, f"policy {p.policy_name} failed in plan: "
                                f"{type(e).__name__}: {e}" if not isinstance(e, TiermemError)
                             else f"{e}")
            return
        promote, demote = plan.promote, plan.demote
        if promote.size or demote.size:
            p.first("plan", f"promote {promote.size}, demote {demote.size} pages")
        if not st["promote_ok"] and promote.size:
            log.debug("fast tier under the min watermark: %d promotions held back",
                      promote.size)
            promote = promote[:0]
        if st["deficit"] > demote.size:
            demote = self._extra_demotions(p, pl, demote, promote,
                                           min(st["deficit"], st["budget"] - promote.size))
        if self.dry_run:
            with self.stats.lock:
                ts.planned_promote += int(promote.size)
                ts.planned_demote += int(demote.size)
            if promote.size or demote.size:
                log.info("target %s: process %d: plan: promote %d pages (%.1f MiB), demote %d "
                         "pages (%.1f MiB) [dry run]", p.target, p.pid, promote.size,
                         promote.size * PAGE / 2**20, demote.size, demote.size * PAGE / 2**20)
        # 4. move: demote first (makes room), then promote
        for pages, nodes, tier, counter in ((demote, self.slow, SLOW, "demoted"),
                                            (promote, self.fast, FAST, "promoted")):
            if not pages.size:
                continue
            node = self._roomiest(nodes)
            out = self.mover.move(p.pid, pages << np.uint64(PAGE_SHIFT), node)
            st["budget"] -= out.requested
            moved = out.moved >> np.uint64(PAGE_SHIFT)
            gone = out.gone >> np.uint64(PAGE_SHIFT)
            if moved.size:
                p.first("moves", f"{moved.size} pages {counter} in {out.seconds:.2f} s")
            if not out.dry_run:
                p.placement = pl = tracking.update(pl, moved, tier, gone)
                st["moved_bytes"] += moved.size * PAGE
            with self.stats.lock:
                setattr(ts, counter, getattr(ts, counter) + int(moved.size))
                for k, v in out.failed.items():
                    ts.failures[k] += v
            if tier == FAST:
                st["room"] -= moved.size
            else:
                st["room"] += moved.size
                st["deficit"] = max(0, st["deficit"] - moved.size)
            if out.node_full:
                with self.stats.lock:
                    ts.node_full += 1
                self._once(f"node {node} is full (ENOMEM): "
                           f"{'promotions' if tier == FAST else 'demotions'} to it wait "
                           "until it has free memory")
                if tier == FAST:
                    st["promote_ok"] = False
                    st["room"] = 0

    def _extra_demotions(self, p: Proc, pl: Placement, demote, promote, n: int) -> np.ndarray:
        """Under the low watermark the daemon demotes beyond the policy's plan: fast pages
        not accessed in the last batch (all fast pages only when there was no batch)."""
        want = n - demote.size
        if want <= 0:
            return demote
        fast = pl.on(FAST)
        fast = fast[~np.isin(fast, demote)]
        cold = ~np.isin(fast, p.recent)
        # only pages the last batch did not see: demoting the hot set because something
        # else filled the node would fight the promotions (the kernel reclaims its caches)
        cand = fast[cold][:want] if p.recent.size else fast[:want]
        return np.union1d(demote, cand)

    def _roomiest(self, nodes) -> int:
        if len(nodes) == 1:
            return nodes[0]
        return max(nodes, key=lambda n: node_mem_kb([n])[1])

    # -- reporting and shutdown ----------------------------------------------------------
    def status(self) -> dict:
        with self.lock:
            tg = []
            for name, tc in self.targets.items():
                g = self.groups.get(_key(tc))
                tg.append({"name": name,
                           "pids": sorted(p.pid for p in self.procs.values()
                                          if p.target == name),
                           "sampler": tc.sampler,
                           "sampler_error": g.error if g else "",
                           "policy": self.policy_override.get(name, tc.policy),
                           "errors": self.stats.targets[name].errors,
                           "last_error": self.stats.targets[name].last_error})
            return {"paused": self.paused, "dry_run": self.dry_run,
                    "fast_nodes": self.fast, "slow_nodes": self.slow,
                    "interval_seconds": self.cfg.interval_s,
                    "bandwidth_mb_per_s": round(self.cfg.bandwidth_bps / 1e6, 3),
                    "batch_pages": self.cfg.batch_pages, "mover": self.mover.name,
                    "targets": tg}

    def sampler_names(self) -> list[str]:
        return sorted({g.name for g in self.groups.values() if g.name != NO_SAMPLER})

    def shutdown(self) -> list[str]:
        """Stop every sampler; returns one error line per sampler that failed to stop."""
        errs = []
        with self.lock:
            for g in self.groups.values():
                try:
                    g.stop()
                except Exception as e:
                    errs.append(f"sampler {g.name} failed to stop: {e}")
            self.groups.clear()
            self.procs.clear()
            for name in self._prewarmed:
                cls = sampler_registry().get(name)
                try:
                    if cls is not None and hasattr(cls, "release"):
                        cls.release()
                except Exception as e:
                    errs.append(f"sampler {name} failed to release: {e}")
        return errs

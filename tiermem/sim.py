"""Trace-driven two-tier memory simulator: replays a trace through a policy, epoch by epoch.

Model (all per epoch, numpy-vectorised, cost O(accesses + pages)):

1. Accesses of the epoch are counted per page with ``np.bincount`` over the trace's dense page
   indices. Pages touched for the first time are placed by ``policy.place_new`` in first-touch
   order (default: fast tier while it has room).
2. Optional LLC filter (``llc_mb`` > 0): within the epoch the ``llc_mb`` worth of most-used
   64-byte lines stay cached (their first access misses, the rest hit). This is a static
   "best lines" approximation of an LRU cache, not a cycle-level cache model.
3. Memory accesses on each tier take the tier's loaded latency,
   ``lat(rho) = idle_lat * (1 + q * rho / (1 - rho))`` with ``rho`` the tier's bandwidth
   utilisation (data traffic + migration traffic over the epoch time), solved as a fixed point
   with the epoch time. Epoch time = accesses * cpu_ns + llc_hits * llc_ns +
   (fast * lat_fast + slow * lat_slow) / mlp + samples * sample_ns + migrations * page_ns.
4. The policy observes 1 in ``sample_every`` accesses (weight = sample_every) as an
   AccessBatch with word addresses when the trace has them, then plans; the plan is checked
   against the contract (budget, capacity, tiers) and carried out at the epoch boundary. Its
   per-page cost and its copy traffic (4 KiB read on one tier, written on the other) are
   charged to the next epoch, when a real mover would be copying.
5. An oracle policy (``needs_future``) is also shown the next epoch's per-page counts.

Outputs per epoch and in total: accesses, fast-tier access ratio (memory accesses served by
the fast tier / all memory accesses), estimated time, promotions, demotions, migration MB.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from tiermem.trace import PID_SHIFT, Trace
from tiermem.access import PAGE_SHIFT, PAGE_SIZE, WORD_SHIFT, AccessBatch
from tiermem.errors import TiermemError
from tiermem.policies.base import FAST, SLOW, Budget, Capacity, Placement, Policy

UNPLACED = 255
LINE = 64


@dataclass(frozen=True)
class TierModel:
    """Parameters of the simulated machine. Defaults: local DDR5 vs a CXL memory expander."""
    fast_mb: float
    budget_mb: float = 2.0            # migration budget per epoch (promotions + demotions)
    epoch_accesses: int = 100_000     # accesses per epoch when the trace has no epochs
    fast_lat_ns: float = 90.0
    slow_lat_ns: float = 250.0
    fast_bw_gbs: float = 60.0
    slow_bw_gbs: float = 25.0
    queue_factor: float = 1.0         # q in lat(rho)
    cpu_ns: float = 1.0               # compute per access
    mlp: float = 2.0                  # memory-level parallelism (misses in flight)
    llc_mb: float = 0.0               # 0 = no LLC filter
    llc_ns: float = 12.0
    sample_every: int = 64            # the policy sees 1 in N accesses
    sample_ns: float = 20.0           # cost per sample delivered to the policy
    migrate_page_ns: float = 3000.0   # kernel cost per migrated page (unmap, TLB, remap)

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v):
                raise TiermemError(f"tier model: {f.name} must be a finite number, got {v!r}")
            if v < 0:
                raise TiermemError(f"tier model: {f.name} must be >= 0, got {v}")
        for name in ("fast_lat_ns", "slow_lat_ns", "fast_bw_gbs", "slow_bw_gbs", "mlp"):
            if getattr(self, name) <= 0:
                raise TiermemError(f"tier model: {name} must be > 0")
        if int(self.epoch_accesses) < 1 or int(self.sample_every) < 1:
            raise TiermemError("tier model: epoch_accesses and sample_every must be >= 1")

    @property
    def capacity(self) -> Capacity:
        return Capacity.from_mb(self.fast_mb)

    @property
    def budget(self) -> Budget:
        return Budget.from_mb(self.budget_mb)


@dataclass
class SimResult:
    policy: str
    accesses: float = 0.0
    mem_accesses: float = 0.0
    fast_accesses: float = 0.0
    time_s: float = 0.0
    promotions: int = 0
    demotions: int = 0
    policy_cpu_s: float = 0.0        # wall time spent inside observe/plan (not in time_s)
    final: Placement | None = None   # placement after the last epoch (page keys, tiers)
    budget_pages: int = 0
    capacity_pages: int = 0
    epochs: dict = field(default_factory=dict)   # column name -> np.ndarray per epoch

    @property
    def fast_ratio(self) -> float:
        return self.fast_accesses / self.mem_accesses if self.mem_accesses else 0.0

    @property
    def migration_mb(self) -> float:
        return (self.promotions + self.demotions) * PAGE_SIZE / 2**20

    def summary(self) -> dict:
        return {"policy": self.policy, "accesses": self.accesses,
                "mem_accesses": self.mem_accesses, "fast_accesses": self.fast_accesses,
                "fast_ratio": self.fast_ratio, "time_s": self.time_s,
                "promotions": self.promotions, "demotions": self.demotions,
                "migration_mb": self.migration_mb, "policy_cpu_s": self.policy_cpu_s}


def epoch_bounds(trace: Trace, epoch_accesses: int) -> np.ndarray:
    """Start offsets of each epoch plus the end: the trace's own epochs if it has them."""
    n = len(trace)
    if trace.epoch is not None:
        starts = np.flatnonzero(np.diff(trace.epoch.astype(np.int64))) + 1
        return np.concatenate([[0], starts, [n]]).astype(np.int64)
    return np.append(np.arange(0, n, int(epoch_accesses), dtype=np.int64), n)


def _loaded_epoch_time(m: TierModel, base_ns: float, n_fast: float, n_slow: float,
                       extra_fast_bytes: float, extra_slow_bytes: float) -> tuple[float, float,
                                                                                 float]:
    """Fixed point of epoch time and loaded latencies. Returns (time_ns, lat_fast, lat_slow)."""
    lat_f, lat_s = m.fast_lat_ns, m.slow_lat_ns
    bytes_f = n_fast * LINE + extra_fast_bytes
    bytes_s = n_slow * LINE + extra_slow_bytes
    t = base_ns + (n_fast * lat_f + n_slow * lat_s) / m.mlp
    # minimum time to move the bytes at 95% of each tier's bandwidth (GB/s == bytes/ns)
    floor = max(bytes_f / (0.95 * m.fast_bw_gbs), bytes_s / (0.95 * m.slow_bw_gbs))
    t = max(t, floor, 1e-9)
    for _ in range(40):
        rf = min(bytes_f / (m.fast_bw_gbs * t), 0.95)
        rs = min(bytes_s / (m.slow_bw_gbs * t), 0.95)
        lat_f = m.fast_lat_ns * (1 + m.queue_factor * rf / (1 - rf))
        lat_s = m.slow_lat_ns * (1 + m.queue_factor * rs / (1 - rs))
        t_new = max(base_ns + (n_fast * lat_f + n_slow * lat_s) / m.mlp, floor)
        if abs(t_new - t) <= 1e-6 * t:
            t = t_new
            break
        t = 0.5 * (t + t_new)
    return t, lat_f, lat_s


def _llc_hits_per_page(idx: np.ndarray, word: np.ndarray | None, w: np.ndarray | None,
                       n_pages: int, llc_lines: int) -> np.ndarray:
    """Per page, accesses absorbed by the LLC in this epoch (static best-lines model)."""
    line = idx.astype(np.int64) * 64
    if word is not None:
        line += word
    ul, inv = np.unique(line, return_inverse=True)
    cnt = np.bincount(inv, weights=w, minlength=ul.size)
    if ul.size > llc_lines:
        keep = np.argpartition(-cnt, llc_lines - 1)[:llc_lines]
    else:
        keep = np.arange(ul.size)
    first = np.ones(keep.size) if w is None else \
        np.minimum(cnt[keep], 1.0)   # one miss per cached line
    return np.bincount(ul[keep] // 64, weights=cnt[keep] - first, minlength=n_pages)


def simulate(trace: Trace, policy: Policy, model: TierModel, progress=None,
             check_plans: bool = True) -> SimResult:
    """Replay ``trace`` through ``policy`` on ``model``. ``progress(done, total)`` is called
    after each epoch with accesses done so far."""
    n, P = len(trace), trace.n_pages
    keys = trace.page_keys()
    tiers = np.full(P, UNPLACED, dtype=np.uint8)
    cap, bud = model.capacity, model.budget
    bounds = epoch_bounds(trace, model.epoch_accesses)
    E = bounds.size - 1
    cols = {c: np.zeros(E) for c in ("accesses", "mem_accesses", "fast_accesses", "time_s",
                                     "promotions", "demotions", "fast_pages")}
    res = SimResult(policy.name)
    w_all = trace.weight
    every = int(model.sample_every)
    llc_lines = int(model.llc_mb * 2**20) // LINE
    pend_pages = 0            # migrations from the previous plan, charged to this epoch
    pend_fast_bytes = pend_slow_bytes = 0.0
    t_now = 0.0
    next_counts = None

    def counts_of(lo, hi):
        return np.bincount(trace.page_idx[lo:hi], minlength=P,
                           weights=None if w_all is None else w_all[lo:hi])

    for e in range(E):
        lo, hi = int(bounds[e]), int(bounds[e + 1])
        idx = trace.page_idx[lo:hi]
        counts = next_counts if next_counts is not None else counts_of(lo, hi)
        next_counts = None

        # 1. first-touch placement of new pages, in order of first access
        new = (counts > 0) & (tiers == UNPLACED)
        if new.any():
            pos = np.flatnonzero(new[idx])
            _, first = np.unique(idx[pos], return_index=True)
            order = idx[pos[np.sort(first)]]
            pl = Placement(keys[tiers != UNPLACED], tiers[tiers != UNPLACED],
                           assume_sorted=True)
            t0 = time.perf_counter()
            tiers[order] = policy.place_new(keys[order], pl, cap)
            res.policy_cpu_s += time.perf_counter() - t0
            if np.count_nonzero(tiers == FAST) > cap.fast_pages:
                raise TiermemError(f"policy {policy.name}: place_new put more pages on the "
                                   f"fast tier than its capacity ({cap.fast_pages} pages)")

        # 2. LLC filter and per-tier memory accesses
        total = float(counts.sum())
        mem = counts
        llc_hit = 0.0
        if llc_lines:
            hits = _llc_hits_per_page(idx, None if trace.word is None else trace.word[lo:hi],
                                      None if w_all is None else w_all[lo:hi], P, llc_lines)
            mem = counts - hits
            llc_hit = float(hits.sum())
        n_fast = float(mem[tiers == FAST].sum())
        n_mem = total - llc_hit
        n_slow = n_mem - n_fast

        # 3. time of the epoch (with the previous plan's migrations running during it)
        n_samples = len(range(lo + (-lo) % every, hi, every))
        base = (total * model.cpu_ns + llc_hit * model.llc_ns + n_samples * model.sample_ns
                + pend_pages * model.migrate_page_ns)
        t_ns, _, _ = _loaded_epoch_time(model, base, n_fast, n_slow, pend_fast_bytes,
                                        pend_slow_bytes)
        t_start, t_now = t_now, t_now + t_ns * 1e-9

        # 4. the policy observes a sample and plans
        # one sample in each block of ``every`` accesses, at a random position in the block:
        # a fixed stride aliases with periodic access patterns (PageRank's edge / rank reads
        # alternate, so every 64th access saw only one of the two arrays); hardware samplers
        # randomise their period for the same reason. Seeded per epoch: runs are repeatable.
        s = np.arange(lo + (-lo) % every, hi, every)
        if every > 1 and s.size:
            s = np.minimum(s + np.random.default_rng(e).integers(0, every, s.size), hi - 1)
        si = trace.page_idx[s]
        addr = keys[si] << np.uint64(PAGE_SHIFT)
        if trace.word is not None:
            addr |= trace.word[s].astype(np.uint64) << np.uint64(WORD_SHIFT)
        sw = np.full(s.size, every, np.float32) if w_all is None else w_all[s] * every
        batch = AccessBatch(trace.page_pid[si], addr, sw, trace.word is not None, trace.space,
                            t_start, t_now, None if trace.is_write is None else
                            trace.is_write[s], ordered=True)
        placed = tiers != UNPLACED
        placement = Placement(keys[placed], tiers[placed], assume_sorted=True)
        t0 = time.perf_counter()
        policy.observe(batch)
        if policy.needs_future and e + 1 < E:
            next_counts = counts_of(int(bounds[e + 1]), int(bounds[e + 2]))
            nz = np.flatnonzero(next_counts)
            policy.see_future(keys[nz], next_counts[nz])
        plan = policy.plan(placement, cap, bud)
        res.policy_cpu_s += time.perf_counter() - t0
        if check_plans:
            plan.check(placement, cap, bud, who=f"policy {policy.name}")
        pp = np.searchsorted(keys, plan.promote)
        pd = np.searchsorted(keys, plan.demote)
        tiers[pd] = SLOW
        tiers[pp] = FAST
        np_, nd = int(plan.promote.size), int(plan.demote.size)
        pend_pages = np_ + nd
        # a promotion reads 4 KiB from slow and writes it to fast; a demotion the reverse
        pend_fast_bytes = float((np_ + nd) * PAGE_SIZE)
        pend_slow_bytes = float((np_ + nd) * PAGE_SIZE)

        for c, v in (("accesses", total), ("mem_accesses", n_mem), ("fast_accesses", n_fast),
                     ("time_s", t_ns * 1e-9), ("promotions", np_), ("demotions", nd),
                     ("fast_pages", np.count_nonzero(tiers == FAST))):
            cols[c][e] = v
        if progress is not None:
            progress(hi, n)

    # migrations of the last plan still cost time
    if pend_pages:
        cols["time_s"][-1] += pend_pages * model.migrate_page_ns * 1e-9
    res.epochs = cols
    placed = tiers != UNPLACED
    res.final = Placement(keys[placed], tiers[placed], assume_sorted=True)
    res.budget_pages, res.capacity_pages = bud.pages, cap.fast_pages
    res.accesses = float(cols["accesses"].sum())
    res.mem_accesses = float(cols["mem_accesses"].sum())
    res.fast_accesses = float(cols["fast_accesses"].sum())
    res.time_s = float(cols["time_s"].sum())
    res.promotions = int(cols["promotions"].sum())
    res.demotions = int(cols["demotions"].sum())
    return res


def model_dict(m: TierModel) -> dict:
    return asdict(m)

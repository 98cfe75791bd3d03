"""The policy interface: placement, capacity, budget, migration plan, parameter schema, Policy.

A policy instance manages ONE address space (one process's virtual pages, or physical memory)
with two tiers: 0 = fast (local DRAM), 1 = slow (CXL / remote node). Page ids are uint64 page
numbers (byte address >> 12). Each interval the driver (daemon or simulator) calls

    policy.observe(batch)                       # an tiermem.access.AccessBatch
    plan = policy.plan(placement, capacity, budget)

and carries the plan out. A policy never touches the kernel. Contract of ``plan``:

- ``plan.promote`` are pages now on tier 1, ``plan.demote`` pages now on tier 0 (pages the
  placement does not know are ignored by the driver and count as plan errors in the simulator);
- ``len(promote) + len(demote) <= budget.pages`` (both directions are migration traffic);
- after demotions then promotions, tier 0 holds at most ``capacity.fast_pages`` pages.

A policy may also choose where never-seen pages are first placed (``place_new``); the default
is first-touch: fast tier while it has room, then slow. The simulator honours it; on a live
host the kernel allocates and the daemon can at most set a memory policy.

Writing a new policy (one file): subclass Policy, set ``name``, ``params`` (a dict of
Param), implement ``observe`` and ``plan``; load it with
``tiermem.policies.load_policy_file(path)`` or ``--policy-file`` on the CLI.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from tiermem.access import PAGE_SIZE, AccessBatch
from tiermem.errors import TiermemError

FAST, SLOW = 0, 1


# ----------------------------------------------------------------------------------------
# Placement, capacity, budget, plan
# ----------------------------------------------------------------------------------------
class Placement:
    """Page -> tier map as two aligned arrays: sorted unique uint64 page numbers, uint8 tiers."""

    __slots__ = ("pages", "tiers")

    def __init__(self, pages, tiers, *, assume_sorted: bool = False):
        p = np.ascontiguousarray(pages, dtype=np.uint64)
        t = np.ascontiguousarray(tiers, dtype=np.uint8)
        if p.ndim != 1 or t.shape != p.shape:
            raise TiermemError(f"placement: pages {p.shape} and tiers {t.shape} must be 1-D "
                               "and the same length")
        if t.size and t.max() > SLOW:
            raise TiermemError("placement: tiers must be 0 (fast) or 1 (slow)")
        if not assume_sorted and p.size > 1:
            d = np.diff(p.astype(np.int64, copy=False)) if p.max() < 2**63 else None
            if d is None or (d <= 0).any():
                order = np.argsort(p, kind="stable")
                p, t = p[order], t[order]
                if (p[1:] == p[:-1]).any():
                    raise TiermemError("placement: duplicate page numbers")
        self.pages, self.tiers = p, t

    @classmethod
    def empty(cls) -> "Placement":
        return cls(np.empty(0, np.uint64), np.empty(0, np.uint8), assume_sorted=True)

    def __len__(self) -> int:
        return int(self.pages.size)

    def count(self, tier: int) -> int:
        return int(np.count_nonzero(self.tiers == tier))

    def on(self, tier: int) -> np.ndarray:
        """Page numbers on the given tier (sorted)."""
        return self.pages[self.tiers == tier]

    def index(self, pages) -> tuple[np.ndarray, np.ndarray]:
        """(positions, known) of the given pages in this placement (vectorised searchsorted)."""
        q = np.asarray(pages, dtype=np.uint64)
        pos = np.searchsorted(self.pages, q)
        pos_c = np.minimum(pos, max(self.pages.size - 1, 0))
        known = (pos < self.pages.size) & (self.pages[pos_c] == q) if self.pages.size else \
            np.zeros(q.shape, bool)
        return pos_c, known

    def tier_of(self, pages, unknown: int = 255) -> np.ndarray:
        """Tier of each page, ``unknown`` (default 255) for pages not in the placement."""
        pos, known = self.index(pages)
        out = np.full(np.shape(pages), unknown, dtype=np.uint8)
        if self.pages.size:
            out[known] = self.tiers[pos[known]]
        return out

    def apply(self, plan: "MigrationPlan") -> "Placement":
        """A new placement with the plan carried out (pages it does not know are skipped)."""
        t = self.tiers.copy()
        for pages, tier in ((plan.demote, SLOW), (plan.promote, FAST)):
            pos, known = self.index(pages)
            t[pos[known]] = tier
        return Placement(self.pages, t, assume_sorted=True)


@dataclass(frozen=True)
class Capacity:
    """Tier capacities in pages. slow_pages None means unbounded."""
    fast_pages: int
    slow_pages: int | None = None

    def __post_init__(self):
        if int(self.fast_pages) < 0:
            raise TiermemError(f"capacity: fast_pages must be >= 0, got {self.fast_pages}")

    @classmethod
    def from_mb(cls, fast_mb: float, slow_mb: float | None = None) -> "Capacity":
        return cls(int(fast_mb * 2**20) // PAGE_SIZE,
                   None if slow_mb is None else int(slow_mb * 2**20) // PAGE_SIZE)


@dataclass(frozen=True)
class Budget:
    """Pages that may be migrated (promotions + demotions) in this interval."""
    pages: int

    def __post_init__(self):
        if int(self.pages) < 0:
            raise TiermemError(f"budget: pages must be >= 0, got {self.pages}")

    @classmethod
    def from_mb(cls, mb: float) -> "Budget":
        return cls(int(mb * 2**20) // PAGE_SIZE)

    @classmethod
    def from_rate(cls, mb_per_s: float, interval_s: float) -> "Budget":
        return cls.from_mb(mb_per_s * interval_s)


@dataclass(frozen=True)
class MigrationPlan:
    promote: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    demote: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))

    def __post_init__(self):
        p = np.unique(np.asarray(self.promote, dtype=np.uint64).ravel())
        d = np.unique(np.asarray(self.demote, dtype=np.uint64).ravel())
        if p.size and d.size and np.intersect1d(p, d, assume_unique=True).size:
            raise TiermemError("migration plan: a page is both promoted and demoted")
        object.__setattr__(self, "promote", p)
        object.__setattr__(self, "demote", d)

    @property
    def pages(self) -> int:
        return int(self.promote.size + self.demote.size)

    def check(self, placement: Placement, capacity: Capacity, budget: Budget,
              who: str = "policy") -> None:
        """Raise TiermemError naming ``who`` if the plan breaks the contract."""
        if self.pages > budget.pages:
            raise TiermemError(f"{who}: plan moves {self.pages} pages, budget is {budget.pages}")
        tp, td = placement.tier_of(self.promote), placement.tier_of(self.demote)
        if (tp != SLOW).any():
            raise TiermemError(f"{who}: plan promotes {int((tp != SLOW).sum())} pages that are "
                               "not on the slow tier")
        if (td != FAST).any():
            raise TiermemError(f"{who}: plan demotes {int((td != FAST).sum())} pages that are "
                               "not on the fast tier")
        after = placement.count(FAST) - self.demote.size + self.promote.size
        if after > capacity.fast_pages:
            raise TiermemError(f"{who}: plan leaves {after} pages on the fast tier, capacity is "
                               f"{capacity.fast_pages}")


# ----------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One policy parameter: type (int, float, bool, str), default, bounds, choices, help."""
    type: type
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None

    def validate(self, value: Any, where: str) -> Any:
        t = self.type
        if t is bool:
            if not isinstance(value, bool):
                if isinstance(value, str) and value.lower() in ("true", "false", "1", "0",
                                                                "yes", "no"):
                    value = value.lower() in ("true", "1", "yes")
                else:
                    raise TiermemError(f"{where}: expected true or false, got {value!r}")
        elif t is int:
            if isinstance(value, bool) or not isinstance(value, (int, str, float)):
                raise TiermemError(f"{where}: expected an integer, got {value!r}")
            try:
                f = float(value)
                if f != int(f):
                    raise ValueError
                value = int(f)
            except (ValueError, OverflowError):
                raise TiermemError(f"{where}: expected an integer, got {value!r}") from None
        elif t is float:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise TiermemError(f"{where}: expected a number, got {value!r}")
            try:
                value = float(value)
            except ValueError:
                raise TiermemError(f"{where}: expected a number, got {value!r}") from None
            if not np.isfinite(value):
                raise TiermemError(f"{where}: expected a finite number, got {value!r}")
        elif t is str:
            if not isinstance(value, str):
                raise TiermemError(f"{where}: expected a string, got {value!r}")
        if self.min is not None and value < self.min:
            raise TiermemError(f"{where}: must be >= {self.min}, got {value!r}")
        if self.max is not None and value > self.max:
            raise TiermemError(f"{where}: must be <= {self.max}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise TiermemError(f"{where}: must be one of {', '.join(map(str, self.choices))}, "
                               f"got {value!r}")
        return value


def parse_param_string(s: str) -> dict[str, str]:
    """'a=1,b=x' -> {'a': '1', 'b': 'x'} (the CLI's --param form; values validated later)."""
    out: dict[str, str] = {}
    for part in filter(None, (x.strip() for x in s.split(","))):
        if "=" not in part:
            raise TiermemError(f"parameter {part!r}: expected key=value")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


# ----------------------------------------------------------------------------------------
# Policy
# ----------------------------------------------------------------------------------------
class Policy:
    """Base class. Subclasses set ``name`` and ``params`` and implement observe/plan."""

    name: ClassVar[str] = "base"
    description: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}
    needs_future: ClassVar[bool] = False    # True only for the oracle (simulator-only)

    def __init__(self, config: dict | None = None, where: str | None = None, **kw):
        cfg = dict(config or {})
        cfg.update(kw)
        self.p = self.validate_params(cfg, where)

    @classmethod
    def validate_params(cls, cfg: dict, where: str | None = None) -> dict[str, Any]:
        """Defaults overlaid with cfg, each value checked; unknown keys rejected by name."""
        where = where or f"policy {cls.name}"
        if not isinstance(cfg, dict):
            raise TiermemError(f"{where}: parameters must be a table, got {type(cfg).__name__}")
        unknown = sorted(set(cfg) - set(cls.params))
        if unknown:
            known = ", ".join(sorted(cls.params)) or "none"
            raise TiermemError(f"{where}: unknown parameter {unknown[0]!r} (known: {known})")
        out = {}
        for k, spec in cls.params.items():
            out[k] = spec.validate(cfg[k], f"{where}: parameter {k!r}") if k in cfg \
                else spec.default
        cls.check_params(out, where)
        return out

    @classmethod
    def check_params(cls, p: dict[str, Any], where: str) -> None:
        """Cross-parameter checks (override; raise TiermemError)."""

    # -- the interface ---------------------------------------------------------------------
    def observe(self, batch: AccessBatch) -> None:
        raise TiermemError(f"policy {self.name} does not implement observe()")

    def plan(self, placement: Placement, capacity: Capacity, budget: Budget) -> MigrationPlan:
        raise TiermemError(f"policy {self.name} does not implement plan()")

    def place_new(self, pages: np.ndarray, placement: Placement,
                  capacity: Capacity) -> np.ndarray:
        """Tier for each never-seen page (first-touch order): fast while it has room."""
        free = max(capacity.fast_pages - placement.count(FAST), 0)
        tiers = np.full(len(pages), SLOW, dtype=np.uint8)
        tiers[:free] = FAST
        return tiers

    def stats(self) -> dict[str, float]:
        """Counters the policy wants reported (hot pages found, rate, ...)."""
        return {}


# ----------------------------------------------------------------------------------------
# Helpers shared by policies
# ----------------------------------------------------------------------------------------
def exchange(placement: Placement, capacity: Capacity, budget: Budget, want_fast: np.ndarray,
             want_score: np.ndarray, fast_score_pages: np.ndarray | None = None,
             fast_scores: np.ndarray | None = None, margin: float = 0.0) -> MigrationPlan:
    """Promote the best of ``want_fast`` (by descending ``want_score``), making room by
    demoting the coldest fast pages (scores from ``fast_score_pages``/``fast_scores``; fast
    pages without a score count as 0) only when the promoted page scores higher by more than
    ``margin``. Stays within budget (promotions + demotions) and capacity."""
    want_fast = np.asarray(want_fast, dtype=np.uint64)
    want_score = np.asarray(want_score, dtype=np.float64)
    if want_fast.size:
        on_slow = placement.tier_of(want_fast) == SLOW
        want_fast, want_score = want_fast[on_slow], want_score[on_slow]
        order = np.argsort(-want_score, kind="stable")
        want_fast, want_score = want_fast[order], want_score[order]
    free = max(capacity.fast_pages - placement.count(FAST), 0)
    n_free = min(free, want_fast.size, budget.pages)
    promote = [want_fast[:n_free]]
    demote: list[np.ndarray] = []
    rest, rest_score = want_fast[n_free:], want_score[n_free:]
    left = budget.pages - n_free
    if rest.size and left >= 2:
        fast = placement.on(FAST)
        fscore = np.zeros(fast.size)
        if fast_score_pages is not None and fast.size:
            fsp = np.asarray(fast_score_pages, dtype=np.uint64)
            order = np.argsort(fsp)
            fsp, fs = fsp[order], np.asarray(fast_scores, dtype=np.float64)[order]
            pos = np.minimum(np.searchsorted(fsp, fast), max(fsp.size - 1, 0))
            hit = fsp.size > 0
            if hit:
                m = fsp[pos] == fast
                fscore[m] = fs[pos[m]]
        corder = np.argsort(fscore, kind="stable")
        k = min(left // 2, rest.size, fast.size)
        gain = rest_score[:k] - fscore[corder[:k]]
        good = gain > margin
        # scores are sorted (descending / ascending), so gain is decreasing: take the prefix
        nk = int(np.argmin(good)) if not good.all() else k
        promote.append(rest[:nk])
        demote.append(fast[corder[:nk]])
    return MigrationPlan(np.concatenate(promote),
                         np.concatenate(demote) if demote else np.empty(0, np.uint64))

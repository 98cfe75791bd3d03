"""Reports on record files: access heatmap (address x time, PNG), working-set size over
time, and the hottest address ranges. Pure numpy on the record's spans; matplotlib (Agg)
only for the PNG.
"""
from __future__ import annotations

import os

import numpy as np

from tiermem.access import PAGE_SHIFT, PAGE_SIZE
from tiermem.errors import TiermemError
from tiermem.npzfile import write_atomic
from tiermem.record import Record

CLUSTER_GAP = 1 << 30       # address gaps wider than this split the space into clusters


def _pages(rec: Record):
    """(batch index, pid, page number, weight) of every page every span covers."""
    parts = []
    for b in range(rec.nr_batches):
        bt = rec.spans(b).to_batch()
        parts.append((np.full(len(bt), b, np.int32), bt.pid, bt.pages(), bt.weight))
    if not parts:
        return (np.empty(0, np.int32), np.empty(0, np.int32), np.empty(0, np.uint64),
                np.empty(0, np.float32))
    return tuple(np.concatenate(x) for x in zip(*parts))


def busiest_range(addr: np.ndarray, weight: np.ndarray, gap: int = CLUSTER_GAP) -> tuple[int, int]:
    """[start, end) of the address cluster (pieces separated by > gap bytes unaccessed) that
    has the most weight: a process's heap and its mmap area are terabytes apart, a heatmap
    over both would show two dots."""
    if addr.size == 0:
        raise TiermemError("record has no accesses")
    order = np.argsort(addr)
    a, w = addr[order], weight[order]
    brk = np.nonzero(np.diff(a.astype(np.int64)) > gap)[0]
    starts = np.concatenate([[0], brk + 1])
    ends = np.concatenate([brk + 1, [a.size]])
    sums = np.add.reduceat(w.astype(np.float64), starts)
    k = int(np.argmax(sums))
    return int(a[starts[k]]), int(a[ends[k] - 1]) + PAGE_SIZE


def heatmap_grid(rec: Record, time_bins: int = 100, addr_bins: int = 200,
                 addr_range: tuple[int, int] | None = None, pid: int | None = None):
    """(grid [addr_bins, time_bins] of accesses per page per batch, time edges s, address
    edges). A batch covers the time bins of its interval."""
    b, p, pg, w = _pages(rec)
    if pid is not None:
        keep = p == pid
        b, pg, w = b[keep], pg[keep], w[keep]
    addr = pg << np.uint64(PAGE_SHIFT)
    if addr_range is None:
        addr_range = busiest_range(addr, w)
    lo, hi = addr_range
    if not hi > lo:
        raise TiermemError(f"empty address range {lo:#x}-{hi:#x}")
    keep = (addr >= np.uint64(lo)) & (addr < np.uint64(hi))
    b, addr, w = b[keep], addr[keep], w[keep]
    t_lo, t_hi = float(rec.batch_t[0, 0]), float(rec.batch_t[-1, 1])
    t_edges = np.linspace(t_lo, max(t_hi, t_lo + 1e-9), time_bins + 1)
    a_edges = np.linspace(lo, hi, addr_bins + 1)
    pages_per_bin = max((hi - lo) / addr_bins / PAGE_SIZE, 1e-12)
    grid = np.zeros((addr_bins, time_bins))
    cover = np.zeros(time_bins)
    # every batch fills the time bins its interval covers, at its level (accesses per page)
    off = np.searchsorted(b, np.arange(rec.nr_batches + 1))
    for k in range(rec.nr_batches):
        if off[k] == off[k + 1]:
            continue
        h, _ = np.histogram(addr[off[k]:off[k + 1]].astype(np.float64), bins=a_edges,
                            weights=w[off[k]:off[k + 1]].astype(np.float64))
        t0, t1 = rec.batch_t[k]
        i0 = max(int(np.searchsorted(t_edges, t0, "right")) - 1, 0)
        i1 = max(int(np.searchsorted(t_edges, t1, "left")), i0 + 1)
        grid[:, i0:min(i1, time_bins)] += (h / pages_per_bin)[:, None]
        cover[i0:min(i1, time_bins)] += 1
    grid /= np.maximum(cover, 1)[None, :]        # a bin two batches share: their mean
    return grid, t_edges, a_edges


def heatmap_png(rec: Record, out: str, time_bins: int = 100, addr_bins: int = 200,
                addr_range=None, pid=None, title: str | None = None) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid, te, ae = heatmap_grid(rec, time_bins, addr_bins, addr_range, pid)
    d = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(d):
        raise TiermemError(f"cannot write {out}: directory {d} does not exist")
    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    lo = ae[0]
    mib = (ae - lo) / (1 << 20)
    im = ax.pcolormesh(te, mib, grid, cmap="inferno", shading="flat")
    ax.set_xlabel("time (s)")
    ax.set_ylabel(f"address - {int(lo):#x} (MiB)")
    ax.set_title(title or f"{rec.meta.get('sampler', '?')} record: accesses per page "
                 f"({rec.space})")
    fig.colorbar(im, ax=ax, label="accesses per page (weight)")
    fig.tight_layout()
    try:
        write_atomic(out, "heat", ".png", lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)
    return {"file": out, "addr_start": int(ae[0]), "addr_end": int(ae[-1]),
            "t_start_s": float(te[0]), "t_end_s": float(te[-1]), "time_bins": time_bins,
            "addr_bins": addr_bins, "max_weight_per_page": float(grid.max())}


def wss(rec: Record) -> list[dict]:
    """Working-set size of every batch: distinct pages with weight > 0, in bytes."""
    out = []
    for b in range(rec.nr_batches):
        bt = rec.spans(b).to_batch()
        live = bt.weight > 0
        key = (bt.pid[live].astype(np.uint64) << np.uint64(48)) ^ bt.pages()[live]
        n = int(np.unique(key).size)
        out.append({"batch": b, "t_start_s": float(rec.batch_t[b, 0]),
                    "t_end_s": float(rec.batch_t[b, 1]), "wss_bytes": n * PAGE_SIZE,
                    "pages": n})
    return out


def hot(rec: Record, top: int = 10) -> list[dict]:
    """The top hottest ranges: pages summed over the whole record, runs of adjacent pages
    of one process with the same total weight merged, ranked by weight per page."""
    if top <= 0:
        raise TiermemError(f"--top must be > 0, got {top}")
    _, p, pg, w = _pages(rec)
    if pg.size == 0:
        return []
    key = (p.astype(np.int64).astype(np.uint64) << np.uint64(48)) | pg
    ukey, inv = np.unique(key, return_inverse=True)
    tot = np.bincount(inv.ravel(), weights=w.astype(np.float64))
    upid = (ukey >> np.uint64(48)).astype(np.int64)
    upg = ukey & np.uint64((1 << 48) - 1)
    # runs: same pid, consecutive page, same total weight
    new = np.ones(ukey.size, bool)
    new[1:] = (upid[1:] != upid[:-1]) | (upg[1:] != upg[:-1] + np.uint64(1)) | \
              (tot[1:] != tot[:-1])
    starts = np.nonzero(new)[0]
    ends = np.concatenate([starts[1:], [ukey.size]])
    per_page = tot[starts]
    order = np.argsort(-per_page, kind="stable")[:top]
    total = float(tot.sum()) or 1.0
    dur = float(rec.batch_t[-1, 1] - rec.batch_t[0, 0]) if rec.nr_batches else 0.0
    out = []
    for rank, i in enumerate(order, 1):
        s, e = starts[i], ends[i]
        n = int(e - s)
        out.append({"rank": rank, "pid": int(upid[s]),
                    "start": int(upg[s]) << PAGE_SHIFT, "end": int(upg[e - 1] + 1) << PAGE_SHIFT,
                    "bytes": n * PAGE_SIZE, "weight_per_page": float(per_page[i]),
                    "weight_per_page_per_s": float(per_page[i]) / dur if dur > 0 else 0.0,
                    "share": float(per_page[i] * n) / total})
    return out


def page_scores(rec: Record, pid: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(page numbers, total weight) over the whole record (for precision/recall checks)."""
    _, p, pg, w = _pages(rec)
    if pid is not None:
        keep = p == pid
        pg, w = pg[keep], w[keep]
    u, inv = np.unique(pg, return_inverse=True)
    return u, np.bincount(inv.ravel(), weights=w.astype(np.float64))


def precision_recall(pages: np.ndarray, scores: np.ndarray, truth: np.ndarray,
                     k: int) -> tuple[float, float]:
    """Precision and recall of the top-k pages by score (pages with score 0 never count as
    predicted hot) against the true hot page set. Ties are broken at random (fixed seed),
    so a sampler that cannot tell pages apart scores like a random guess."""
    truth = np.unique(np.asarray(truth, np.uint64))
    if k <= 0 or truth.size == 0:
        raise TiermemError("precision_recall: need k > 0 and a non-empty truth set")
    live = scores > 0
    pages, scores = pages[live], scores[live]
    tiebreak = np.random.default_rng(0).permutation(pages.size)
    order = np.lexsort((tiebreak, -scores))[:k]
    pred = pages[order]
    hit = np.isin(pred, truth).sum()
    prec = float(hit) / pred.size if pred.size else 0.0
    return prec, float(hit) / truth.size

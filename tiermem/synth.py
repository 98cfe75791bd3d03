"""Synthetic workload generators: each returns an tiermem.trace.Trace with word addresses.

All generators are vectorised and seeded (same arguments -> same trace). Sizes are in pages
(4 KiB) and accesses; every trace starts with an initialisation pass (one write per page in
address order) before the ``accesses`` of the workload itself. Hot pages are scattered over the footprint (a random permutation), so
address order says nothing about hotness.

- uniform:  every page and word equally likely.
- zipf:     page popularity ~ 1 / rank**alpha; words uniform within the page.
- gups:     GUPS-style read-modify-write of random 8-byte words; ``hot_frac`` of the table
            gets ``hot_prob`` of the updates (HeMem's hot-set GUPS).
- hotset:   a hot set of ``hot_frac`` pages gets ``hot_prob`` of the accesses and moves to
            a disjoint set of pages every ``period`` accesses.
- sparse:   Redis-like: every page uses only 25% of its words (``words_used`` of 64). A
            small set of dense hot pages (all 64 words hot) and a larger set of sparse hot
            pages (only ``sparse_hot_words`` words each, accessed as often per word as the
            dense words) compete for the fast tier; the rest is cold. Page-granularity
            samplers see both kinds as "accessed every interval".
- pagerank / bfs: a power-law graph in CSR form (offsets, edges, two rank/visited arrays)
            and the address stream of PageRank iterations or a BFS over it.
"""
from __future__ import annotations

import numpy as np

from tiermem.trace import Trace
from tiermem.access import PAGE_SIZE
from tiermem.errors import TiermemError

BASE_PAGE = 0x7F0000000   # user-space-like base page number for generated traces
WORKLOADS = ("uniform", "zipf", "gups", "hotset", "sparse", "pagerank", "bfs")


def _check(pages: int, accesses: int):
    if int(pages) < 1 or int(accesses) < 1:
        raise TiermemError(f"synthetic workload: pages ({pages}) and accesses ({accesses}) "
                           "must be >= 1")
    if int(pages) >= 2**32:
        raise TiermemError("synthetic workload: at most 2**32-1 pages")


def _trace(page_idx, word, pages, name, is_write=None, **meta) -> Trace:
    """The trace, preceded by an initialisation pass that writes word 0 of every page in
    address order (as malloc + memset would), so first-touch placement is by address, not by
    popularity."""
    init = np.arange(pages)
    n = len(page_idx)
    wr = np.concatenate([np.ones(pages, bool),
                         np.zeros(n, bool) if is_write is None else is_write])
    return Trace(np.zeros(pages, np.int32), BASE_PAGE + np.arange(pages, dtype=np.uint64),
                 np.concatenate([init, page_idx]).astype(np.uint32),
                 np.concatenate([np.zeros(pages), word]).astype(np.uint8),
                 wr, meta=dict(meta, source=f"synth:{name}", space="vaddr", sub_page=True,
                               sample_every=1, init_accesses=pages)).validated()


def uniform(pages: int = 16384, accesses: int = 4_000_000, seed: int = 1) -> Trace:
    _check(pages, accesses)
    rng = np.random.default_rng(seed)
    return _trace(rng.integers(0, pages, accesses), rng.integers(0, 64, accesses), pages,
                  "uniform")


def zipf_ranks(n_items: int, count: int, alpha: float, rng) -> np.ndarray:
    """``count`` ranks in [0, n_items) with P(rank k) ~ 1/(k+1)**alpha (inverse CDF)."""
    w = 1.0 / np.arange(1, n_items + 1, dtype=np.float64) ** alpha
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, rng.random(count)), n_items - 1)


def zipf(pages: int = 16384, accesses: int = 4_000_000, alpha: float = 0.99,
         seed: int = 1) -> Trace:
    _check(pages, accesses)
    if not alpha > 0:
        raise TiermemError(f"zipf: alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(pages)
    return _trace(perm[zipf_ranks(pages, accesses, alpha, rng)],
                  rng.integers(0, 64, accesses), pages, "zipf", alpha=alpha)


def gups(pages: int = 16384, accesses: int = 4_000_000, hot_frac: float = 0.1,
         hot_prob: float = 0.9, seed: int = 1) -> Trace:
    """Each update is a read then a write of the same word (two accesses)."""
    _check(pages, accesses)
    if not (0 < hot_frac <= 1 and 0 <= hot_prob <= 1):
        raise TiermemError("gups: need 0 < hot_frac <= 1 and 0 <= hot_prob <= 1")
    rng = np.random.default_rng(seed)
    n_up = max(accesses // 2, 1)
    perm = rng.permutation(pages)
    n_hot = max(int(pages * hot_frac), 1)
    hot = rng.random(n_up) < hot_prob
    pg = np.where(hot, perm[rng.integers(0, n_hot, n_up)],
                  perm[rng.integers(0, pages, n_up)])
    wd = rng.integers(0, 64, n_up)
    return _trace(np.repeat(pg, 2), np.repeat(wd, 2), pages, "gups",
                  np.tile([False, True], n_up), hot_frac=hot_frac, hot_prob=hot_prob)


def hotset(pages: int = 16384, accesses: int = 4_000_000, hot_frac: float = 0.1,
           hot_prob: float = 0.9, period: int = 1_000_000, seed: int = 1) -> Trace:
    _check(pages, accesses)
    if not (0 < hot_frac <= 0.5 and 0 <= hot_prob <= 1 and period >= 1):
        raise TiermemError("hotset: need 0 < hot_frac <= 0.5, 0 <= hot_prob <= 1, period >= 1")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(pages)
    n_hot = max(int(pages * hot_frac), 1)
    phase = np.arange(accesses) // period
    # phase k uses hot pages perm[(k * n_hot + j) % pages]: disjoint sets while they fit
    off = rng.integers(0, n_hot, accesses)
    hot_pg = perm[(phase * n_hot + off) % pages]
    hot = rng.random(accesses) < hot_prob
    pg = np.where(hot, hot_pg, rng.integers(0, pages, accesses))
    return _trace(pg, rng.integers(0, 64, accesses), pages, "hotset", hot_frac=hot_frac,
                  hot_prob=hot_prob, period=period)


def sparse(pages: int = 16384, accesses: int = 4_000_000, dense_frac: float = 0.10,
           sparse_frac: float = 0.40, hot_prob: float = 0.9, words_used: int = 16,
           sparse_hot_words: int = 16, seed: int = 1) -> Trace:
    """Dense hot pages: all 64 words hot. Sparse hot pages: ``sparse_hot_words`` hot words.
    Each hot word gets the same access rate, so a dense page is 64/sparse_hot_words times
    hotter than a sparse one; cold accesses touch the ``words_used`` used words of any page."""
    _check(pages, accesses)
    if not (0 < dense_frac and 0 < sparse_frac and dense_frac + sparse_frac <= 1
            and 1 <= sparse_hot_words <= words_used <= 64 and 0 <= hot_prob <= 1):
        raise TiermemError("sparse: need dense_frac, sparse_frac > 0 with sum <= 1, "
                           "1 <= sparse_hot_words <= words_used <= 64, 0 <= hot_prob <= 1")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(pages)
    nd = max(int(pages * dense_frac), 1)
    ns = max(int(pages * sparse_frac), 1)
    # each page's used words: a per-page random rotation of a spread-out word set
    stride = 64 // words_used
    rot = rng.integers(0, 64, pages)
    n_hot_words = nd * 64 + ns * sparse_hot_words
    is_hot = rng.random(accesses) < hot_prob
    h = rng.integers(0, n_hot_words, accesses)          # a hot word, uniformly
    dense_part = h < nd * 64
    hp = np.where(dense_part, perm[np.minimum(h // 64, nd - 1)],
                  perm[nd + np.maximum(h - nd * 64, 0) // sparse_hot_words])
    hw = np.where(dense_part, h % 64,
                  (rot[hp] + (np.maximum(h - nd * 64, 0) % sparse_hot_words) * stride) % 64)
    cp = rng.integers(0, pages, accesses)
    cw = (rot[cp] + rng.integers(0, words_used, accesses) * stride) % 64
    return _trace(np.where(is_hot, hp, cp), np.where(is_hot, hw, cw), pages, "sparse",
                  dense_frac=dense_frac, sparse_frac=sparse_frac, words_used=words_used,
                  sparse_hot_words=sparse_hot_words, hot_prob=hot_prob)


def _powerlaw_graph(vertices: int, avg_degree: int, rng):
    """CSR of a directed graph whose endpoints follow a Zipf(0.8) popularity."""
    m = vertices * avg_degree
    src = np.sort(zipf_ranks(vertices, m, 0.6, rng))
    dst = rng.permutation(vertices)[zipf_ranks(vertices, m, 0.8, rng)]
    offsets = np.zeros(vertices + 1, np.int64)
    np.cumsum(np.bincount(src, minlength=vertices), out=offsets[1:])
    return offsets, dst


def _graph_layout(vertices: int, edges: int):
    """Byte offsets of the arrays: offsets (8 B), edges (4 B), a (8 B), b (8 B), page-aligned."""
    def up(x):
        return (x + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
    o_off = 0
    o_edge = up(o_off + 8 * (vertices + 1))
    o_a = up(o_edge + 4 * edges)
    o_b = up(o_a + 8 * vertices)
    end = up(o_b + 8 * vertices)
    return o_off, o_edge, o_a, o_b, end


def _graph_trace(byte_addr: np.ndarray, is_write: np.ndarray, end: int, name: str,
                 **meta) -> Trace:
    pages = end // PAGE_SIZE
    return _trace(byte_addr // PAGE_SIZE, (byte_addr % PAGE_SIZE) // 64, pages, name,
                  is_write, **meta)


def pagerank(vertices: int = 200_000, avg_degree: int = 8, iterations: int = 2,
             seed: int = 1) -> Trace:
    """Pull-style PageRank: per vertex v, read offsets[v], then per edge read edges[e] and
    a[edges[e]] (the irregular, skewed part), then write b[v]."""
    if vertices < 2 or avg_degree < 1 or iterations < 1:
        raise TiermemError("pagerank: need vertices >= 2, avg_degree >= 1, iterations >= 1")
    rng = np.random.default_rng(seed)
    off, dst = _powerlaw_graph(vertices, avg_degree, rng)
    o_off, o_edge, o_a, o_b, end = _graph_layout(vertices, dst.size)
    deg = np.diff(off)
    # one iteration's stream: [off[v], (edge e, a[dst[e]])*, b[v]] for each v
    per_v = 2 + 2 * deg
    start = np.concatenate([[0], np.cumsum(per_v)[:-1]])
    n = int(per_v.sum())
    addr = np.empty(n, np.int64)
    wr = np.zeros(n, bool)
    addr[start] = o_off + 8 * np.arange(vertices)
    addr[start + per_v - 1] = o_b + 8 * np.arange(vertices)
    wr[start + per_v - 1] = True
    ev = np.repeat(np.arange(vertices), deg)                 # vertex of each edge
    k = np.arange(dst.size) - off[ev]                        # edge rank within its vertex
    pos = start[ev] + 1 + 2 * k
    addr[pos] = o_edge + 4 * np.arange(dst.size)
    addr[pos + 1] = o_a + 8 * dst
    it_addr = [addr]
    it_wr = [wr]
    for i in range(1, iterations):  # the arrays swap roles each iteration
        a2 = addr.copy()
        sw_a = (addr >= o_a) & (addr < o_b)
        sw_b = addr >= o_b
        a2[sw_a] += o_b - o_a
        a2[sw_b] -= o_b - o_a
        it_addr.append(a2 if i % 2 else addr)
        it_wr.append(wr)
    return _graph_trace(np.concatenate(it_addr), np.concatenate(it_wr), end, "pagerank",
                        vertices=vertices, avg_degree=avg_degree, iterations=iterations)


def bfs(vertices: int = 200_000, avg_degree: int = 8, sources: int = 2, seed: int = 1) -> Trace:
    """Top-down BFS from ``sources`` random roots: per frontier vertex read offsets and its
    edges, check visited[dst] (array a), write parent[dst] (array b) for new vertices."""
    if vertices < 2 or avg_degree < 1 or sources < 1:
        raise TiermemError("bfs: need vertices >= 2, avg_degree >= 1, sources >= 1")
    rng = np.random.default_rng(seed)
    off, dst = _powerlaw_graph(vertices, avg_degree, rng)
    o_off, o_edge, o_a, o_b, end = _graph_layout(vertices, dst.size)
    deg = np.diff(off)
    streams, writes = [], []
    for root in rng.integers(0, vertices, sources):
        visited = np.zeros(vertices, bool)
        visited[root] = True
        frontier = np.array([root])
        while frontier.size:
            d = deg[frontier]
            ev = np.repeat(frontier, d)
            eidx = np.repeat(off[frontier], d) + (np.arange(d.sum()) -
                                                 np.repeat(np.cumsum(d) - d, d))
            nb = dst[eidx]
            fresh_first = np.zeros(nb.size, bool)
            if nb.size:
                u, first = np.unique(nb, return_index=True)
                keep = first[~visited[u]]
                fresh_first[keep] = True
            # per edge: read edge, read visited[nb]; plus write parent for fresh ones
            s = np.stack([o_edge + 4 * eidx, o_a + 8 * nb], axis=1).ravel()
            streams.append(o_off + 8 * frontier)
            writes.append(np.zeros(frontier.size, bool))
            streams.append(s)
            writes.append(np.zeros(s.size, bool))
            newv = nb[fresh_first]
            streams.append(o_b + 8 * newv)
            writes.append(np.ones(newv.size, bool))
            visited[newv] = True
            frontier = newv
        del ev
    return _graph_trace(np.concatenate(streams).astype(np.int64), np.concatenate(writes),
                        end, "bfs", vertices=vertices, avg_degree=avg_degree, sources=sources)


def generate(name: str, **kw) -> Trace:
    """A workload by name with keyword parameters (the CLI's ``--workload`` path)."""
    fn = {"uniform": uniform, "zipf": zipf, "gups": gups, "hotset": hotset, "sparse": sparse,
          "pagerank": pagerank, "bfs": bfs}.get(name)
    if fn is None:
        raise TiermemError(f"unknown workload {name!r} (known: {', '.join(WORKLOADS)})")
    try:
        return fn(**kw)
    except TypeError as e:
        raise TiermemError(f"workload {name}: {e}") from None

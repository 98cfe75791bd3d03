"""The record file: what `tiermem record` writes and `tiermem report` / the trace sampler read.

Format "tiermem-record", version 1: a numpy .npz archive (zip, deflate-compressed) with

===============  ===========  ==============================================================
``meta``         str          JSON object: format, version, sampler, sampler_meta (its
                              intervals/modes), space ('vaddr'|'paddr'), sub_page, kernel,
                              hostname, target {pids, phys_ranges}, interval_s, started
                              (Unix time), duration_s, nr_batches, cpu_seconds (sampler's
                              own, incl. kernel threads/BPF), setup_cpu_seconds, and
                              ``ended_early`` (reason) when the target went away
``batch_t``      float64[B,2] per batch: t_start, t_end in seconds since the record started
``batch_off``    uint64[B+1]  batch b is spans batch_off[b] .. batch_off[b+1]-1
``pid``          int32[S]     process of each span (0 for physical addresses)
``addr``         uint64[S]    first byte of the span
``length``       uint64[S]    bytes (4096 for a page, 64 for a word, any size for a region)
``weight``       float32[S]   accesses counted for every 4 KiB page the span covers
===============  ===========  ==============================================================

A span is what the sampler saw: a DAMON region, a page, or a 64-byte word. Readers expand
spans to pages with tiermem.samplers.base.Spans.to_batch(). Files are written to a
temporary name in the target directory and renamed, so a crash never leaves half a file.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import time
import zipfile
from dataclasses import dataclass, field

import numpy as np

from tiermem.errors import TiermemError
from tiermem.npzfile import read_meta, save_atomic
from tiermem.samplers.base import Spans

FORMAT = "tiermem-record"
VERSION = 1


@dataclass
class Record:
    meta: dict
    batch_t: np.ndarray                    # float64 [B, 2]
    batch_off: np.ndarray                  # uint64 [B+1]
    pid: np.ndarray
    addr: np.ndarray
    length: np.ndarray
    weight: np.ndarray
    extra: dict = field(default_factory=dict)

    @property
    def nr_batches(self) -> int:
        return int(self.batch_t.shape[0])

    @property
    def space(self) -> str:
        return self.meta.get("space", "vaddr")

    @property
    def sub_page(self) -> bool:
        return bool(self.meta.get("sub_page", False))

    def spans(self, b: int) -> Spans:
        lo, hi = int(self.batch_off[b]), int(self.batch_off[b + 1])
        return Spans(self.pid[lo:hi], self.addr[lo:hi], self.length[lo:hi],
                     self.weight[lo:hi], self.sub_page, self.space,
                     float(self.batch_t[b, 0]), float(self.batch_t[b, 1]))

    def all_spans(self) -> Spans:
        t_end = float(self.batch_t[-1, 1]) if self.nr_batches else 0.0
        return Spans(self.pid, self.addr, self.length, self.weight, self.sub_page,
                     self.space, 0.0, t_end)

    def batch_index(self) -> np.ndarray:
        """Batch number of every span."""
        counts = np.diff(self.batch_off.astype(np.int64))
        return np.repeat(np.arange(self.nr_batches), counts)

    # --- building ------------------------------------------------------------------------
    @classmethod
    def from_spans(cls, batches: list[Spans], meta: dict, t0: float) -> "Record":
        n = [len(s) for s in batches]
        off = np.zeros(len(batches) + 1, np.uint64)
        off[1:] = np.cumsum(n)
        bt = np.array([[s.t_start - t0, s.t_end - t0] for s in batches], np.float64) \
            .reshape(len(batches), 2)

        def cat(name, dt):
            parts = [getattr(s, name) for s in batches]
            return np.concatenate(parts).astype(dt) if parts else np.empty(0, dt)
        spaces = {s.space for s in batches}
        if len(spaces) > 1:
            raise TiermemError(f"record: batches from several address spaces {sorted(spaces)}")
        m = dict(meta)
        if batches:
            m["space"] = spaces.pop()
            m["sub_page"] = bool(batches[0].sub_page)
        m.setdefault("space", "vaddr")
        m.setdefault("sub_page", False)
        return cls(m, bt, off, cat("pid", np.int32), cat("addr", np.uint64),
                   cat("length", np.uint64), cat("weight", np.float32))

    # --- files ---------------------------------------------------------------------------
    def save(self, path: str) -> None:
        meta = dict(self.meta, format=FORMAT, version=VERSION, nr_batches=self.nr_batches)
        arrays = {"meta": np.array(json.dumps(meta)), "batch_t": self.batch_t,
                  "batch_off": self.batch_off, "pid": self.pid, "addr": self.addr,
                  "length": self.length, "weight": self.weight}
        save_atomic(path, arrays, "record", compressed=True)


def load(path: str) -> Record:
    """Read and check a record; any problem is one TiermemError naming the file."""
    where = f"record {path}"
    if not os.path.isfile(path):
        raise TiermemError(f"{where}: no such file")
    want = {"batch_t": np.float64, "batch_off": np.uint64, "pid": np.int32,
            "addr": np.uint64, "length": np.uint64, "weight": np.float32}
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            missing = ({"meta"} | set(want)) - files
            if missing:
                raise TiermemError(f"{where}: not a tiermem record (missing "
                                   f"{', '.join(sorted(missing))})")
            meta = read_meta(z, where, FORMAT, VERSION, "record")
            arr = {}
            for name, dt in want.items():
                a = z[name]
                if a.dtype != dt:
                    raise TiermemError(f"{where}: {name} has dtype {a.dtype}, expected "
                                       f"{np.dtype(dt)}")
                arr[name] = a
    except TiermemError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise TiermemError(f"{where}: corrupt or truncated ({type(e).__name__}: {e})") from None
    r = Record(meta, **arr)
    _validate(r, where)
    return r


def _validate(r: Record, where: str) -> None:
    b = r.batch_t.shape[0] if r.batch_t.ndim == 2 else -1
    if r.batch_t.ndim != 2 or r.batch_t.shape[1] != 2:
        raise TiermemError(f"{where}: batch_t must have shape [B, 2]")
    if r.batch_off.shape != (b + 1,):
        raise TiermemError(f"{where}: batch_off must have {b + 1} entries")
    s = r.addr.size
    for name in ("pid", "length", "weight"):
        if getattr(r, name).shape != (s,):
            raise TiermemError(f"{where}: {name} has {getattr(r, name).size} entries, "
                               f"addr has {s}")
    if int(r.batch_off[0]) != 0 or int(r.batch_off[-1]) != s or \
            (np.diff(r.batch_off.astype(np.int64)) < 0).any():
        raise TiermemError(f"{where}: batch_off is not a non-decreasing 0..{s} index")
    if not np.isfinite(r.batch_t).all() or (r.batch_t[:, 1] < r.batch_t[:, 0]).any():
        raise TiermemError(f"{where}: batch times are not finite intervals")
    if s and (not np.isfinite(r.weight).all() or (r.weight < 0).any()):
        raise TiermemError(f"{where}: weights must be finite and >= 0")
    if r.meta.get("space") not in ("vaddr", "paddr"):
        raise TiermemError(f"{where}: meta.space must be vaddr or paddr")
    if int(r.meta.get("nr_batches", b)) != b:
        raise TiermemError(f"{where}: meta says {r.meta.get('nr_batches')} batches, file has {b}")


# --- recording -----------------------------------------------------------------------------

def process_alive(pid: int) -> bool:
    """True while pid runs (a zombie, exited but not yet reaped, counts as gone)."""
    import psutil
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def base_meta(sampler, target) -> dict:
    return {"sampler": sampler.name, "kernel": platform.release(),
            "hostname": socket.gethostname(),
            "target": {"pids": list(target.pids),
                       "phys_ranges": [list(map(int, r)) for r in target.phys_ranges]}}


def record(sampler, target, duration: float, interval: float, progress=None) -> Record:
    """Run sampler on target for duration seconds, reading every interval seconds.

    The sampler is started here and always stopped. If a target process goes away, the
    batches read until then are kept and meta['ended_early'] says why."""
    if not duration > 0:
        raise TiermemError(f"duration must be > 0 s, got {duration}")
    if not 0 < interval <= duration:
        raise TiermemError(f"interval must be > 0 s and <= duration ({duration} s), "
                           f"got {interval}")
    meta = base_meta(sampler, target)
    batches: list[Spans] = []
    ended = ""
    t_wall = time.time()
    with sampler:
        sampler.start(target)
        t0 = time.monotonic()
        next_t = t0
        try:
            while True:
                next_t += interval
                time.sleep(max(0.0, next_t - time.monotonic()))
                gone = [p for p in target.pids if not process_alive(p)]
                try:
                    batches.append(sampler.read_spans())
                except TiermemError as e:
                    ended = str(e)
                    break
                if gone:
                    ended = f"process {', '.join(map(str, gone))} exited"
                    break
                el = time.monotonic() - t0
                if progress:
                    progress(min(el, duration), duration, len(batches))
                if el >= duration - 1e-3:
                    break
        except KeyboardInterrupt:
            ended = "interrupted (SIGINT)"
        meta["sampler_meta"] = sampler.metadata()
        meta["cpu_seconds"] = sampler.cpu_seconds()
        meta["setup_cpu_seconds"] = getattr(sampler, "setup_cpu", 0.0)
    meta.update(interval_s=interval, started=t_wall, duration_s=time.monotonic() - t0)
    if ended:
        meta["ended_early"] = ended
    if not batches:
        batches = []
        meta.setdefault("space", getattr(sampler, "space", "vaddr"))
    return Record.from_spans(batches, meta, t0)


def to_trace(rec: Record):
    """The record as an tiermem.trace.Trace (pages with weights; epoch = batch), so the
    simulator can replay what a live sampler saw."""
    from tiermem.trace import Trace
    parts, eps = [], []
    for b in range(rec.nr_batches):
        bt = rec.spans(b).to_batch()
        parts.append(bt)
        eps.append(np.full(len(bt), b, np.uint32))
    if not parts or not sum(len(p) for p in parts):
        raise TiermemError("record has no accesses to turn into a trace")
    addr = np.concatenate([p.addr for p in parts])
    pid = np.concatenate([p.pid for p in parts])
    w = np.concatenate([p.weight for p in parts])
    return Trace.from_addresses(addr, pid=pid, sub_page=rec.sub_page, space=rec.space,
                                weight=w, epoch=np.concatenate(eps),
                                source=f"tiermem record ({rec.meta.get('sampler')})")

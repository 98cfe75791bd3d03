"""Capture a real program's memory accesses into a trace with valgrind's lackey, sampled.

``valgrind --tool=lackey --trace-mem=yes`` prints one line per data access
(`` L addr,size`` load, `` S`` store, `` M`` modify = load + store) to a pipe; we parse it as a
stream in 4 MiB chunks and keep each data access with probability 1/``sample_every`` (so a
long run stays small), never holding the raw text in memory. Program order is kept; each
kept access has weight ``sample_every``. Instruction fetches are ignored. Lackey runs the
program ~50-100x slower than native.

The tracer dies with us: valgrind (which ignores SIGTERM) gets SIGKILL from the kernel when
the process that started it dies (PR_SET_PDEATHSIG), even by SIGKILL. Ctrl-C (SIGINT) stops
the capture and returns what was kept so far, as ``perf record`` does (meta
``interrupted``). With ``follow_exec`` (the default) valgrind follows exec
(``--trace-children=yes``), so a wrapper (``env``, a pyenv shim, a shell script) is traced
through to the real program; valgrind cannot tell the first program's exec from a child's, so
children that exec are traced too.

Also: ``trace_from_batches`` turns sampler records (AccessBatch objects, e.g. recorded by the
daemon) into a trace whose ``epoch`` column keeps the batch boundaries, for replay.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import threading
import time

import numpy as np

from tiermem.trace import Trace
from tiermem.access import AccessBatch
from tiermem.errors import TiermemError

CHUNK = 4 << 20
PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int):
    """preexec_fn: SIGKILL this child when the process that forked it dies."""
    def set_pdeathsig():
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(127)
        if os.getppid() != parent:           # the parent died before prctl took effect
            os._exit(127)
    return set_pdeathsig


def parse_lackey_lines(lines: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(addresses uint64, is_write bool) of the data-access lines among ``lines``.
    Raises TiermemError on a data line that does not parse."""
    addrs, writes = [], []
    for ln in lines:
        if len(ln) < 4 or ln[0] != 32 or ln[1] not in b"LSM":
            continue
        comma = ln.find(b",", 3)
        try:
            a = int(ln[3:comma if comma > 0 else None], 16)
        except ValueError:
            raise TiermemError(f"lackey output: cannot parse {ln[:60]!r}") from None
        addrs.append(a)
        writes.append(ln[1] != 76)     # 'L' = 76 is a load; S and M write
    return np.array(addrs, dtype=np.uint64), np.array(writes, dtype=bool)


_HEX = np.full(256, -1, np.int16)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)
_WIN = 17                     # up to 16 hex digits and the comma


def sample_lackey_chunk(buf: bytes, rng, sample_every: int, limit: int | None = None):
    """Vectorised: (addresses, is_write, data lines seen, unfinished tail) of the complete
    lines in ``buf``, keeping each data access with probability 1/sample_every. The same
    lines as ``parse_lackey_lines`` are data lines; the Python loop over every line cost as
    much CPU as lackey itself. ``limit``: only the first that many data lines count."""
    b = np.frombuffer(buf, np.uint8)
    nl = np.flatnonzero(b == 10)
    if nl.size == 0:
        return np.empty(0, np.uint64), np.empty(0, bool), 0, buf
    tail = buf[int(nl[-1]) + 1:]
    starts = np.empty(nl.size, np.int64)
    starts[0] = 0
    starts[1:] = nl[:-1] + 1
    sp = starts[(nl - starts >= 1) & (b[starts] == 32)]      # lines starting with ' '
    if limit is not None:
        sp = sp[:max(0, limit)]
    seen = int(sp.size)
    long_enough = nl[np.searchsorted(nl, sp)] - sp >= 4
    kind = b[np.minimum(sp + 1, b.size - 1)]
    data = sp[long_enough & ((kind == 76) | (kind == 83) | (kind == 77))]
    sel = data[rng.random(data.size) < 1.0 / sample_every]
    if not sel.size:
        return np.empty(0, np.uint64), np.empty(0, bool), seen, tail
    idx = np.minimum(sel[:, None] + 3 + np.arange(_WIN), b.size - 1)
    ch = b[idx]
    val = _HEX[ch]
    digit = np.cumprod(val >= 0, axis=1).astype(bool)
    nd = digit.sum(axis=1)
    term = ch[np.arange(sel.size), np.minimum(nd, _WIN - 1)]
    bad = (nd == 0) | (nd > 16) | (term != 44)
    if bad.any():
        i = int(sel[np.argmax(bad)])
        raise TiermemError(f"lackey output: cannot parse {bytes(buf[i:i + 60])!r}")
    shift = ((nd[:, None] - 1 - np.arange(_WIN)) * 4).clip(0).astype(np.uint64)
    addr = np.where(digit, val.clip(0).astype(np.uint64) << shift, np.uint64(0)).sum(
        axis=1, dtype=np.uint64)
    return addr, b[sel + 1] != 76, seen, tail


def capture(cmd: list[str], sample_every: int = 16, max_samples: int = 20_000_000,
            seed: int = 1, progress=None, valgrind: str | None = None,
            stdout=None, follow_exec: bool = True,
            max_accesses: int | None = None) -> Trace:
    """Run ``cmd`` under lackey; returns the sampled trace (sub_page, vaddr, weight =
    sample_every). ``progress(data_accesses_seen, kept)`` is called after each chunk. A
    SIGINT (Ctrl-C, in the main thread) stops the program and returns what was kept;
    so does ``max_accesses``: the program is stopped once that many data accesses were seen
    (a deterministic prefix of a long run; meta ``stopped_at_accesses``)."""
    if not cmd:
        raise TiermemError("trace: no command given (usage: tiermem trace -o T.npz -- CMD ARGS)")
    if sample_every < 1:
        raise TiermemError(f"trace: sample_every must be >= 1, got {sample_every}")
    vg = valgrind or shutil.which("valgrind")
    if not vg:
        raise TiermemError("trace: valgrind not found on PATH (Debian: apt-get install valgrind)")
    if shutil.which(cmd[0]) is None and not os.path.isfile(cmd[0]):
        raise TiermemError(f"trace: command not found: {cmd[0]}")
    rng = np.random.default_rng(seed)
    r, w = os.pipe()
    try:
        proc = subprocess.Popen([vg, "--tool=lackey", "--trace-mem=yes", f"--log-fd={w}",
                                 f"--trace-children={'yes' if follow_exec else 'no'}",
                                 *cmd], pass_fds=(w,), stdin=subprocess.DEVNULL,
                                stdout=stdout, preexec_fn=_die_with_parent(os.getpid()))
    except OSError as e:
        os.close(r)
        os.close(w)
        raise TiermemError(f"trace: cannot start valgrind: {e.strerror}") from None
    os.close(w)
    kept_a, kept_w = [], []
    seen = kept = 0
    tail = b""
    interrupted = capped = False

    def on_sigint(signum, frame):            # stop the program; the loop then sees EOF
        nonlocal interrupted
        interrupted = True
        proc.kill()
    old_sigint = None
    if threading.current_thread() is threading.main_thread():
        old_sigint = signal.signal(signal.SIGINT, on_sigint)
    try:
        with os.fdopen(r, "rb", buffering=0) as f:
            while True:
                buf = f.read(CHUNK)
                if not buf:
                    break
                if capped:                    # stopped: drain the pipe, keep nothing more
                    continue
                a, wr, n, tail = sample_lackey_chunk(
                    tail + buf, rng, sample_every,
                    None if max_accesses is None else max_accesses - seen)
                seen += n
                if kept < max_samples and a.size:
                    a, wr = a[: max_samples - kept], wr[: max_samples - kept]
                    kept_a.append(a)
                    kept_w.append(wr)
                    kept += a.size
                if progress is not None:
                    progress(seen, kept)
                if max_accesses is not None and seen >= max_accesses and not interrupted:
                    interrupted = capped = True
                    proc.kill()
            if tail and not capped:
                a, wr = parse_lackey_lines([tail])
                seen += a.size
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        if old_sigint is not None:
            signal.signal(signal.SIGINT, old_sigint)
    rc = proc.wait()
    if rc != 0 and not interrupted:
        raise TiermemError(f"trace: {' '.join(cmd)} exited with status {rc} under valgrind; "
                           "no trace written")
    if kept == 0:
        if interrupted:
            raise TiermemError("trace: interrupted before any access was kept; no trace "
                               "written")
        raise TiermemError("trace: no memory accesses recorded (program too short for the "
                           f"sampling rate 1/{sample_every}?)")
    addr = np.concatenate(kept_a)
    return Trace.from_addresses(addr, pid=proc.pid, is_write=np.concatenate(kept_w),
                                sub_page=True, space="vaddr",
                                weight=np.full(addr.size, sample_every, np.float32),
                                source="lackey", command=" ".join(cmd),
                                sample_every=sample_every, data_accesses=seen,
                                interrupted=interrupted, follow_exec=follow_exec,
                                stopped_at_accesses=max_accesses if capped else None,
                                captured_at=time.strftime("%Y-%m-%dT%H:%M:%S"))


def trace_from_batches(batches) -> Trace:
    """A replayable trace from sampler records: one epoch per batch, weights kept."""
    batches = [b for b in batches if len(b)]
    if not batches:
        raise TiermemError("sampler records: no samples to replay")
    spaces = {b.space for b in batches}
    if len(spaces) != 1:
        raise TiermemError(f"sampler records: mixed address spaces {sorted(spaces)}")
    b = AccessBatch.concat(batches)
    epoch = np.repeat(np.arange(len(batches), dtype=np.uint32), [len(x) for x in batches])
    return Trace.from_addresses(b.addr, pid=b.pid, is_write=b.is_write, sub_page=b.sub_page,
                                space=b.space, weight=b.weight, epoch=epoch,
                                source="sampler", intervals_s=[x.duration for x in batches])

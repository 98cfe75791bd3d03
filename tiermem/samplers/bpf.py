"""bcc plumbing shared by the BPF-based samplers: load a program (with a precise error when
bcc or kernel headers are missing), drain a BPF hash map into numpy arrays in batches, and
measure the programs' own run time with the kernel's BPF statistics.
"""
from __future__ import annotations

import ctypes as ct
import errno
import os

import numpy as np

from tiermem import kfs
from tiermem.errors import TiermemError

_SYS_BPF = 321                  # x86_64
_BPF_ENABLE_STATS = 32
_BPF_STATS_RUN_TIME = 0
_libc = ct.CDLL(None, use_errno=True)


def bcc_available() -> tuple[bool, str]:
    try:
        import bcc  # noqa: F401  (the import is the check)
    except ImportError:
        return False, ("bcc is not importable: install Debian's python3-bpfcc and use a "
                       "python with system site packages (make setup)")
    build = f"/lib/modules/{os.uname().release}/build"
    if not os.path.exists(build):
        return False, (f"no kernel headers for bcc at {build}: run scripts/bcc-headers.sh "
                       "(make setup does)")
    return True, ""


def tracepoint_ready(event: str, missing: str) -> tuple[bool, str]:
    """Whether a bcc program on tracepoint `event` ("category/name") can run here: bcc and
    headers, tracefs mounted, the event present (else `missing` is the reason)."""
    ok, why = bcc_available()
    if not ok:
        return ok, why
    try:
        kfs.ensure_tracefs()
    except TiermemError as e:
        return False, str(e)
    if not kfs.exists(f"{kfs.TRACEFS}/events/{event}"):
        return False, missing
    return True, ""


def load(text: str, cflags=()):
    """Compile and load a bcc program; TiermemError with bcc's reason on failure."""
    ok, why = bcc_available()
    if not ok:
        raise TiermemError(why)
    kfs.ensure_tracefs()
    import bcc
    try:
        # bytes, not str: bcc warns (DeprecationWarning) with the whole program text otherwise
        return bcc.BPF(text=text.encode(), cflags=["-Wno-ignored-attributes", *cflags])
    except Exception as e:  # bcc raises plain Exception on compile/load errors
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise TiermemError(f"cannot load the BPF program: {msg}") from e


class DrainBuffers:
    """Reusable key/value arrays for drain_hash (allocated once per sampler)."""

    def __init__(self, key_dtype: np.dtype, val_dtype: np.dtype, max_entries: int):
        self.keys = np.empty(max_entries, key_dtype)
        self.vals = np.empty(max_entries, val_dtype)


def drain_hash(table, bufs: DrainBuffers, delete: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """All (key, value) pairs of a BPF hash map as numpy structured arrays (copies), with the
    kernel's batch lookup(-and-delete): one syscall per chunk, no per-entry Python."""
    from bcc.libbcc import lib
    keys, vals = bufs.keys, bufs.vals
    key_dtype, val_dtype, max_entries = keys.dtype, vals.dtype, keys.size
    fn = lib.bpf_lookup_and_delete_batch if delete else lib.bpf_lookup_batch
    in_b = ct.c_uint64(0)
    out_b = ct.c_uint64(0)
    cnt = ct.c_uint32(0)
    total = 0
    first = True
    while total < max_entries:
        cnt.value = max_entries - total
        res = fn(table.map_fd, None if first else ct.cast(ct.byref(in_b), ct.POINTER(ct.c_uint32)),
                 ct.cast(ct.byref(out_b), ct.POINTER(ct.c_uint32)),
                 ct.c_void_p(keys.ctypes.data + total * key_dtype.itemsize),
                 ct.c_void_p(vals.ctypes.data + total * val_dtype.itemsize), ct.byref(cnt))
        err = ct.get_errno()
        total += cnt.value
        if res != 0:
            if err == errno.ENOENT:
                break
            if err == errno.ENOSPC:
                # the next bucket holds more entries than the room left (entries added
                # while draining): they stay in the map for the next read
                break
            raise TiermemError(f"BPF map batch lookup failed: {os.strerror(err)}")
        in_b.value = out_b.value
        first = False
    return keys[:total].copy(), vals[:total].copy()


class BpfStats:
    """Keeps the kernel's BPF run-time statistics on while open (BPF_ENABLE_STATS: an fd,
    closed automatically if the process dies, so nothing is left behind)."""

    def __init__(self):
        attr = (ct.c_uint32 * 32)()
        attr[0] = _BPF_STATS_RUN_TIME
        fd = _libc.syscall(_SYS_BPF, _BPF_ENABLE_STATS, ct.byref(attr), ct.sizeof(attr))
        self.fd = fd if fd >= 0 else -1
        self.error = "" if fd >= 0 else os.strerror(ct.get_errno())

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def prog_run_ns(bpf) -> int:
    """Sum of run_time_ns over the programs a bcc.BPF object loaded (needs BpfStats open)."""
    total = 0
    for fn in getattr(bpf, "funcs", {}).values():
        fd = getattr(fn, "fd", -1)
        if fd is None or fd < 0:
            continue
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("run_time_ns:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def prog_ids(bpf) -> list[int]:
    """Kernel ids of the programs a bcc.BPF object loaded (from /proc/self/fdinfo)."""
    ids = []
    for fn in getattr(bpf, "funcs", {}).values():
        fd = getattr(fn, "fd", -1)
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("prog_id:"):
                        ids.append(int(line.split()[1]))
        except (OSError, TypeError):
            pass
    return ids

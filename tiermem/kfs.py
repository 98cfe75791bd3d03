"""All reads and writes of kernel files (sysfs, procfs, tracefs, debugfs) go through here.

One place to see what tiermem touches in the kernel, to turn kernel errors into clear
messages, and to point the whole library at another root for parsing tests (TIERMEM_SYSROOT).
"""
from __future__ import annotations

import os
import platform
import re

from tiermem.errors import TiermemError

ROOT = os.environ.get("TIERMEM_SYSROOT", "")


def path(p: str) -> str:
    return ROOT + p if ROOT else p


def exists(p: str) -> bool:
    return os.path.exists(path(p))


def read(p: str, default: str | None = None) -> str:
    """Text of a kernel file, stripped. With default, a missing/unreadable file gives default."""
    try:
        with open(path(p)) as f:
            return f.read().strip()
    except OSError as e:
        if default is not None:
            return default
        raise TiermemError(f"cannot read {p}: {e.strerror}") from e


def read_int(p: str, default: int | None = None) -> int:
    s = read(p, None if default is None else "")
    if s == "" and default is not None:
        return default
    try:
        return int(s.split()[0])
    except (ValueError, IndexError) as e:
        raise TiermemError(f"{p}: expected an integer, got {s!r}") from e


def write(p: str, value) -> None:
    try:
        with open(path(p), "w") as f:
            f.write(str(value))
    except OSError as e:
        raise TiermemError(f"cannot write {value!r} to {p}: {e.strerror}") from e


def listdir(p: str) -> list[str]:
    try:
        return sorted(os.listdir(path(p)))
    except OSError:
        return []


def parse_cpulist(s: str) -> list[int]:
    """'0-3,8,10-11' -> [0,1,2,3,8,10,11] (the kernel's cpulist/nodelist format)."""
    out: list[int] = []
    for part in s.strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def kernel_version() -> tuple[int, int]:
    """(major, minor) of the running kernel, e.g. (6, 12)."""
    m = re.match(r"(\d+)\.(\d+)", platform.release())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def kernel_config(option: str) -> str | None:
    """Value of a CONFIG_ option ('y', 'm', a string) from /proc/config.gz or /boot/config-*,
    None when unset or when no config is readable."""
    import gzip
    text = None
    try:
        with gzip.open(path("/proc/config.gz"), "rt") as f:
            text = f.read()
    except OSError:
        try:
            with open(path(f"/boot/config-{platform.release()}")) as f:
                text = f.read()
        except OSError:
            return None
    m = re.search(rf"^{re.escape(option)}=(.*)$", text, re.M)
    return m.group(1) if m else None


def pread(p: str, offset: int, length: int) -> bytes:
    """length bytes at offset of a binary kernel file (e.g. /sys/kernel/mm/page_idle/bitmap)."""
    try:
        fd = os.open(path(p), os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)
    except OSError as e:
        raise TiermemError(f"cannot read {length} bytes at offset {offset} of {p}: "
                           f"{e.strerror}") from e


def pwrite(p: str, offset: int, data: bytes) -> int:
    """Write data at offset of a binary kernel file; returns the bytes written."""
    try:
        fd = os.open(path(p), os.O_WRONLY)
        try:
            return os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
    except OSError as e:
        raise TiermemError(f"cannot write {len(data)} bytes at offset {offset} of {p}: "
                           f"{e.strerror}") from e


TRACEFS = "/sys/kernel/tracing"


def ensure_tracefs() -> str:
    """Mount tracefs at /sys/kernel/tracing when it is not mounted yet; returns the path.

    bcc finds tracepoints there. Mounting it changes no tracing state."""
    if os.path.exists(path(TRACEFS + "/events")):
        return TRACEFS
    if ROOT:
        raise TiermemError(f"tracefs is not mounted under TIERMEM_SYSROOT={ROOT}")
    import subprocess
    r = subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS],
                       capture_output=True, text=True)
    if r.returncode != 0 or not os.path.exists(TRACEFS + "/events"):
        raise TiermemError(f"cannot mount tracefs at {TRACEFS}: "
                           f"{(r.stderr or r.stdout).strip() or 'mount failed'}")
    return TRACEFS


def ioctl(p: str, request: int, arg: bytearray, flags: int = os.O_RDONLY) -> int:
    """ioctl(2) on a kernel file (e.g. PAGEMAP_SCAN on /proc/PID/pagemap); arg is a mutable
    buffer the kernel may fill. Returns the ioctl's result; OSError on failure."""
    import fcntl
    fd = os.open(path(p), flags)
    try:
        return fcntl.ioctl(fd, request, arg, True)
    finally:
        os.close(fd)

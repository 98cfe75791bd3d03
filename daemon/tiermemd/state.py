"""What a running tiermemd owns, written to <state_dir>/state.json, and the clean-up of what
a previous tiermemd left behind when it was killed (kill -9, OOM, power loss of the unit).

The state file records the daemon's PID, its control socket and the samplers it started.
On start:
  * the recorded PID is alive and is a tiermemd -> refuse: one daemon per state_dir;
  * otherwise the previous run died: its socket file is removed, every kdamond that
    tiermem's DAMON driver recorded as started by that PID (or by any dead PID) is turned
    off, each recorded sampler class gets its ``cleanup_stale`` hook if it has one, and
    tracefs kprobe/uprobe events named with 'tiermem' are removed.
BPF programs are held by file descriptors and die with the process, so a killed daemon
leaves none attached; the clean-up reports any it finds named 'tiermem' all the same.
"""
from __future__ import annotations

import json
import os
import socket
import stat
import time

import psutil

from tiermem import kfs
from tiermem.errors import TiermemError


def _is_tiermemd(pid: int) -> bool:
    try:
        return any("tiermemd" in a for a in psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


class StateWriteError(TiermemError):
    def __init__(self, d: str, reason: str):
        super().__init__(f"state directory {d} (daemon.state_dir) cannot be written: {reason}")
        self.reason = reason


class StateFile:
    def __init__(self, state_dir: str):
        self.dir = state_dir
        self.path = os.path.join(state_dir, "state.json")

    def read(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def write(self, **d) -> None:
        """Write the state file atomically; TiermemError (one line) if the directory cannot
        be made or written (a read-only file system, a file in the way, ...)."""
        tmp = self.path + f".{os.getpid()}.tmp"
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            with open(tmp, "w") as f:
                json.dump(d, f)
            os.replace(tmp, self.path)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise StateWriteError(self.dir, e.strerror or str(e)) from None

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def check_and_clean(sf: StateFile, socket_path: str, log) -> list[str]:
    """Refuse if a tiermemd runs on this state_dir; else clean what a dead one left.
    Returns one line per thing cleaned."""
    st = sf.read()
    done: list[str] = []
    if st is not None:
        pid = int(st.get("pid", -1))
        if pid != os.getpid() and psutil.pid_exists(pid) and _is_tiermemd(pid):
            raise TiermemError(f"tiermemd is already running as PID {pid} "
                               f"(state file {sf.path})")
        log.warning("previous tiermemd (PID %d) did not stop cleanly: cleaning up", pid)
        done += _clean_samplers(st.get("samplers", []), pid)
    done += _clean_socket(socket_path, st)
    done += _clean_damon()
    done += _clean_tracefs()
    if st is not None:
        sf.remove()
    for line in done:
        log.warning("cleanup: %s", line)
    return done


def _clean_socket(path: str, st: dict | None) -> list[str]:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return []
    if not stat.S_ISSOCK(mode):
        raise TiermemError(f"control socket path {path} exists and is not a socket: "
                           "remove it or set daemon.socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        s.close()
        raise TiermemError(f"control socket {path} is in use by a running daemon")
    except (ConnectionRefusedError, FileNotFoundError):
        pass
    finally:
        s.close()
    os.unlink(path)
    return [f"removed stale control socket {path}"]


def _clean_damon() -> list[str]:
    """Turn off kdamonds tiermem's DAMON driver recorded for an owner that is dead."""
    try:
        from tiermem import damon_sysfs as ds
    except ImportError:
        return []
    if not kfs.exists(ds.ADMIN):
        return []
    try:
        with open(kfs.path(ds.STATE_FILE)) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return []
    owner = int(rec.get("owner_pid", -1))
    if psutil.pid_exists(owner):
        return []
    out = []
    for k in ds.running_kdamonds():
        if k["index"] == rec.get("index") and k["pid"] == rec.get("kdamond_pid"):
            ds.turn_off(k["index"])
            deadline = time.monotonic() + 10
            while kfs.read(f"{ds.KDAMONDS}/{k['index']}/state", "off") != "off":
                if time.monotonic() > deadline:
                    raise TiermemError(f"stale kdamond {k['index']} did not turn off in 10 s")
                time.sleep(0.05)
            out.append(f"turned off stale kdamond {k['index']} (pid {k['pid']}) left by "
                       f"dead PID {owner}")
    try:
        os.unlink(kfs.path(ds.STATE_FILE))
    except FileNotFoundError:
        pass
    return out


def _clean_samplers(names: list[str], pid: int) -> list[str]:
    out = []
    try:
        from tiermem import samplers
        reg = getattr(samplers, "REGISTRY", None) or {}
    except ImportError:
        return out
    for n in names:
        cls = reg.get(n)
        hook = getattr(cls, "cleanup_stale", None)
        if hook is not None:
            for line in hook(pid) or []:
                out.append(f"sampler {n}: {line}")
    return out


def _clean_tracefs() -> list[str]:
    out = []
    for kind in ("kprobe_events", "uprobe_events"):
        p = f"{kfs.TRACEFS}/{kind}"
        if not kfs.exists(p):
            continue
        for line in kfs.read(p, "").splitlines():
            name = line.split()[0].split(":", 1)[-1] if line.strip() else ""
            if "tiermem" in name:
                # pwrite, not write: opening kprobe_events with O_TRUNC would clear them all
                kfs.pwrite(p, 0, f"-:{name}\n".encode())
                out.append(f"removed stale {kind[:-7]} event {name}")
    return out

"""The process as a whole: executable, cwd, umask, session/group leadership, name, mm fields
(for PR_SET_MM_MAP), rlimits. Refused at checkpoint: child processes (unless the tree is
checkpointed whole, cxlfork/tree.py), a zombie, a deleted cwd
or executable, a seccomp filter or strict mode (a sandbox the clone would silently lose).
Restored by the spawn (cwd, umask, session) and the plan (mm, name, rlimits)."""
from __future__ import annotations

import os

import psutil

from cxlfork import image as image_mod, procfs
from cxlfork.errors import CxlforkError, Refused


def stat_ref(path_for_stat: str, path: str) -> dict:
    """A file's identity (path, device, inode, size, mtime), checked again at restore."""
    st = os.stat(path_for_stat)
    return {"path": path, "dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns}


def _ps(pid: int) -> psutil.Process:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess as e:
        raise CxlforkError(f"no process with PID {pid}") from e


def refuse_tree(pid: int) -> None:
    """Refuse a process with children (a tree) and a zombie."""
    p = _ps(pid)
    try:
        kids = procfs.children(pid)
        zombie = p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess as e:
        raise CxlforkError(f"process {pid} exited while being read") from e
    if kids:
        raise Refused(f"PID {pid} has child processes ({', '.join(map(str, kids[:5]))}); "
                      "checkpoint() takes a single process: a tree is checkpointed whole by "
                      "cxlfork.tree.checkpoint_tree (the `cxlfork checkpoint` command)")
    if zombie:
        raise CxlforkError(f"PID {pid} is a zombie")


def refuse_seccomp(pid: int, status: dict) -> None:
    """A process under seccomp (strict mode or filters) is refused: the restorer cannot
    install its filters again, and a clone without them would run unsandboxed."""
    mode = status.get("Seccomp", "0").strip()
    if mode not in ("", "0"):
        what = "strict mode" if mode == "1" else \
            f"{status.get('Seccomp_filters', '?').strip()} seccomp filter(s)"
        raise Refused(f"PID {pid} runs under seccomp ({what}); a clone would lose the "
                      "sandbox: not supported")


def rlimits(pid: int) -> dict[str, list[int]]:
    """Every rlimit of PID, read from /proc/PID/limits (psutil's prlimit() is refused for a
    process of another uid without CAP_SYS_RESOURCE)."""
    lims = procfs.limits(pid)
    out = {}
    for name, res in sorted(procfs.RLIMITS.items()):
        if res not in lims:
            raise CxlforkError(f"/proc/{pid}/limits has no row for RLIMIT_{name.upper()}")
        out[name] = list(lims[res])
    return out


def collect(pid: int, status: dict, brk: int, creds: dict) -> dict:
    """The manifest's process, mm and rlimits fields (status: procfs.status(pid), for the
    umask psutil does not have; brk: injected brk(0); creds: state.creds.collect)."""
    cwd = os.readlink(f"/proc/{pid}/cwd")        # psutil drops " (deleted)"
    if cwd.endswith(" (deleted)"):
        raise Refused(f"the working directory of PID {pid} was deleted ({cwd})")
    exe_path = os.readlink(f"/proc/{pid}/exe")
    if exe_path.endswith(" (deleted)"):
        raise Refused(f"the executable of PID {pid} was deleted ({exe_path})")
    st = procfs.stat(pid)                         # mm fields: psutil has none of them
    f = [int(x) if x and x.lstrip("-").isdigit() else 0 for x in st]
    mm = {"start_code": f[26], "end_code": f[27], "start_stack": f[28], "start_data": f[45],
          "end_data": f[46], "start_brk": f[47], "brk": brk, "arg_start": f[48],
          "arg_end": f[49], "env_start": f[50], "env_end": f[51],
          "auxv": image_mod.b64(procfs.auxv(pid))}
    return {
        "process": {"pid": pid, "comm": st[2], "exe": stat_ref(f"/proc/{pid}/exe", exe_path),
                    "cwd": cwd, "umask": int(status.get("Umask", "0022"), 8),
                    "pgid_leader": f[5] == pid, "sid_leader": f[6] == pid,
                    "creds": creds},
        "mm": mm,
        "rlimits": rlimits(pid),
    }


def session_mode(m: dict) -> int:
    """How the spawn sets the clone's session: 1 setsid, 2 setpgid, 0 neither."""
    proc = m["process"]
    return 1 if proc["sid_leader"] else 2 if proc["pgid_leader"] else 0

"""fds 0-2 of the clone. `restore --stdio`: inherit (the restore command's own), null, FILE
(output appended there), original, or auto (the default).

original: each of fds 0-2 that was a regular file at checkpoint (a daemon's log) is opened
again at its path with the original's status flags (O_APPEND...) and offset; /dev/null is
opened again; any other kind (pipe, terminal, socket) is the restore command's own. Two of
0-2 that were one open file description (`2>&1`) are one again. auto: original when each of
the fds 0-2 the process had was a regular file or /dev/null and one at least a regular file,
else inherit.

Checkpoint (`collect`) records, per fd 0-2, what original needs: the path, offset, device,
inode and owner of a regular file (or why it cannot be reopened: deleted, renamed), or that
it was /dev/null, and which earlier fd of 0-2 it shares an open file description with
(kcmp); state.creds records the process's file-system uid, gid and groups (uid, gid, groups).

Restore runs as root on behalf of the image, so a path is opened with the checkpointed
process's credentials (native cx_open_as: fsuid, fsgid and groups in a thread of its own),
never followed through a symlink at its last component, and refused unless the file opened
is the one the original had (same device and inode: a file put in its place, e.g. by a log
rotation, is refused) and is owned by the process's uid (a path of another user's is
refused). Each refusal is one line naming the fd and the path."""
from __future__ import annotations

import os
import stat as stat_mod

from cxlfork.errors import CxlforkError
from cxlfork.native import ffi, lib

MODES = ("auto", "original", "inherit", "null")
DROP = os.O_CREAT | os.O_TRUNC | os.O_EXCL | os.O_NOCTTY


# -- checkpoint --------------------------------------------------------------------------------
def collect(pid: int, f: dict, rec: dict, earlier: list[dict]) -> None:
    """Fill the stdio record rec of fd f (procfs.fds, fd 0-2) with what original needs;
    earlier: the stdio records of lower fds."""
    n, link = f["fd"], f["link"]
    for e in earlier:
        if e["link"] == link and lib.cx_kcmp_file(pid, e["fd"], n) == 0:
            rec["orig_dup"] = e["fd"]
            return
    if link == "/dev/null":
        rec["orig"] = {"type": "null"}
        return
    if not link.startswith("/"):
        return                                    # pipe, socket, anon inode: not a file
    try:
        st = os.stat(f"/proc/{pid}/fd/{n}")
    except OSError:
        return
    if not stat_mod.S_ISREG(st.st_mode):
        return                                    # a terminal or another device
    if link.endswith(" (deleted)"):
        rec["orig"] = {"type": "none", "why": f"{link} was deleted"}
        return
    try:
        st2 = os.stat(link)
    except OSError:
        st2 = None
    if st2 is None or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
        rec["orig"] = {"type": "none", "why": f"{link} was renamed or replaced since it was "
                                              "opened"}
        return
    rec["orig"] = {"type": "file", "path": link, "pos": f["pos"], "dev": st.st_dev,
                   "ino": st.st_ino, "uid": st.st_uid}


# -- image validation --------------------------------------------------------------------------
def check(v, f: dict, w: str) -> None:
    """Validate the original-stdio fields of stdio record f (v: image._V)."""
    dup = v.get(f, "orig_dup", int, w, optional=True)
    if dup is not None and not 0 <= dup < f["fd"]:
        v.fail(f"{w}.orig_dup", "must name a lower fd of 0-2")
    o = v.get(f, "orig", dict, w, optional=True)
    if o is None:
        return
    t = v.get(o, "type", str, f"{w}.orig")
    if t == "none":
        v.get(o, "why", str, f"{w}.orig")
    elif t == "file":
        p = v.get(o, "path", str, f"{w}.orig")
        if not p.startswith("/") or "\0" in p:
            v.fail(f"{w}.orig.path", "expected an absolute path")
        v.int_in(o, "pos", 0, 1 << 62, f"{w}.orig")
        for k in ("dev", "ino", "uid"):
            v.int_in(o, k, 0, 2**64, f"{w}.orig")
    elif t != "null":
        v.fail(f"{w}.orig.type", "expected file, null or none")


# -- restore -----------------------------------------------------------------------------------
def _stdio_recs(m: dict) -> dict[int, dict]:
    return {f["fd"]: f for f in m["fds"] if f["fd"] <= 2 and f["kind"] == "stdio"}


def resolve(stdio, m: dict):
    """auto -> original or inherit for image m; anything else as given."""
    if stdio != "auto":
        return stdio
    recs = _stdio_recs(m).values()
    types = [f.get("orig", {}).get("type") if "orig_dup" not in f else "dup" for f in recs]
    if types and all(t in ("file", "null", "dup") for t in types) and "file" in types:
        return "original"
    return "inherit"


def _open_file(n: int, f: dict, m: dict) -> int:
    o = f["orig"]
    path = o["path"]
    creds = m["process"].get("creds")
    if creds is None:
        raise CxlforkError(f"fd {n}: --stdio original: the image has no record of the "
                           "process's credentials; checkpoint again")
    flags = (f["flags"] & ~DROP) | os.O_CLOEXEC
    gs = creds["groups"]
    if os.geteuid() == 0:
        fd = lib.cx_open_as(path.encode(), flags, creds["uid"], creds["gid"], len(gs),
                            ffi.new("unsigned[]", gs or [0]))
    elif os.geteuid() == creds["uid"]:            # our own process's: our credentials
        fd = lib.cx_open_as(path.encode(), flags, 0, 0, -1, ffi.NULL)
    else:
        raise CxlforkError(f"fd {n}: --stdio original: the image's process ran as uid "
                           f"{creds['uid']}; only root or that user can open its files")
    if fd < 0:
        raise CxlforkError(f"fd {n}: cannot reopen {path} as uid {creds['uid']} (the "
                           f"checkpointed process's): {os.strerror(-fd)} (--stdio "
                           "inherit|null|FILE to restore anyway)")
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (o["dev"], o["ino"]):
            raise CxlforkError(f"fd {n}: {path} is not the file the original had open (inode "
                               f"{st.st_ino} now, {o['ino']} at the checkpoint: replaced or "
                               "rotated since); refused (--stdio inherit|null|FILE to "
                               "restore anyway)")
        if st.st_uid != creds["uid"]:
            raise CxlforkError(f"fd {n}: {path} belongs to uid {st.st_uid}, not to uid "
                               f"{creds['uid']} whose process had it open; refused")
        if o["pos"]:
            os.lseek(fd, o["pos"], os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def original_fds(m: dict, opened: list[int]) -> list[int]:
    """The clone's fds 0-2 under --stdio original (fds made here are appended to opened)."""
    recs = _stdio_recs(m)
    out = [0, 1, 2]
    for n in range(3):
        f = recs.get(n)
        if f is None:
            continue                  # closed at checkpoint: clone_fds makes no fd n
        if "orig_dup" in f:
            out[n] = out[f["orig_dup"]]
            continue
        o = f.get("orig")
        if o is None:
            continue                  # pipe, terminal, socket: the restore command's own
        if o["type"] == "none":
            raise CxlforkError(f"fd {n}: --stdio original: {o['why']} at the checkpoint; it "
                               "cannot be reopened (--stdio inherit|null|FILE)")
        if o["type"] == "null":
            s = os.open("/dev/null", (f["flags"] & ~DROP) | os.O_CLOEXEC)
        else:
            s = _open_file(n, f, m)
        opened.append(s)
        out[n] = s
    return out

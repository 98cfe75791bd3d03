"""The process's credentials: real, effective, saved and file-system uid and gid, the
supplementary groups, the five capability sets (CapInh/CapPrm/CapEff/CapBnd/CapAmb), the
securebits, no_new_privs and the dumpable flag.

Checkpoint (`collect`, in the injection window): /proc/PID/status for ids, groups, capability
sets and NoNewPrivs; prctl(PR_GET_SECUREBITS) and prctl(PR_GET_DUMPABLE) injected into the
process (/proc shows neither). Credentials are per thread in Linux: a thread whose status
differs from the main thread's is refused in one line (every thread of a clone gets the main
thread's).

Restore: the plan's last ops (plan.OP_CREDS, after the memory, the fd table, the namespaces,
the rlimits and locks, and the creation of the threads, which still needs privilege for
clone3 set_tid) make the restorer the checkpointed process's credentials: setgroups,
setresgid, setfsgid, the bounding set dropped, setresuid/setfsuid with SECBIT_NO_SETUID_FIXUP
held so that no capability is lost on the way, the inheritable set, the ambient set, the
securebits, the three sets at last (capset), no_new_privs, dumpable. Each thread does the same
for itself before it parks (native/restorer_creds.c). Only what differs from the restorer's
own credentials is changed (`steps`).

Who may restore (`check_restorable`): root may restore any image it owns (sealed with its
key); where it runs without a capability the process held, the clones lack it too (with a
warning). A caller other than root only an image whose process had its own uids, gids and
groups, and no capability it lacks: a restore never gains a uid or a capability.
"""
from __future__ import annotations

import ctypes
import os

from cxlfork.errors import CxlforkError, Refused

CAPS = ("inh", "prm", "eff", "bnd", "amb")
_STATUS_CAPS = {"inh": "CapInh", "prm": "CapPrm", "eff": "CapEff", "bnd": "CapBnd",
                "amb": "CapAmb"}
PR_GET_DUMPABLE, PR_GET_SECUREBITS = 3, 27
NR_PRCTL = 157
# the steps of the restorer's OP_CREDS (native/restorer_creds.c)
F_GROUPS, F_GID, F_UID, F_CAPS, F_AMB, F_SECBITS, F_NNP, F_DUMPABLE = (1 << i for i in range(8))


def _ids(status: dict, key: str, pid) -> list[int]:
    v = status.get(key, "").split()
    if len(v) != 4:
        raise CxlforkError(f"cannot read the {key} line of /proc/{pid}/status")
    return [int(x) for x in v]


def from_status(status: dict, pid="self") -> dict:
    """ids, groups, capability sets and no_new_privs of a /proc/PID/status (procfs.status)."""
    try:
        caps = {k: int(status[n], 16) for k, n in _STATUS_CAPS.items()}
    except (KeyError, ValueError):
        raise CxlforkError(f"cannot read the capability sets of /proc/{pid}/status") from None
    return {"uids": _ids(status, "Uid", pid), "gids": _ids(status, "Gid", pid),
            "groups": sorted(int(g) for g in status.get("Groups", "").split()),
            "caps": caps, "no_new_privs": int(status.get("NoNewPrivs", "0") or 0)}


def _same(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in ("uids", "gids", "groups", "caps", "no_new_privs"))


def _show(c: dict) -> str:
    return (f"uids {'/'.join(map(str, c['uids']))} gids {'/'.join(map(str, c['gids']))} "
            f"groups {','.join(map(str, c['groups'])) or '-'} CapEff {c['caps']['eff']:x}")


def collect(tr, status: dict) -> dict:
    """The credentials of the frozen process (tr in its injection window; status: its
    procfs.status). Refuses threads with other credentials than the main thread's."""
    from cxlfork import procfs
    pid = tr.pid
    c = from_status(status, pid)
    for t in tr.threads:
        tc = from_status(procfs.status(t.pid), f"{pid}/task/{t.pid}")
        if not _same(c, tc):
            raise Refused(f"thread {t.pid} of PID {pid} runs with other credentials than its "
                          f"main thread ({_show(tc)}, not {_show(c)}): per-thread credentials "
                          "are not supported")
    c["securebits"] = tr.inject_nr(NR_PRCTL, PR_GET_SECUREBITS)
    c["dumpable"] = tr.inject_nr(NR_PRCTL, PR_GET_DUMPABLE)
    if c["securebits"] < 0 or c["dumpable"] < 0:
        raise CxlforkError(f"cannot read the securebits or dumpable flag of PID {pid}")
    # the file-system ids and groups also where stdio.py reads them (cx_open_as)
    c.update(uid=c["uids"][3], gid=c["gids"][3])
    return c


# -- image validation --------------------------------------------------------------------------
def check(v, proc: dict) -> None:
    """Validate process.creds (v: image._V); required from image format version 3 on."""
    c = v.get(proc, "creds", dict, "process")
    w = "process.creds"
    for k in ("uids", "gids"):
        ids = v.get(c, k, list, w)
        if len(ids) != 4 or any(not isinstance(x, int) or isinstance(x, bool) or
                                not 0 <= x < 2**32 for x in ids):
            v.fail(f"{w}.{k}", "expected [real, effective, saved, file-system] IDs")
    v.int_in(c, "uid", 0, 2**32, w)
    v.int_in(c, "gid", 0, 2**32, w)
    if (c["uid"], c["gid"]) != (c["uids"][3], c["gids"][3]):
        v.fail(w, "uid/gid must be the file-system ids")
    gs = v.get(c, "groups", list, w)
    if len(gs) > 65536 or any(not isinstance(g, int) or isinstance(g, bool) or
                              not 0 <= g < 2**32 for g in gs):
        v.fail(f"{w}.groups", "expected at most 65536 group IDs")
    caps = v.get(c, "caps", dict, w)
    for k in CAPS:
        v.int_in(caps, k, 0, 2**64, f"{w}.caps")
    if caps["eff"] & ~caps["prm"] or caps["amb"] & ~(caps["prm"] & caps["inh"]):
        v.fail(f"{w}.caps", "effective must be within permitted, ambient within permitted "
                            "and inheritable")
    v.int_in(c, "securebits", 0, 2**32, w)
    v.int_in(c, "no_new_privs", 0, 2, w)
    v.int_in(c, "dumpable", 0, 3, w)


# -- restore -----------------------------------------------------------------------------------
def mine() -> dict:
    """This process's credentials (a restorer it spawns has the same: it is no setuid or
    file-capability program)."""
    from cxlfork import procfs
    c = from_status(procfs.status("self"))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.restype = ctypes.c_int
    c["securebits"] = libc.prctl(PR_GET_SECUREBITS, 0, 0, 0, 0)
    return c


def _caps_text(bits: int) -> str:
    names = []
    for i in range(64):
        if bits >> i & 1:
            names.append(str(i))
    return ",".join(names)


def check_restorable(m: dict, image: str, me: dict | None = None, warn=None) -> dict:
    """Refuse (one line) a restore by a user other than root that would give the clone a
    uid, gid, group or capability the caller does not have. Returns the credentials the
    clones get: the image's, where root lacks a capability its process held (a restore
    run with fewer capabilities) without it (warn says so), and the caller's own under "me"."""
    c = m["process"]["creds"]
    me = me or mine()
    lacks = (c["caps"]["prm"] | c["caps"]["bnd"]) & ~(me["caps"]["prm"] & me["caps"]["bnd"])
    if os.geteuid() != 0:
        if c["uids"] != me["uids"] or c["gids"] != me["gids"] or \
                sorted(c["groups"]) != me["groups"]:
            raise Refused(f"restore of {image}: its process ran as {_show(c)}, not with your "
                          f"credentials ({_show(me)}); only root may restore another user's "
                          "process")
        if lacks or c["caps"]["inh"] & ~me["caps"]["inh"] or \
                c["caps"]["amb"] & ~me["caps"]["amb"]:
            raise Refused(f"restore of {image}: its process's capability sets are not within "
                          "yours; only root may restore it")
        return dict(c, me=me)
    out = dict(c, me=me)
    if lacks:
        have = me["caps"]["prm"] & me["caps"]["bnd"]
        caps = {k: c["caps"][k] & have for k in ("prm", "eff", "bnd")}
        caps["inh"] = c["caps"]["inh"] & me["caps"]["bnd"]
        caps["amb"] = c["caps"]["amb"] & caps["prm"] & caps["inh"]
        out["caps"] = caps
        if warn:
            warn(f"the process of {image} held capabilities this restore lacks (numbers "
                 f"{_caps_text(lacks)}); its clones run without them")
    return out


def steps(c: dict) -> int:
    """The F_* steps OP_CREDS takes to turn a restorer with credentials c["me"] into c's
    (check_restorable's answer)."""
    me = c["me"]
    f = 0
    if sorted(c["groups"]) != me["groups"]:
        f |= F_GROUPS
    if c["gids"] != me["gids"]:
        f |= F_GID
    if c["uids"] != me["uids"]:
        f |= F_UID
    if any(c["caps"][k] != me["caps"][k] for k in ("inh", "prm", "eff", "bnd")) or f & F_UID:
        f |= F_CAPS
    if c["caps"]["amb"] != me["caps"]["amb"] or f & F_CAPS:
        f |= F_AMB
    if c["securebits"] != me["securebits"] or f & F_UID:
        f |= F_SECBITS
    if c["no_new_privs"] and not me["no_new_privs"]:
        f |= F_NNP
    if c["dumpable"] in (0, 1):
        f |= F_DUMPABLE
    return f


def record(c: dict, flags: int) -> bytes:
    """The OP_CREDS record in the plan for credentials c: u64 words flags, ruid euid suid
    fsuid, rgid egid sgid fsgid, inh prm eff bnd amb, securebits, no_new_privs, dumpable, last
    cap, group count, then the groups (u32)."""
    import struct
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = 40
    words = [flags, *c["uids"], *c["gids"], *(c["caps"][k] for k in CAPS), c["securebits"],
             c["no_new_privs"], c["dumpable"], last, len(c["groups"])]
    out = struct.pack(f"<{len(words)}Q", *words)
    out += struct.pack(f"<{len(c['groups'])}I", *c["groups"])
    return out + b"\0" * (-len(out) % 8)

"""PID namespaces for clones (`restore --pidns new`): each clone gets a new PID namespace of its
own in which it runs under its checkpointed PID, and its threads under their checkpointed
tids, so getpid() (asyncio ties its running loop to it), stored PIDs and tids stay right.

How a clone's namespace is made (the calling thread only; other threads of cxlfork are not
affected): `unshare(CLONE_NEWPID)` makes the thread's next child PID 1 of a new namespace:
that child is the namespace's init, `cxlfork-restorer init` (restorer_init.c). The thread's
later children are born in that namespace too, so the clone's restorer is then spawned as
usual (`clone3` with `set_tid` = the checkpointed PID) and is a child of cxlfork (waitpid,
ptrace and the returned host PID work as without a namespace); then the thread goes back to
its own namespace (`setns`). The init is told the clone's PID on a pipe (EOF before that:
the restore failed, it exits and the kernel kills whatever is in the namespace); it reaps
orphans and exits when the clone (the namespace's root) has exited, which kills whatever is
left in the namespace, as when a container's init exits. A daemon thread of this process
reaps each init. Another namespace of a clone (network, issue 13 part 1) is best made by the
same thread around the same spawn, so that the init and the clone share it.
"""
from __future__ import annotations

import ctypes
import os
import threading

from cxlfork.errors import CxlforkError
from cxlfork.native import ffi, lib

CLONE_NEWPID = 0x20000000
_libc = ctypes.CDLL(None, use_errno=True)
_inits: dict[int, int] = {}          # clone's host PID -> its namespace's init
_reapers: list[threading.Thread] = []
MODES = ("host", "new")


def _errno_text() -> str:
    return os.strerror(ctypes.get_errno())


class Namespace:
    """A new PID namespace with its init, made by new(); the calling thread creates its
    children in it until leave()."""

    def __init__(self):
        self.init_pid = -1
        self._w = -1
        self._home = -1

    def leave(self) -> None:
        """The calling thread creates its children in its own namespace again."""
        if self._home >= 0:
            r = _libc.setns(self._home, CLONE_NEWPID)
            os.close(self._home)
            self._home = -1
            if r != 0:       # cannot happen for our own namespace; never go on inside it
                raise CxlforkError(f"going back to cxlfork's PID namespace: {_errno_text()}")

    def start(self, clone_pid: int, pid_in_ns: int) -> None:
        """Tell the init its root (PID pid_in_ns inside); it reaps until the root exits."""
        try:
            os.write(self._w, pid_in_ns.to_bytes(4, "little"))
        except OSError as e:
            raise CxlforkError(f"the init of clone {clone_pid}'s PID namespace is gone: "
                               f"{e.strerror}") from e
        os.close(self._w)
        self._w = -1
        _inits[clone_pid] = self.init_pid
        t = threading.Thread(target=_reap, args=(self.init_pid,), daemon=True,
                             name=f"cxlfork-pidns-init-{self.init_pid}")
        t.start()
        _reapers.append(t)

    def kill(self) -> None:
        """Undo: leave, and kill and reap the init (which kills the namespace)."""
        self.leave()
        if self._w >= 0:
            os.close(self._w)
            self._w = -1
        if self.init_pid > 0:
            try:
                os.kill(self.init_pid, 9)
                os.waitpid(self.init_pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.init_pid = -1


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:          # reaped by someone else (waitpid(-1))
        pass


def new(restorer: bytes, cg_args: tuple[int, int]) -> Namespace:
    """Make a new PID namespace with its init (a child of this process, born in the cgroup
    of cg_args, see cgtarget.spawn_args); the calling thread's next children are born in it
    until .leave()."""
    ns = Namespace()
    ns._home = os.open("/proc/thread-self/ns/pid_for_children", os.O_RDONLY | os.O_CLOEXEC)
    r, ns._w = os.pipe2(os.O_CLOEXEC)
    try:
        if _libc.unshare(CLONE_NEWPID) != 0:
            raise CxlforkError(f"a new PID namespace for a clone (--pidns new): unshare: "
                               f"{_errno_text()} (needs CAP_SYS_ADMIN; --pidns host restores "
                               "without one)")
        argv = [ffi.new("char[]", restorer), ffi.new("char[]", b"init"), ffi.NULL]
        pid = lib.cx_spawn(restorer, ffi.new("char *[]", argv), ffi.new("int[]", [r]),
                           ffi.new("int[]", [0]), 1, b"/", 0o22, 1, 0, -1, *cg_args)
        if pid < 0:
            raise CxlforkError(f"spawning the init of a clone's PID namespace: "
                               f"{os.strerror(-pid)}")
        ns.init_pid = pid
    except BaseException:
        os.close(r)
        ns.kill()
        raise
    os.close(r)
    return ns


def info(pid: int) -> dict:
    """A clone's PID namespace as `restore --json` names it: the namespace (`pid:[INODE]`,
    as /proc/PID/ns/pid reads), the clone's PID inside it and the namespace's init (host
    PID; None for a clone restored in cxlfork's namespace)."""
    try:
        ns = os.readlink(f"/proc/{pid}/ns/pid")
        with open(f"/proc/{pid}/status") as f:
            nspid = next(line.split()[1:] for line in f if line.startswith("NSpid:"))
    except (OSError, StopIteration):
        return {"pid": pid, "pidns": None, "pid_in_ns": None, "init": None}
    return {"pid": pid, "pidns": ns, "pid_in_ns": int(nspid[-1]), "init": _inits.get(pid)}


def wait_inits(timeout_s: float = 5.0) -> None:
    """Wait (up to timeout_s) until the inits of the clones restored so far are reaped (their
    clones must have exited; for a command about to exit)."""
    for t in _reapers:
        t.join(timeout_s)


def check(mode: str, same_pid: bool, ghosts, orig_pid: int) -> None:
    """Refuse what --pidns MODE cannot do, before anything is made."""
    if mode not in MODES:
        raise CxlforkError(f"--pidns {mode}: expected one of {', '.join(MODES)}")
    if mode != "new":
        if ghosts is not None and getattr(ghosts, "pidns", "host") == "new":
            raise CxlforkError("this ghost pool keeps ghosts in new PID namespaces: restore "
                               "into it with pidns='new'")
        return
    if same_pid:
        raise CxlforkError("--same-pid restores under the checkpointed PID in cxlfork's own "
                           "PID namespace; --pidns new gives each clone that PID in a new "
                           "namespace: use one or the other")
    if ghosts is not None and getattr(ghosts, "pidns", "host") != "new":
        raise CxlforkError("--pidns new cannot restore into this ghost pool: a ghost's PID "
                           "and PID namespace are fixed when it is spawned (use a warm pool "
                           "made with pidns='new', or restore without ghosts)")
    if orig_pid == 1:
        raise CxlforkError("the checkpointed process was PID 1 of its namespace (an init): "
                           "--pidns new gives that PID to the namespace's own init; not "
                           "supported (use --pidns host)")

"""Process trees: a process with descendants checkpointed whole and restored in a new PID
namespace with the original PIDs (so stored child PIDs, waitpid and kill(child) keep working).

Checkpoint (`checkpoint_tree`): the root and each descendant (children, grandchildren, any
depth) are checkpointed one after another by the single-process pipeline (each frozen while
it is dumped), parents before their children, the descendants into IMAGE/tree/PID (images of
their own); the root's manifest gets a "tree" field: the descendants (pid, image, parent),
the zombies (pid, wait status, parent) and the open file descriptions a process shares with
one checkpointed before it ("shared": pipe ends, files, inet sockets, eventfds inherited
through fork, unix sockets bound to paths; found with kcmp) and the shmem objects it holds that one before it holds too
("objects": shared anonymous memory, memfds, deleted files, by inode; each named by a
mapping's start or an fd). Pipes whose ends are all inside the tree are accepted.
Refused with one line: a process sharing any other open file description (a socketpair end,
an epoll...) with another process of the tree.

Restore: cxlfork.tree_restore (one new PID namespace, and network namespace if the tree has
inet sockets, per clone tree).
"""
from __future__ import annotations

import ctypes
import os
import socket

import psutil

from cxlfork import checkpoint as ckpt_mod, image as image_mod, procfs
from cxlfork.errors import CxlforkError, Refused
from cxlfork.native import lib

_libc = ctypes.CDLL(None, use_errno=True)
SYS_KCMP, KCMP_FILE = 312, 0
SO_DOMAIN = 39
INET = (socket.AF_INET, socket.AF_INET6)


def _same_ofd(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    return _libc.syscall(SYS_KCMP, pid1, pid2, KCMP_FILE, fd1, fd2) == 0


def _fds(pid: int) -> dict[int, str]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass
    return out


def _end(pid: int, fd: int) -> str:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            flags = next(int(x.split()[1], 8) for x in f if x.startswith("flags:"))
    except (OSError, StopIteration):
        return "?"
    return "r" if flags & 3 == os.O_RDONLY else "w"


def _shareable_socket(pid: int, fd: int) -> bool:
    """An inet socket, or a unix socket bound to a path (a listener workers inherit)."""
    dfd = lib.cx_pidfd_getfd(pid, fd)
    if dfd < 0:
        return False
    try:
        s = socket.socket(fileno=dfd)
        try:
            fam = s.getsockopt(socket.SOL_SOCKET, SO_DOMAIN)
            if fam == socket.AF_UNIX:
                name = s.getsockname()
                return isinstance(name, str) and name.startswith("/")
            return fam in INET
        finally:
            s.detach()
    except OSError:
        return False
    finally:
        os.close(dfd)


def descendants(pid: int) -> list[tuple[int, int]]:
    """[(pid, parent)] of PID's live descendants, parents before their children (the order
    in which they are checkpointed and restored)."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess as e:
        raise CxlforkError(f"no process with PID {pid}") from e
    out: list[tuple[int, int]] = []
    level = [root]
    try:
        while level:
            nxt = []
            for p in level:
                for k in (psutil.Process(c) for c in procfs.children(p.pid)):
                    if k.status() == psutil.STATUS_ZOMBIE:
                        continue            # zombies(): carried as their exit status
                    out.append((k.pid, p.pid))
                    nxt.append(k)
            level = nxt
    except psutil.NoSuchProcess as e:
        raise CxlforkError(f"a process of the tree of PID {pid} exited while being read") from e
    return out


def children(pid: int) -> list[int]:
    """The descendants of PID (a tree's other processes), parents first."""
    return [k for k, _ in descendants(pid)]


def zombies(pids: list[int]) -> list[dict]:
    """The zombie children of each of pids: [{pid, zombie: wait status (proc(5) exit_code),
    parent}]."""
    out = []
    for parent in pids:
        for c in procfs.children(parent):
            try:
                k = psutil.Process(c)
                if k.status() == psutil.STATUS_ZOMBIE:
                    st = procfs.stat(k.pid)
                    out.append({"pid": k.pid, "zombie": int(st[52]), "parent": parent})
            except (psutil.NoSuchProcess, OSError, IndexError):
                pass
    return out


def _shareable(pid: int, fd: int, link: str) -> bool:
    """Open file descriptions a tree's processes may share (restored once per clone tree)."""
    if link.startswith(("pipe:[", "/")) or link == "anon_inode:[eventfd]":
        return True
    return link.startswith("socket:[") and _shareable_socket(pid, fd)


def _sharing(order: list[int]) -> tuple[set[int], list[dict]]:
    """(inodes of pipes with every end in the tree, [{pid, fd, from_pid, from_fd}]: the open
    file descriptions a process shares with one before it in order). Refuses what cannot be
    shared."""
    table = {p: _fds(p) for p in order}
    ends: dict[int, set[str]] = {}
    for pid in order:
        for fd, link in table[pid].items():
            if link.startswith("pipe:["):
                ends.setdefault(int(link[6:-1]), set()).add(_end(pid, fd))
    pipes = {ino for ino, e in ends.items() if e == {"r", "w"}}

    def tree_pipe(link):
        return link.startswith("pipe:[") and int(link[6:-1]) in pipes

    shared = []
    for i, pid in enumerate(order[1:], 1):
        for fd, link in table[pid].items():
            if fd <= 2 and not tree_pipe(link):
                continue                # stdio: from --stdio
            same = next(((q, a) for q in order[:i] for a, la in table[q].items()
                         if la == link and (a > 2 or tree_pipe(la)) and
                         _same_ofd(q, a, pid, fd)), None)
            if same is None:
                continue
            if not _shareable(pid, fd, link):
                raise Refused(f"fd {fd} of PID {pid} shares its open file description with fd "
                              f"{same[1]} of PID {same[0]} of its tree ({link}); in a process "
                              "tree only pipe ends, files, eventfds, inet sockets and unix "
                              "sockets bound to paths can be shared yet")
            shared.append({"pid": pid, "fd": fd, "from_pid": same[0], "from_fd": same[1]})
    return pipes, shared


def _shmem_refs(pid: int) -> dict[tuple[int, int], dict]:
    """{(dev, inode): where PID first holds it} for its shmem objects (shared anonymous
    memory, memfds, deleted files: what cxlfork.state.memory keeps as objects), by mapping
    ({"map": start}) or fd ({"fd": n})."""
    out: dict[tuple[int, int], dict] = {}
    with open(f"/proc/{pid}/maps") as f:
        lines = f.read().splitlines()
    for line in lines:
        parts = line.split(None, 5)
        path = parts[5] if len(parts) > 5 else ""
        if path == "/dev/zero (deleted)" or path.startswith(("[anon_shmem:", "/memfd:")) or \
                (path.startswith("/") and path.endswith(" (deleted)")):
            try:
                st = os.stat(f"/proc/{pid}/map_files/{parts[0]}")
            except OSError:
                continue
            out.setdefault((st.st_dev, st.st_ino), {"map": int(parts[0].split("-")[0], 16)})
    for fd, link in sorted(_fds(pid).items()):
        if fd > 2 and link.startswith("/") and (link.startswith("/memfd:") or
                                                link.endswith(" (deleted)")):
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            out.setdefault((st.st_dev, st.st_ino), {"fd": fd})
    return out


def _shared_objects(order: list[int]) -> list[dict]:
    """[{pid, map|fd, from_pid, from: {map|fd}}]: a shmem object a process holds that one
    before it in order holds too (a MAP_SHARED|MAP_ANONYMOUS scoreboard made before a fork):
    restored as one object in the clone tree."""
    first: dict[tuple[int, int], tuple[int, dict]] = {}
    out = []
    for pid in order:
        for key, ref in _shmem_refs(pid).items():
            if key in first:
                out.append({"pid": pid, **ref, "from_pid": first[key][0],
                            "from": first[key][1]})
            else:
                first[key] = (pid, ref)
    return out


def checkpoint_tree(pid: int, image: str, store_dir: str | None = None, kill: bool = False,
                    progress=None, warn=None) -> dict:
    """Checkpoint PID and its descendants into IMAGE (see the module's docstring)."""
    ckpt_mod._refuse_what_is_not_a_user_process(pid)   # before its children are looked at
    kids = descendants(pid)
    dead = zombies([pid] + [k for k, _ in kids])
    if not kids and not dead:
        return ckpt_mod.checkpoint(pid, image, store_dir, kill, progress, warn)
    pipes, shared = _sharing([pid] + [k for k, _ in kids])
    try:
        objects = _shared_objects([pid] + [k for k, _ in kids])
    except OSError as e:
        raise CxlforkError(f"reading the shared memory of the tree of PID {pid}: "
                           f"{e.strerror}") from e
    image = os.path.abspath(image)
    manifest = {"children": [{"pid": k, "image": f"tree/{k}", "parent": par}
                             for k, par in kids],
                "zombies": dead, "shared": shared, "objects": objects}
    out = ckpt_mod.checkpoint(pid, image, store_dir, False, progress, warn,
                              tree={"pipes": pipes, "manifest": manifest})
    try:
        os.mkdir(os.path.join(image, "tree"), 0o700)
        for k, _ in kids:
            ckpt_mod.checkpoint(k, os.path.join(image, "tree", str(k)), store_dir, False,
                                None, warn, tree={"pipes": pipes, "manifest": None})
    except BaseException:
        image_mod.remove(image)
        raise
    if kill:
        for p in [pid] + [k for k, _ in kids]:
            try:
                os.kill(p, 9)
            except ProcessLookupError:
                pass
    out["children"] = [k for k, _ in kids]
    out["killed"] = kill
    return out


def is_tree(image: str) -> bool:
    """Whether image holds a process tree (its manifest loaded through the restore cache, so
    the restore that follows does not load and validate it a second time)."""
    from cxlfork.restore import _load_cached
    return bool(_load_cached(os.path.abspath(image))[0].get("tree"))


def restore_tree(*args, **kw) -> list[int]:
    """cxlfork.tree_restore.restore_tree."""
    from cxlfork.tree_restore import restore_tree as do
    return do(*args, **kw)
